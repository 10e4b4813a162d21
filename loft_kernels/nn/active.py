"""The active-set half of the Loft layers: which output and input channels a full-size layer computes.

LoftConv2d and LoftLinear share it. Indices are validated once, when set, and
kept as private copies, so a caller editing its tensor afterwards cannot slip
unchecked (e.g. duplicate) indices into the kernels.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _checks as C
from .views import refuse_active_sets, refuse_scripting


class ActiveInOut:
    """Mixin for an nn layer with `weight` [out, in, ...]: optional active output / input index sets."""

    # Class-level defaults keep the nn parent's __init__ (and state_dict) untouched, and let `convert`
    # turn an existing layer into its Loft subclass by swapping its class.
    _active_out: Optional[Tensor] = None
    _active_in: Optional[Tensor] = None

    @property
    def active_out(self) -> Optional[Tensor]:
        """A copy of the active output filters (None = all): editing it does not change the layer."""
        return None if self._active_out is None else self._active_out.clone()

    @property
    def active_in(self) -> Optional[Tensor]:
        """A copy of the active input channels (None = all)."""
        return None if self._active_in is None else self._active_in.clone()

    __prepare_scriptable__ = refuse_scripting

    def _set_active(self, out_index: Optional[Tensor], in_index: Optional[Tensor], out_size: int,
                    in_size: int) -> None:
        if out_index is not None or in_index is not None:
            refuse_active_sets(self)
        dev = self.weight.device
        out_index = None if out_index is None else C.index(out_index, "out_index", out_size, dev).clone()
        in_index = None if in_index is None else C.index(in_index, "in_index", in_size, dev).clone()
        self._active_out, self._active_in = out_index, in_index  # both checked first: a refused call changes nothing
