"""Lottery tickets: track filter rankings, detect when the ticket emerged, prune physically, rewind.

`FilterTracker` records per-filter importance at snapshots; `detect_emergence`
applies the footrule or Early-Bird criterion; `prune` draws the ticket and
returns a smaller plain model; `rewind` gives the pruned structure the
weights of another checkpoint; `count_params_flops` and `inference_speedup`
measure what pruning bought.
"""
from .draw import draw
from .emergence import detect_emergence
from .flops import count_params_flops, inference_speedup
from .prune import group_scores, prune, select_filters, slice_state_dict
from .rewind import rewind
from .tracker import DistanceSeries, FilterTracker, TrainingDiverged

__all__ = ["FilterTracker", "DistanceSeries", "TrainingDiverged", "detect_emergence", "prune", "group_scores", "select_filters",
           "slice_state_dict", "rewind", "count_params_flops", "inference_speedup", "draw"]
