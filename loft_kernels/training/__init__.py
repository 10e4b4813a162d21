"""LoFT training: Loft layers, filter groups, and the optimizer/simulator built on them."""
from .groups import FilterGroup, convert, find_filter_groups, select_groups
from .layers import LoftBatchNorm2d, LoftConv2d, activate, dense

__all__ = ["LoftConv2d", "LoftBatchNorm2d", "activate", "dense",
           "FilterGroup", "find_filter_groups", "select_groups", "convert"]

# LoFT optimizer, simulator, partition and communication accounting
from .comm import loft_sync_bytes, ring_all_gather_bytes, ring_all_reduce_bytes
from .optimizer import LoftOptimizer
from .partition import partition
from .simulator import LoftSimulator

__all__ += ["LoftOptimizer", "LoftSimulator", "partition", "loft_sync_bytes", "ring_all_reduce_bytes",
            "ring_all_gather_bytes"]
