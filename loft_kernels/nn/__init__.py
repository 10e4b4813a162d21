"""Loft layers and the full-model view.

`LoftConv2d`, `LoftBatchNorm2d` and `LoftLinear` are drop-in subclasses of
their nn parents with an optional *active set* (a subset of filters computed
by the partial-conv kernels on the full-size tensors). Training does not need
them: a LoFT worker trains a compact sub-model of any model. They serve to
declare a partitionable layer explicitly in a model definition (discovery
honours it) and to run several workers' filters of one full-size layer in one
kernel launch. `full_view(model)` (alias `dense`) shows the full model whatever
state its layers are in.
"""
from .layers import LoftBatchNorm2d, LoftConv2d, activate, to_loft_layers
from .linear import LoftLinear
from .views import dense, full_view

__all__ = ["LoftConv2d", "LoftBatchNorm2d", "LoftLinear", "activate", "to_loft_layers", "full_view", "dense"]
