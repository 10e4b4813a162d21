"""P8: the simulator's executions (loop, batched, auto) against one dense step; auto's regret; memory.

P8t: one `LoftSimulator` step of all S workers (PreActResNet-18, batch 32 per
worker, SGD, no sync), S = 2, 4, 8, in each execution, interleaved with one
dense step of the same model on 32 samples: the work of S workers is about
one dense step's FLOPs, so one dense step is the floor. Rows: auto / loop
(auto must never be more than 3 % slower) and, as notes, every execution's
ratio to the dense step. P8r: auto's regret per convolution: both forms of
every distinct conv shape of PreActResNet-18 and ResNet-50 (CIFAR stems) timed
afresh, forward + backward, against the form auto stored for it; the row is
the worst (time of the chosen form / time of the faster form). P8m: exact
bytes of one step (parameters and masters, gradients, optimizer state, tensors
saved for backward) of each execution and of the dense step. P8g / P8v: the
goals for a GPU, run on any device (bfloat16 autocast on CUDA, float32
elsewhere): the S = 4 batched step against one dense step, and against the
obvious batched baseline, the S sliced sub-models stacked and run with
`torch.func.vmap`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import tempfile
from unittest import mock

import torch
import torch.nn.functional as F

from ..models import preact_resnet, preact_resnet18, resnet50
from ..tickets import prune
from ..training import execution_choice as choice
from ..training.batched import _Conv
from ..training.groups import convert
from ..training.simulator import LoftSimulator
from .case_step import saved_bytes
from .result import Config, Result, Spec, failed, timed, valued
from .shapes import BATCH, RESOLUTION
from .timing import interleaved

SIZES = (2, 4, 8)
EXECUTIONS = ("loop", "batched", "auto")
NEVER = 1 << 30

P8 = tuple(Spec(f"P8t{s}", f"LoftSimulator S={s} step, execution auto", "execution loop", 1.03, "ratio <= 1.03")
           for s in SIZES) + (
    Spec("P8r", "auto's choice per conv (PreActResNet-18, ResNet-50 shapes, S=2/4/8)", "the faster form",
         1.05, "worst ratio <= 1.05"),
    Spec("P8m", "batched step bytes, S=4", "loop step bytes", 1.5, "ratio <= 1.5"),
    # goals set for a GPU (bfloat16 autocast there; float32 on a CPU, where they are not expected to hold)
    Spec("P8g", "LoftSimulator S=4 step, execution batched", "one dense step", 1.25, "ratio <= 1.25 (GPU goal)"),
    Spec("P8v", "LoftSimulator S=4 step, execution batched", "torch.func.vmap over the S sliced sub-models",
         1 / 1.3, "ratio <= 0.77, 1.3x faster (GPU goal)"),
)
_sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)


QUICK_WIDTH, QUICK_BATCH = 0.25, 8  # --quick: a quarter-width network, 8 samples per worker
QUICK_SHAPES = 6  # --quick: about this many of the distinct conv shapes for the regret row


def cfg_width(cfg: Config) -> float:
    return QUICK_WIDTH if cfg.quick else 1.0


def _n(cfg: Config) -> int:
    return QUICK_BATCH if cfg.quick else BATCH


def _batch(device, n=BATCH):
    return torch.randn(n, 3, RESOLUTION, RESOLUTION, device=device), torch.randint(0, 10, (n,), device=device)


def _sims(workers: int, cfg: Config, executions=EXECUTIONS):
    """One simulator per execution over the same PreActResNet-18, the dense model, and the filter groups."""
    device = cfg.device
    torch.manual_seed(0)
    dense = preact_resnet(num_classes=10, width=cfg_width(cfg)).to(device).train()
    full, groups = convert(copy.deepcopy(dense), torch.randn(2, 3, RESOLUTION, RESOLUTION, device=device))
    sims = {e: LoftSimulator(copy.deepcopy(full), groups, _sgd, workers, NEVER, execution=e) for e in executions}
    for sim in sims.values():
        sim.model.train()
    return sims, dense, groups


def _sim_step(sim, device, n, autocast=contextlib.nullcontext):
    """A setup for `interleaved`: one step of all the simulator's workers, each on a fresh batch of n samples."""
    def setup():
        batches = [_batch(device, n) for _ in range(sim.workers)]

        def run():
            with autocast():
                sim.step(batches, F.cross_entropy)
        return run
    return setup


def _dense_step(dense, opt, device, n, autocast=contextlib.nullcontext):
    """A setup for `interleaved`: one SGD step of the dense model on a fresh batch of n samples."""
    def setup():
        x, y = _batch(device, n)

        def run():
            opt.zero_grad()
            with autocast():
                loss = F.cross_entropy(dense(x), y)
            loss.backward()
            opt.step()
        return run
    return setup


