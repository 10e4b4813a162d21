"""LoFT training: Loft layers, filter groups, and the optimizer/simulator built on them."""
from ..filter_group import FilterGroup, Member, resolve_groups
from .groups import (
                     GroupReport,
                     ParameterShare,
                     convert,
                     explain_groups,
                     find_filter_groups,
                     parameter_share,
                     select_groups,
)
from .layers import LoftBatchNorm2d, LoftConv2d, activate, dense
from .linear import LoftLinear

__all__ = ["LoftConv2d", "LoftBatchNorm2d", "LoftLinear", "activate", "dense",
           "FilterGroup", "Member", "resolve_groups", "find_filter_groups", "explain_groups", "GroupReport",
           "select_groups", "convert", "ParameterShare", "parameter_share"]

# LoFT optimizer, simulator, partition and communication accounting
from .comm import loft_sync_bytes, ring_all_gather_bytes, ring_all_reduce_bytes
from .optimizer import LoftOptimizer
from .partition import partition
from .simulator import LoftSimulator

__all__ += ["LoftOptimizer", "LoftSimulator", "partition", "loft_sync_bytes", "ring_all_reduce_bytes",
            "ring_all_gather_bytes"]
