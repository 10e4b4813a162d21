"""The `cuda` backend: CUDA C++ kernels from csrc/cuda, built only when torch has CUDA."""
import torch


def unavailable_reason():
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return "the CUDA extension is not built yet"
