"""Communication cost of training with S workers: LoFT against DDP, local SGD and GPipe, in bytes.

`comm_cost(model, example_input, method, workers, batch_size, samples)` counts
the bytes one training run moves between its S workers, for `samples`
training samples in total over all workers (epochs x dataset size):

- ``ddp``: an all_reduce of all gradients every step;
- ``localsgd``: an all_reduce of all parameters every `sync_every` steps;
- ``loft``: one LoFT sync every `sync_every` steps, bytes from
  `training.comm.loft_sync_bytes` (the function the optimizer's `comm_stats()`
  is built on, so the model and a real run agree by construction);
- ``gpipe``: the model cut into S pipeline stages; every sample sends its
  activation forward and its activation gradient backward across each of the
  S - 1 cuts. Activation sizes are measured with forward hooks on the real model.

Data-parallel methods (ddp, localsgd, loft) take `batch_size` samples per
worker per step, so a run has ceil(samples / (workers * batch_size)) steps and
ceil(steps / sync_every) syncs (the last, partial round syncs at finalize).
Collectives use the ring model of `comm_stats` (all_reduce: each rank sends
2 (S-1)/S of the buffer; all_gather: (S-1)/S of the gathered total).

Two numbers come back. `total_bytes`: every byte put on the wire counted
once, i.e. the sum over ranks of bytes sent (equal to the sum of bytes
received); this is what the paper's table reports (its GPipe-4 / GPipe-2 =
3.50 is the ratio of summed boundary activations). `per_rank_bytes`: what the
busiest rank sends; for the ring collectives every rank sends this much and
receives as much, and for ``loft`` it equals a rank's
`comm_stats()["bytes_sent"]`. See docs/comm_model.md.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from . import _checks as C
from .nn import full_view
from .nn.views import training_mode
from .training.comm import STATES, loft_sync_bytes, ring_all_reduce_bytes
from .training.groups import FilterGroup, find_filter_groups, select_groups

METHODS = ("loft", "ddp", "localsgd", "gpipe")
BALANCES = ("stages", "params")


@dataclass(frozen=True)
class CommCost:
    """Bytes moved by one training run (see the module docstring for both definitions)."""
    method: str
    workers: int
    total_bytes: int  # sum over ranks of bytes sent: each byte on the wire once
    per_rank_bytes: int  # bytes the busiest rank sends
    events: int  # how often the traffic happens: steps (ddp), syncs (loft, localsgd), samples (gpipe)
    details: dict = field(default_factory=dict)

    def __int__(self) -> int:
        return self.total_bytes


def comm_cost(model: nn.Module, example_input: torch.Tensor, method: str, workers: int, batch_size: int,
              samples: int, sync_every: int = 15, state: str = "reset", balance: str = "stages", *,
              groups: Optional[Sequence[FilterGroup]] = None, policy: str = "all",
              state_per_param: int = 1) -> CommCost:
    """Bytes `method` moves training `model` on `workers` workers over `samples` samples.

    example_input: one batch of the training inputs (any batch size; activations
    are measured per sample). batch_size: samples per worker per step.
    sync_every (K): steps between syncs of loft and localsgd. state: the LoFT
    optimizer-state mode ("reset" or "keep"; "keep" also moves `state_per_param`
    state tensors per parameter, 1 for SGD with momentum, 2 for Adam).
    balance: GPipe stage cuts, "stages" (the model's natural stages grouped
    evenly over the workers) or "params" (cuts between blocks balancing
    parameter counts). groups: LoFT's filter groups (default: those `policy`,
    "all" or "paper", selects from `find_filter_groups`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    C.tensor(example_input, "example_input", floating=True)
    if example_input.dim() < 2 or example_input.shape[0] < 1:
        raise ValueError(f"example_input must be a batch [N, ...] with N >= 1, got shape {tuple(example_input.shape)}")
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {METHODS}, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    workers = C.positive_int(workers, "workers")
    batch_size = C.positive_int(batch_size, "batch_size")
    samples = C.positive_int(samples, "samples")
    sync_every = C.positive_int(sync_every, "sync_every")
    if not isinstance(state, str) or state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    if not isinstance(balance, str) or balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")

    steps = math.ceil(samples / (workers * batch_size))
    syncs = math.ceil(steps / sync_every)
    if method == "gpipe":
        return _gpipe(model, example_input, workers, samples, balance)
    if method == "loft":
        if groups is None:
            groups = select_groups(find_filter_groups(model, example_input), policy, model=model)
        per_sync = loft_sync_bytes(model, groups, workers, state, state_per_param=state_per_param)
        return _collective(method, workers, syncs, per_sync["bytes_sent"],
                           {"steps": steps, "syncs": syncs, "per_sync": per_sync, "groups": [g.name for g in groups]})
    params = [p for p in model.parameters() if p.requires_grad or method == "localsgd"]
    if not params:
        raise ValueError(f"model has no {'trainable ' if method == 'ddp' else ''}parameters to all_reduce")
    per_dtype: dict[torch.dtype, int] = {}
    for p in params:  # one flat buffer per dtype (what bucketed all_reduce implementations send)
        per_dtype[p.dtype] = per_dtype.get(p.dtype, 0) + p.numel() * p.element_size()
    per_event = sum(ring_all_reduce_bytes(b, workers) for b in per_dtype.values())
    if method == "ddp":
        details = {"steps": steps, "gradient_bytes": sum(per_dtype.values()), "per_step_rank_bytes": per_event}
        return _collective(method, workers, steps, per_event, details)
    details = {"steps": steps, "syncs": syncs, "parameter_bytes": sum(per_dtype.values()),
               "per_sync_rank_bytes": per_event}
    return _collective(method, workers, syncs, per_event, details)


