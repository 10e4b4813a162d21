"""The `cuda` backend: CUDA C++ kernels from csrc/cuda, built into the extension only when torch has CUDA.

Kernels: filter_norms/filter_stats (one warp per row over the whole list),
footrule_matrix/mask_distance_matrix (one block per snapshot pair, ranks from
ATen's stable sort) and pack_rows/unpack_rows (one thread per element). The
convolutions are left to the `triton` backend on GPUs. Signatures match
`reference.py`.
"""
from __future__ import annotations

from .. import _ext
from . import register


def unavailable_reason() -> str | None:
    skipped = _ext.cuda_skip_reason()
    if skipped is not None:
        return skipped
    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if not _ext.load().with_cuda:
        return "the extension was built without its CUDA kernels"
    return None


def _kernels():
    return _ext.load().cuda


@register("filter_norms", "cuda")
def filter_norms(tensors):
    return _kernels().filter_norms(tensors)


@register("filter_stats", "cuda")
def filter_stats(a, b):
    return _kernels().filter_stats(a, b)


@register("footrule_matrix", "cuda")
def footrule_matrix(scores):
    return _kernels().footrule_matrix(scores)


@register("mask_distance_matrix", "cuda")
def mask_distance_matrix(scores, keep):
    return _kernels().mask_distance_matrix(scores, keep)


# Packing copies elements as opaque words, so every dtype works.
@register("pack_rows", "cuda", dtypes=None)
def pack_rows(tensors, indices, dims):
    return _kernels().pack_rows(tensors, indices, dims)


@register("unpack_rows", "cuda", dtypes=None)
def unpack_rows(flat, tensors, indices, dims):
    _kernels().unpack_rows(flat, tensors, indices, dims)
