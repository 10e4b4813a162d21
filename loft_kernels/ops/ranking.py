"""Filter-ranking distances between snapshots: LoFT's footrule and Early-Bird's mask distance.

`scores` is a list of L tensors [T, n_l]: the importance of each of a layer's
n_l filters at T snapshots (higher = more important). Rank 1 is the highest
score; ties go to the lower filter index.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks as C
from ..backends import dispatch


def pruned_count(n: int, ratio: float) -> int:
    """How many of n filters a pruning ratio removes: floor(ratio * n).

    A relative tolerance of 1e-12 absorbs the rounding of the float product
    (0.29 * 100 is 28.999... in binary and must prune 29; 1/3 of 3 prunes 1),
    and no more (1 - 1e-10 of 7 prunes 6, not all 7). Every part of the library
    that turns a ratio into a count calls this.
    """
    n = C.non_negative_int(n, "n")
    ratio = C.ratio(ratio)
    return math.floor(ratio * n * (1 + 1e-12))


@torch.library.custom_op("loft_kernels::footrule_matrix", mutates_args=())
def _footrule_op(scores: list[Tensor]) -> Tensor:
    if not C.arguments_checked():  # a direct torch.ops call skips the public function's checks
        scores = _check_scores(scores, values=_on_cpu(scores))
    return dispatch("footrule_matrix", scores[0], scores)


@_footrule_op.register_fake
def _(scores):
    T = scores[0].shape[0]
    return scores[0].new_empty((len(scores), T, T), dtype=torch.float32)


@torch.library.custom_op("loft_kernels::mask_distance_matrix", mutates_args=())
def _mask_distance_op(scores: list[Tensor], keep: list[int]) -> Tensor:
    if not C.arguments_checked():
        scores = _check_scores(scores, values=_on_cpu(scores))
    if len(keep) != len(scores) or any(not 0 <= k <= s.shape[1] for k, s in zip(keep, scores)):
        raise ValueError(f"keep must hold one count in 0..n per scores tensor, got {list(keep)}")
    return dispatch("mask_distance_matrix", scores[0], scores, keep)


def _on_cpu(scores) -> bool:
    """The finite-values check reads the values: a host sync per call on a GPU, where the op skips it."""
    return isinstance(scores, (list, tuple)) and bool(scores) and isinstance(scores[0], Tensor) and \
        scores[0].device.type == "cpu"


@_mask_distance_op.register_fake
def _(scores, keep):
    T = scores[0].shape[0]
    return scores[0].new_empty((len(scores), T, T), dtype=torch.float32)


def _check_scores(scores, values: bool = True) -> list[Tensor]:
    scores = C.tensor_list(scores, "scores", floating=True)
    T = None
    for i, s in enumerate(scores):
        if s.dim() != 2:
            raise ValueError(f"scores[{i}] must be 2-D [T snapshots, n filters], got shape {tuple(s.shape)}")
        C.same_device_dtype(scores[0], "scores[0]", s, f"scores[{i}]")
        if s.shape[0] == 0 or s.shape[1] == 0:
            raise ValueError(f"scores[{i}] must have at least one snapshot and one filter, got shape {tuple(s.shape)}")
        if T is None:
            T = s.shape[0]
        elif s.shape[0] != T:
            raise ValueError(f"every scores[i] must have the same number of snapshots; scores[0] has {T}, "
                             f"scores[{i}] has {s.shape[0]}")
        if values and not torch.compiler.is_compiling() and not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{i}] contains NaN or infinite values")
    return [s.detach().contiguous() for s in scores]


def footrule_matrix(scores: list[Tensor]) -> Tensor:
    """[L, T, T] float32: M[l, a, b] = sum_i (1/i) |ln i - ln sigma(i)|.

    i runs over the ranks at snapshot a, sigma(i) is the rank at snapshot b of
    the filter ranked i at a. M[l, a, a] = 0; M is not symmetric.
    """
    scores = _check_scores(scores)
    with C.checked_arguments():
        return _footrule_op(scores)


def mask_distance_matrix(scores: list[Tensor], ratio: float) -> Tensor:
    """[L, T, T] float32: fraction of filters whose keep/prune bit differs between snapshots.

    At each snapshot the top `n - floor(ratio * n)` filters are kept (Early-Bird).
    """
    ratio = C.ratio(ratio)
    scores = _check_scores(scores)
    keep = [s.shape[1] - pruned_count(s.shape[1], ratio) for s in scores]
    with C.checked_arguments():
        return _mask_distance_op(scores, keep)
