"""The kernel ops: public functions with argument checks, registered as torch custom ops."""
from .filter_stats import filter_norms, filter_stats
from .packing import pack_rows, unpack_rows
from .partial_conv import grouped_partial_conv2d, partial_conv2d
from .ranking import footrule_matrix, mask_distance_matrix, pruned_count

__all__ = ["partial_conv2d", "grouped_partial_conv2d", "filter_norms", "filter_stats", "footrule_matrix",
           "mask_distance_matrix", "pruned_count", "pack_rows", "unpack_rows"]