def step_bytes(run, params, optimizers, grads_of) -> dict:
    """Exact bytes of one step `run()`: parameters, gradients, optimizer state, tensors saved for backward."""
    saved = saved_bytes(run)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"parameters": nbytes(params), "gradients": grads_of(),
            "optimizer_state": nbytes(v for o in optimizers for st in o.state.values() for v in st.values()
                                      if torch.is_tensor(v)),
            "saved_for_backward": saved}


def _sim_bytes(sim, device, n) -> dict:
    grads = [0]

    def run():  # the gradients are counted just before the workers step and drop them
        for opt in sim.optimizers:
            opt.register_step_pre_hook(lambda o, a, k: grads.__setitem__(0, grads[0] + sum(
                p.grad.numel() * p.grad.element_size() for g in o.param_groups for p in g["params"]
                if p.grad is not None)))
        sim.step([_batch(device, n) for _ in range(sim.workers)], F.cross_entropy)
    params = list(sim.model.parameters()) + [p for m in sim.worker_models for p in m.parameters()]
    return step_bytes(run, params, sim.optimizers, lambda: grads[0])


def _dense_bytes(dense, device, n) -> dict:
    opt = _sgd(dense.parameters())

    def run():
        x, y = _batch(device, n)
        opt.zero_grad()
        F.cross_entropy(dense(x), y).backward()
        opt.step()
    return step_bytes(run, list(dense.parameters()), [opt],
                      lambda: sum(p.grad.numel() * p.grad.element_size() for p in dense.parameters()))


def _time_row(spec: Spec, workers: int, cfg: Config) -> Result:
    dev, n = cfg.device, _n(cfg)
    sims, dense, _ = _sims(workers, cfg)
    sims["auto"].step([_batch(dev, n) for _ in range(workers)], F.cross_entropy)  # auto measures its choices
    reps = cfg.reps(full=10, quick=2)  # auto and loop run the same code where auto chose the loop: noise decides
    t = interleaved({**{e: _sim_step(sims[e], dev, n) for e in EXECUTIONS},
                     "dense": _dense_step(dense, _sgd(dense.parameters()), dev, n)}, reps, warmup=cfg.warmup,
                    device=dev)
    vs_dense = {e: round(t.ratio(e, "dense"), 3) for e in EXECUTIONS}
    chosen = sims["auto"].execution_choices()
    stacked = sorted(n for n, c in chosen.items() if choice.STACKED in c.values())
    runs = "the loop" if sims["auto"]._loop_signatures else "the batched network"
    return timed(spec, t, "auto", "loop",
                 note="to one dense step: " + ", ".join(f"{e} {r:.2f}x" for e, r in vs_dense.items())
                      + f"; auto runs {runs}, its convs {len(stacked)} of {len(chosen)} stacked"
                      + (f" (width {cfg_width(cfg)}, batch {_n(cfg)} per worker)" if cfg.quick else ""),
                 vs_dense=vs_dense, choices=chosen)


def _conv_shapes(device) -> list[tuple]:
    """Distinct (c_in, c_out, k, stride, padding, size) of every conv of PreActResNet-18 and ResNet-50."""
    shapes = {}
    for model in (preact_resnet18(), resnet50()):
        def hook(m, inp, out):
            shapes[(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                    inp[0].shape[-1])] = None
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, RESOLUTION, RESOLUTION))
        for h in handles:
            h.remove()
    return list(shapes)


