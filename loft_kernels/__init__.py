"""loft_kernels: LoFT (filter-wise training for lottery tickets) for PyTorch, with fused kernels.

Kernel ops (loft_kernels.ops) run on the backend picked per call by
loft_kernels.backends; see `available_backends()` and `use_backend()`.
"""
from .backends import available_backends, use_backend
from .ops import (filter_norms, filter_stats, footrule_matrix, grouped_partial_conv2d, mask_distance_matrix,
                  pack_rows, partial_conv2d, pruned_count, unpack_rows)

__version__ = "0.1.0"

__all__ = [
    "available_backends", "use_backend",
    "partial_conv2d", "grouped_partial_conv2d", "filter_norms", "filter_stats", "footrule_matrix",
    "mask_distance_matrix", "pruned_count", "pack_rows", "unpack_rows",
]

from .io import atomic_save, load_checkpoint

__all__ += ["atomic_save", "load_checkpoint"]

# --- LoFT training: nn layers, filter groups, model zoo (loft_kernels.training, loft_kernels.models) ---
from .training import LoftBatchNorm2d, LoftConv2d, activate, dense

__all__ += ["LoftConv2d", "LoftBatchNorm2d", "activate", "dense"]

# --- LoFT training: optimizer, simulator, comm accounting (loft_kernels.training) ---

# --- Lottery tickets: tracker, emergence, pruning, data (loft_kernels.tickets, loft_kernels.data) ---

# --- Communication model (loft_kernels.comm_model) ---
