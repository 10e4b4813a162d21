"""The `cpu` backend: C++/OpenMP kernels from csrc/cpu (placeholder until the extension lands)."""


def unavailable_reason():
    return "the C++ extension is not built yet"
