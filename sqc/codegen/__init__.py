"""Kernel generation (TVM, imported lazily): CPU and CUDA kernels, the build cache, tuning."""
