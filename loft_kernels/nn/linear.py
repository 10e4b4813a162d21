"""LoftLinear: nn.Linear that can run on an active subset of output and input features.

A Linear is a filter group's producer (its output features are the filters)
or consumer (its input features are), as in the MLP of a transformer, Mixer
or ConvNeXt block. Like LoftConv2d it is a drop-in subclass (same constructor,
same state_dict) whose gradients land in the full-size parameters, zero
outside the active block, so any optimizer sees ordinary parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .active import ActiveInOut


class LoftLinear(ActiveInOut, nn.Linear):
    """nn.Linear with optional active output features / input features.

    `set_active(out_index, in_index)`: the forward then equals
    `F.linear(x, weight[out_index][:, in_index], bias[out_index])`, where x has
    len(in_index) features in its last dim. The weight block is gathered with
    index_select, whose backward scatters into a zero full-size gradient.
    """

    def set_active(self, out_index: Optional[Tensor] = None, in_index: Optional[Tensor] = None) -> None:
        """Restrict to output features `out_index` and input features `in_index` (None = all)."""
        self._set_active(out_index, in_index, self.out_features, self.in_features)

    def forward(self, input: Tensor) -> Tensor:
        if self._active_out is None and self._active_in is None:
            return super().forward(input)
        return _active_linear(input, self.weight, self.bias, self.in_features, self._active_out, self._active_in)


def _active_linear(input, weight, bias, in_features, out_idx, in_idx):
    # One call for torch.fx (wrapped below): symbolic tracing records it, the active set as a constant.
    expected = in_features if in_idx is None else in_idx.numel()
    if input.dim() == 0 or input.shape[-1] != expected:
        raise ValueError(f"input must have {expected} features in its last dim (the active input features), "
                         f"got shape {tuple(input.shape)}")
    weight = weight if out_idx is None else weight.index_select(0, out_idx)
    weight = weight if in_idx is None else weight.index_select(1, in_idx)
    if bias is not None and out_idx is not None:
        bias = bias.index_select(0, out_idx)
    return F.linear(input, weight, bias)


torch.fx.wrap("_active_linear")
