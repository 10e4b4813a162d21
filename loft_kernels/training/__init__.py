"""LoFT training: filter groups, the worker model, and the optimizer/simulator built on them.

The Loft layers live in loft_kernels.nn (training does not need them); they are re-exported here for the
import paths that predate that package.
"""
from ..filter_group import FilterGroup, Member, resolve_groups
from ..nn import LoftBatchNorm2d, LoftConv2d, LoftLinear, activate, dense, full_view
from .groups import GroupReport, convert, explain_groups, find_filter_groups, select_groups

__all__ = ["LoftConv2d", "LoftBatchNorm2d", "LoftLinear", "activate", "dense", "full_view",
           "FilterGroup", "Member", "resolve_groups", "find_filter_groups", "explain_groups", "GroupReport",
           "select_groups", "convert"]

# LoFT optimizer, simulator, partition and communication accounting
from .comm import loft_sync_bytes, ring_all_gather_bytes, ring_all_reduce_bytes
from .optimizer import LoftOptimizer
from .partition import partition
from .simulator import LoftSimulator
from .worker_model import WorkerModel

__all__ += ["LoftOptimizer", "LoftSimulator", "WorkerModel", "partition", "loft_sync_bytes", "ring_all_reduce_bytes",
            "ring_all_gather_bytes"]
