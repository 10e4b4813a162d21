"""LoFT training: Loft layers, filter groups, and the optimizer/simulator built on them."""
from .layers import LoftBatchNorm2d, LoftConv2d, activate, dense

__all__ = ["LoftConv2d", "LoftBatchNorm2d", "activate", "dense"]
