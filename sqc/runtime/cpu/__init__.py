"""The CPU backend's runtime: the lane layouts of the codes (:mod:`.lanes`, :mod:`.bytelanes`) and their
conversions, the kernels of one layer (:mod:`.kernels`), their ops (:mod:`.ops`), loading an artifact's kernel
libraries and plan (:mod:`.plan`) and the thread pool they run on (:mod:`.threads`). No compiler needed."""
