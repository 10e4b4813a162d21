"""Cost of a model: parameters, FLOPs of one forward pass, and measured inference speedup.

FLOP convention (inference, one forward of the given input, whole batch):
a multiply-add is 2 FLOPs. Conv2d: 2 * out.numel() * (C_in / groups) * kh * kw,
plus out.numel() for the bias. Linear: 2 * out.numel() * in_features, plus
out.numel() for the bias. BatchNorm: 2 * numel (folded into one scale and one
shift per element). Activations, pooling and adds are not counted (they are
the same before and after pruning up to the channel count and small beside
the convolutions). Counted from the shapes each layer actually sees, so a
Loft layer running a subset of its filters is counted for that subset.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn

from .. import _checks as C
from ..nn.views import training_mode
from ._groups import check_model


def _as_inputs(example_input, name: str = "example_input") -> tuple:
    items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if not items:
        raise ValueError(f"{name} must not be empty")
    for i, t in enumerate(items):
        C.tensor(t, name if len(items) == 1 else f"{name}[{i}]")
    return tuple(items)


@contextlib.contextmanager
def _eval_no_grad(*models):
    """Eval mode and no_grad for the block; every module's training flag restored after."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(training_mode(model, False))
        with torch.no_grad():
            yield


def count_params_flops(model: nn.Module, example_input) -> dict[str, int]:
    """{"params": number of parameters, "flops": FLOPs of one eval forward of `example_input`}.

    The forward runs in eval mode under no_grad (BN running stats are not
    touched) and the modules' train/eval flags are restored. See the module
    docstring for what is counted.
    """
    check_model(model)
    inputs = _as_inputs(example_input)
    total = [0]

    def conv(m, args, out):
        x = args[0]
        # x's channels (not m.in_channels: an active Loft layer convolves a subset); dim -3 also when unbatched
        per_out = (x.shape[-3] // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total[0] += 2 * out.numel() * per_out + (out.numel() if m.bias is not None else 0)

    def linear(m, args, out):
        total[0] += 2 * out.numel() * args[0].shape[-1] + (out.numel() if m.bias is not None else 0)

    def norm(m, args, out):
        total[0] += 2 * out.numel()

    kinds = ((nn.Conv2d, conv), (nn.Linear, linear), (nn.modules.batchnorm._BatchNorm, norm))
    handles = [m.register_forward_hook(hook) for m in model.modules() for kind, hook in kinds if isinstance(m, kind)]
    try:
        with _eval_no_grad(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(total[0])}


def _sync(inputs) -> None:
    for t in inputs:
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)


def inference_speedup(baseline: nn.Module, candidate: nn.Module, example_input, *, repeats: int = 30,
                      warmup: int = 3) -> dict[str, float]:
    """Measured eval-mode forward time of `baseline` over `candidate` (e.g. dense over pruned).

    Same process, interleaved (the order alternates every repetition), a
    fresh random input of example_input's shape for each repetition (both
    models get the same one), `warmup` untimed rounds first. Returns
    {"baseline_s": median seconds, "candidate_s": median seconds, "speedup":
    median over repetitions of baseline time / candidate time}. Timings on a
    shared machine are noisy: read the ratio, not the absolute times.
    """
    check_model(baseline)
    check_model(candidate)
    inputs = _as_inputs(example_input)
    repeats = C.positive_int(repeats, "repeats")
    warmup = C.non_negative_int(warmup, "warmup")
    times = {"baseline": [], "candidate": []}
    models = {"baseline": baseline, "candidate": candidate}
    with _eval_no_grad(baseline, candidate):
        for rep in range(warmup + repeats):
            fresh = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
            order = ("baseline", "candidate") if rep % 2 == 0 else ("candidate", "baseline")
            for key in order:
                _sync(fresh)
                start = time.perf_counter()
                models[key](*fresh)
                _sync(fresh)
                if rep >= warmup:
                    times[key].append(time.perf_counter() - start)
    ratios = [b / c for b, c in zip(times["baseline"], times["candidate"])]
    return {"baseline_s": statistics.median(times["baseline"]), "candidate_s": statistics.median(times["candidate"]),
            "speedup": statistics.median(ratios)}
