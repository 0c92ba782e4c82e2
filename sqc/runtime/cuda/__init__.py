"""The CUDA backend's runtime: the chunk layout of the codes and its conversions (:mod:`.chunks`), and the
driver, kernel bundle and per-layer kernels that run a fatbin built where the model was compiled
(:mod:`.kernels`). Needs torch with a GPU, not TVM or nvcc."""
