"""loft_kernels: LoFT (filter-wise training for lottery tickets) for PyTorch, with fused kernels.

Kernel ops (loft_kernels.ops) run on the backend picked per call by
loft_kernels.backends; see `available_backends()`, `backend_choices()` and `use_backend()`.
"""
from .backends import available_backends, backend_choices, use_backend
from .ops import (
    filter_norms,
    filter_stats,
    footrule_matrix,
    grouped_partial_conv2d,
    mask_distance_matrix,
    pack_rows,
    partial_conv2d,
    pruned_count,
    unpack_rows,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends", "backend_choices", "use_backend",
    "partial_conv2d", "grouped_partial_conv2d", "filter_norms", "filter_stats", "footrule_matrix",
    "mask_distance_matrix", "pruned_count", "pack_rows", "unpack_rows",
]

from .io import CheckpointError, atomic_save, load_checkpoint

__all__ += ["atomic_save", "load_checkpoint", "CheckpointError"]

# --- LoFT training: nn layers, filter groups, model zoo (loft_kernels.training, loft_kernels.models) ---
from .models import (
    available_models,
    convnext_cifar,
    get_model,
    mobilenet_v2,
    preact_resnet,
    preact_resnet18,
    preact_resnet34,
    resnet,
    resnet18,
    resnet34,
    resnet50,
    vgg,
    vgg11,
    vgg16,
    wide_resnet,
)
from .training import (
    FilterGroup,
    GroupReport,
    LoftBatchNorm2d,
    LoftConv2d,
    LoftLinear,
    Member,
    activate,
    convert,
    dense,
    explain_groups,
    find_filter_groups,
    full_view,
    select_groups,
)

__all__ += ["LoftConv2d", "LoftBatchNorm2d", "LoftLinear", "activate", "full_view", "dense", "FilterGroup", "Member",
            "find_filter_groups", "explain_groups", "GroupReport", "select_groups", "convert",
            "get_model", "available_models", "preact_resnet", "preact_resnet18", "preact_resnet34", "resnet",
            "resnet18", "resnet34", "resnet50", "vgg", "vgg11", "vgg16", "wide_resnet", "mobilenet_v2",
            "convnext_cifar"]

# --- LoFT training: optimizer, simulator, comm accounting (loft_kernels.training) ---
from .training import (
    LoftOptimizer,
    LoftSimulator,
    loft_sync_bytes,
    partition,
    ring_all_gather_bytes,
    ring_all_reduce_bytes,
)

__all__ += ["LoftOptimizer", "LoftSimulator", "partition", "loft_sync_bytes", "ring_all_reduce_bytes",
            "ring_all_gather_bytes"]

# --- Lottery tickets: tracker, emergence, pruning, data (loft_kernels.tickets, loft_kernels.data) ---
from .data import BatchLoader, Dataset, get_dataset, write_fake_cifar
from .tickets import (
    FilterTracker,
    count_params_flops,
    detect_emergence,
    draw,
    inference_speedup,
    prune,
    rewind,
    select_filters,
)

__all__ += ["FilterTracker", "detect_emergence", "prune", "draw", "rewind", "select_filters", "count_params_flops",
            "inference_speedup", "get_dataset", "Dataset", "BatchLoader", "write_fake_cifar"]

# --- Communication model (loft_kernels.comm_model) ---
from .comm_model import CommCost, comm_cost

__all__ += ["comm_cost", "CommCost"]

# --- Fault tolerance: elastic checkpoint sets for torchrun restarts (loft_kernels.elastic) ---
from .elastic import ElasticCheckpoint  # noqa: E402

__all__ += ["ElasticCheckpoint"]