def _collective(method: str, workers: int, events: int, per_event_rank: int, details: dict) -> CommCost:
    """Symmetric collectives: every rank sends per_event_rank bytes per event."""
    per_rank = events * per_event_rank
    return CommCost(method, workers, workers * per_rank, per_rank, events, details)


# ------------------------------------------------------------------ GPipe ----
@dataclass
class _Unit:
    name: str
    params: int
    in_bytes: int  # per sample: what crosses a cut placed just before this unit
    out_spatial: Optional[int]  # H * W of a 4-D output, None otherwise


def _chain_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose calls form the pipeline chain: children, containers opened up recursively."""
    out = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                visit(f"{prefix}{name}.", child)
            else:
                out.append((f"{prefix}{name}", child))
    visit("", model)
    return out


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module):
    """Run the model without touching BN statistics or autograd; restore every train flag after."""
    with training_mode(model, False), torch.no_grad(), full_view(model):
        yield


def _units(model: nn.Module, example_input: torch.Tensor) -> list[_Unit]:
    """The chain units in call order with their per-sample input bytes, measured by forward hooks."""
    n = example_input.shape[0]
    seen: dict[str, list] = {}
    order: list[str] = []
    candidates = _chain_candidates(model)

    def hook(name):
        def fn(module, args, output):
            seen.setdefault(name, []).append((args, output))
            order.append(name)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in candidates]
    try:
        with _eval_no_grad(model):
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    modules = dict(candidates)
    units = []
    for name in order:
        calls = seen[name]
        if len(calls) != 1:
            raise ValueError(f"model: module {name!r} runs {len(calls)} times in one forward; the GPipe model "
                             f"needs a chain of modules that each run once")
        args, output = calls[0]
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(f"model: module {name!r} does not take a tensor as its first input; the GPipe "
                             f"model cuts between modules that pass one tensor along")
        x = args[0]
        if x.shape[0] != n:
            raise ValueError(f"model: the input of module {name!r} has batch size {x.shape[0]}, not the "
                             f"example_input's {n}; activation sizes per sample are undefined")
        spatial = int(output.shape[2] * output.shape[3]) if isinstance(output, torch.Tensor) and \
            output.dim() == 4 else None
        params = sum(p.numel() for p in modules[name].parameters())
        units.append(_Unit(name, params, x.numel() // n * x.element_size(), spatial))
    if not units:
        raise ValueError("model has no child modules to cut into pipeline stages")
    return units


def natural_stages(units: Sequence[_Unit]) -> list[int]:
    """Stage index of every unit: a stage starts where a unit with parameters lowers the resolution.

    So a ResNet splits between its stages (the stem joins stage 1, the head the
    last stage) and a VGG after each max-pool (parameter-free units stay with
    the stage before them).
    """
    stage, resolution, out = 0, None, []
    for u in units:
        if u.out_spatial is not None and u.params > 0:
            if resolution is None:
                resolution = u.out_spatial
            elif u.out_spatial < resolution:
                stage, resolution = stage + 1, u.out_spatial
        out.append(stage)
    return out


def _cuts_by_stages(units: Sequence[_Unit], workers: int) -> list[int]:
    """Unit indices that start devices 1..S-1: the R natural stages grouped evenly (device d gets floor(dR/S)..)."""
    stage_of = natural_stages(units)
    n_stages = stage_of[-1] + 1
    if workers > n_stages:
        raise ValueError(f"workers={workers} but the model has only {n_stages} natural stage(s); use "
                         f"balance='params' to cut between blocks")
    first = {}
    for i, s in enumerate(stage_of):
        first.setdefault(s, i)
    return [first[d * n_stages // workers] for d in range(1, workers)]


def _cuts_by_params(units: Sequence[_Unit], workers: int) -> list[int]:
    """Cuts between units minimising the largest stage's parameter count (ties: fewer bytes, then earlier)."""
    n = len(units)
    if workers > n:
        raise ValueError(f"workers={workers} but the model has only {n} modules to cut between")
    prefix = [0]
    for u in units:
        prefix.append(prefix[-1] + u.params)
    # best[k][j]: (largest stage params, crossing bytes) of units[:j] in k stages; arg[k][j]: start of the last
    inf = (math.inf, math.inf)
    best = [[inf] * (n + 1) for _ in range(workers + 1)]
    arg = [[0] * (n + 1) for _ in range(workers + 1)]
    for j in range(1, n + 1):
        best[1][j] = (prefix[j], 0)
    for k in range(2, workers + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                cand = (max(prev[0], prefix[j] - prefix[i]), prev[1] + units[i].in_bytes)
                if cand < best[k][j]:
                    best[k][j], arg[k][j] = cand, i
    cuts, j = [], n
    for k in range(workers, 1, -1):
        j = arg[k][j]
        cuts.append(j)
    return cuts[::-1]


def _gpipe(model: nn.Module, example_input: torch.Tensor, workers: int, samples: int, balance: str) -> CommCost:
    units = _units(model, example_input)
    if workers == 1:
        cuts = []
    else:
        cuts = _cuts_by_stages(units, workers) if balance == "stages" else _cuts_by_params(units, workers)
    boundary = [units[i].in_bytes for i in cuts]
    bounds = [0] + cuts + [len(units)]
    stages = [[u.name for u in units[a:b]] for a, b in zip(bounds, bounds[1:])]
    # device d sends its output forward (cut d) and the gradient of its input backward (cut d-1)
    sent = [(boundary[d] if d < workers - 1 else 0) + (boundary[d - 1] if d > 0 else 0) for d in range(workers)]
    details = {"balance": balance, "stages": stages, "cut_before": [units[i].name for i in cuts],
               "boundary_bytes_per_sample": boundary,
               "stage_params": [sum(u.params for u in units[a:b]) for a, b in zip(bounds, bounds[1:])]}
    return CommCost("gpipe", workers, 2 * sum(boundary) * samples, max(sent) * samples, samples, details)