def _regret_row(cfg: Config) -> Result:
    dev = cfg.device
    batch = 2 if cfg.quick else BATCH
    worst, where, table = 1.0, "", []
    shapes = _conv_shapes(dev)
    if cfg.quick:  # an even sample of the distinct shapes
        shapes = shapes[::max(1, len(shapes) // QUICK_SHAPES)]
    reps = cfg.reps(full=3 * choice.REPEATS, quick=3)
    with tempfile.TemporaryDirectory() as private, \
            mock.patch.dict(os.environ, {choice.ENV_VAR: private}):  # auto decides now, not from an old entry
        for workers in SIZES:
            for c_in, c_out, k, stride, pad, size in shapes:
                mods = [torch.nn.Conv2d(c_in, c_out, k, stride, pad, bias=False).to(dev) for _ in range(workers)]
                conv = _Conv(mods, "", auto=True)
                x = torch.randn(batch, workers * c_in, size, size, device=dev)
                conv(x)  # auto measures and chooses
                how = next(iter(conv.chosen.values()))
                other = choice.LOOP if how == choice.STACKED else choice.STACKED
                setups = choice.conv_setups(x, [m.weight for m in mods], [None] * workers,
                                            {choice.STACKED: conv._stacked, choice.LOOP: conv._loop})
                fresh = interleaved(setups, reps, warmup=choice.WARMUP, device=dev)  # independent and longer
                ratio = max(1.0, fresh.ratio(how, other))
                table.append({"S": workers, "shape": [c_in, c_out, k, stride, size], "chose": how,
                              "ms": {name: fresh.median(name) for name in (choice.STACKED, choice.LOOP)},
                              "regret": ratio})
                if ratio > worst:
                    worst, where = ratio, f"S={workers} {c_in}->{c_out} k{k} s{stride} @{size}"
    return valued(P8[3], worst, 1.0, unit="", note=f"{len(shapes)} distinct conv shapes x S = 2/4/8, batch {batch} per "
                                          f"worker, each re-timed {reps} times; worst at {where or 'none'}",
                  convs=table)


def _memory_row(cfg: Config) -> Result:
    dev, n = cfg.device, _n(cfg)
    out = {}
    for workers in SIZES:
        sims, dense, _ = _sims(workers, cfg, executions=("loop", "batched"))
        out[workers] = {e: _sim_bytes(sims[e], dev, n) for e in ("loop", "batched")}
        out[workers]["dense"] = _dense_bytes(dense, dev, n)
    total = lambda d: sum(d.values())  # noqa: E731
    note = ("(quick: width 0.25, batch 8) " if cfg.quick else "") + "; ".join(f"S={s}: " + ", ".join(f"{e} {total(v) / 2**20:.0f} MiB" for e, v in out[s].items())
                     for s in SIZES)
    return valued(P8[4], total(out[4]["batched"]), total(out[4]["loop"]), unit="bytes", note=note,
                  bytes=out)


def _vmap_step(sim: LoftSimulator, groups, n: int, device, autocast=contextlib.nullcontext):
    """The obvious batched baseline: the S workers' sub-models as plain sliced networks (the full model pruned to
    each worker's filters of round 0), stacked with `torch.func.stack_module_state` and run as one `vmap`ped
    functional call, forward + backward into the stacked parameters (BatchNorm on batch statistics, running
    statistics not tracked, which vmap cannot update in place). Needs S equal-sized workers."""
    owned = sim.partition(0)
    models = []
    for s in range(sim.workers):
        scores = {g.name: torch.zeros(g.n).index_fill_(0, owned[g.name][s].cpu(), 1.0) for g in groups}
        sliced, _ = prune(sim.model, groups, 1 - 1 / sim.workers, criterion=scores)
        models.append(sliced.to(device).train())
    for m in models:
        torch.func.replace_all_batch_norm_modules_(m)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x, y):
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (x,)), y)
    step = torch.vmap(one)

    def setup():
        xs = torch.randn(sim.workers, n, 3, RESOLUTION, RESOLUTION, device=device)
        ys = torch.randint(0, 10, (sim.workers, n), device=device)

        def run():
            for t in params.values():
                t.grad = None
            with autocast():
                loss = step(params, buffers, xs, ys).sum()
            loss.backward()
        return run
    return setup


def _gpu_goal_rows(cfg: Config) -> list[Result]:
    """P8g and P8v: S = 4 batched (bfloat16 autocast on CUDA) against one dense step and against vmap."""
    dev, n, workers = cfg.device, _n(cfg), 4
    sims, dense, groups = _sims(workers, cfg, executions=("batched",))
    sim = sims["batched"]
    low = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if low else torch.float32

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=low)
    t = interleaved({"batched": _sim_step(sim, dev, n, autocast),
                     "dense": _dense_step(dense, _sgd(dense.parameters()), dev, n, autocast),
                     "vmap": _vmap_step(sim, groups, n, dev, autocast)},
                    cfg.reps(full=6, quick=2), warmup=cfg.warmup, device=dev)
    where = (f"{dev.type}, {'bfloat16 autocast' if low else 'float32'}"
             + (f", width {cfg_width(cfg)}" if cfg.quick else "") + f", batch {n} per worker")
    note = ("" if dev.type == "cuda" else "goal set for a GPU; ") + where
    return [timed(P8[5], t, "batched", "dense", note=note, dtype=str(dtype)),
            timed(P8[6], t, "batched", "vmap", note=f"{note}; vmap / dense {t.ratio('vmap', 'dense'):.2f}x",
                  dtype=str(dtype))]


def p8(cfg: Config) -> list[Result]:
    saved = choice.REPEATS
    if cfg.quick:  # auto's own measurements, too: fewer repetitions
        choice.REPEATS = 2
    try:
        return _rows(cfg)
    finally:
        choice.REPEATS = saved


def _rows(cfg: Config) -> list[Result]:
    rows = []
    for spec, workers in zip(P8[:3], SIZES):
        try:
            rows.append(_time_row(spec, workers, cfg))
        except Exception as exc:  # one failing row still reports the others
            rows.append(failed(spec, f"{type(exc).__name__}: {exc}"))
    for spec, fn in ((P8[3], _regret_row), (P8[4], _memory_row)):
        try:
            rows.append(fn(cfg))
        except Exception as exc:
            rows.append(failed(spec, f"{type(exc).__name__}: {exc}"))
    try:
        rows += _gpu_goal_rows(cfg)
    except Exception as exc:
        rows += [failed(spec, f"{type(exc).__name__}: {exc}") for spec in P8[5:]]
    return rows


CASES = {"P8": (P8, p8)}
