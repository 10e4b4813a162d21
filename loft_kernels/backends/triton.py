"""The `triton` backend (placeholder until the kernels land)."""


def unavailable_reason():
    return "the Triton kernels are not written yet"
