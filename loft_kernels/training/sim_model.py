"""`sim.model`'s methods that the simulator replaces to reach its workers.

A `LoftSimulator`'s workers hold blocks and shared-layer copies cut from its
model, so converting that model (`_apply`: `.to()`, `.double()`, ...) or loading
a state dict into it must reach every worker too. The simulator puts these
callables into the model's `__dict__` (`LoftSimulator._attach`); a copy or pickle
of the model alone gets the class's own methods back.
"""
from __future__ import annotations

import types

from torch import nn


def plain_method(model: nn.Module, name: str):
    """The method `name` of `model`'s class bound to `model`: what it does without the simulator's replacement."""
    return types.MethodType(getattr(type(model), name), model)


class SimulatorMethod:
    """A method of `sim.model` that the simulator replaces (in the model's `__dict__`) to reach its workers.

    A copy or pickle of the model is an ordinary model again: it gets the class's own
    method back instead of this one and the simulator behind it (all S workers). A
    copy of the simulator attaches new ones to its own model.
    """

    _loft_attached = True  # see worker_model._Hook
    name = ""

    def __init__(self, sim):
        self.sim = sim

    def __reduce__(self):
        return plain_method, (self.sim.model, self.name)


class ConvertWorkers(SimulatorMethod):
    """`sim.model._apply`: convert the model (the masters) and every worker's own tensors with it."""

    name = "_apply"

    def __call__(self, fn, recurse: bool = True):
        model = self.sim.model
        plain_method(model, self.name)(fn, recurse)
        if recurse and self.sim.workers == 1:  # the one worker is a full copy of the model
            nn.Module._apply(self.sim.worker_models[0], fn)
        elif recurse:
            tensors = self.sim._plan.tensors(model)
            masters = {s.name: tensors[s.name] for s in self.sim._plan.slots}
            for opt in self.sim.optimizers:
                opt.worker.apply_shared(fn, masters)
        return model


class LoadIntoWorkers(SimulatorMethod):
    """`sim.model.load_state_dict`: load the model, then restart every worker's round from it.

    The workers' blocks and shared-layer copies were cut from the model when the round
    began; without a re-cut they would train on from the old values and the sync would
    write those back over the loaded ones. The workers' optimizer state is kept, as a
    plain `load_state_dict` keeps an optimizer's.
    """

    name = "load_state_dict"

    def __call__(self, state_dict, strict: bool = True, assign: bool = False):
        sim = self.sim
        if assign:
            raise RuntimeError("sim.model.load_state_dict(assign=True) would replace the tensors every worker's "
                               "blocks are cut from; load without assign (the values are copied in)")
        try:
            return plain_method(sim.model, self.name)(state_dict, strict=strict)
        finally:  # a load that raised may still have copied some entries
            full = sim.model.state_dict()
            for m in sim.worker_models:
                m.load_state_dict(full)
