"""Cost of a model: parameters, FLOPs of one forward pass, and measured inference speedup.

FLOP convention (inference, one forward of the given input, whole batch):
a multiply-add is 2 FLOPs. Convolution (1-, 2- or 3-D): 2 * out.numel() *
(C_in / groups) * kernel size, plus out.numel() for the bias; a transposed
one: 2 * in.numel() * (C_out / groups) * kernel size, plus out.numel(). Linear:
2 * out.numel() * in_features, plus out.numel() for the bias.
nn.MultiheadAttention: its query, key, value and output projections as Linear
layers, plus 2 * 2 * L * S * E for the attention scores and their weighted
sum (L queries and S keys per sample, embedding E). BatchNorm: 2 * numel
(folded into one scale and one shift per element). Activations, pooling,
softmax and adds are not counted (they are the same before and after pruning
up to the channel count and small beside the convolutions). Layers are
counted through module hooks, so a convolution or linear map called as a
function (F.conv2d, torch.matmul) in a forward is not. Counted from the shapes
each layer actually sees, so a Loft layer running a subset of its filters is
counted for that subset.
"""
from __future__ import annotations

import contextlib
import math
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
        x, dims = args[0], len(m.kernel_size)
        # x's channels (not m.in_channels: an active Loft layer convolves a subset), also when unbatched
        if m.transposed:
            work = x.numel() * (out.shape[-dims - 1] // m.groups)
        else:
            work = out.numel() * (x.shape[-dims - 1] // m.groups)
        total[0] += 2 * work * math.prod(m.kernel_size) + (out.numel() if m.bias is not None else 0)

    def linear(m, args, out):
        total[0] += 2 * out.numel() * args[0].shape[-1] + (out.numel() if m.bias is not None else 0)

    def norm(m, args, out):
        total[0] += 2 * out.numel()

    def attention(m, args, kwargs, out):
        named = dict(zip(("query", "key", "value"), args), **kwargs)
        q, k = named["query"], named["key"]  # the values have as many tokens as the keys
        e = m.embed_dim
        queries, keys = q.numel() // e, k.numel() // m.kdim  # over the whole batch
        samples = 1 if q.dim() == 2 else q.shape[0 if m.batch_first else 1]
        bias = m.in_proj_bias is not None
        total[0] += (2 * queries * e * e + 2 * keys * (m.kdim + m.vdim) * e  # query, key, value projections
                     + (queries + 2 * keys) * e * bias
                     + 2 * 2 * queries * (keys // samples) * e  # scores and their weighted sum
                     + 2 * queries * e * e + queries * e * (m.out_proj.bias is not None))  # output projection

    hooks = ((nn.modules.conv._ConvNd, conv), (nn.Linear, linear), (nn.modules.batchnorm._BatchNorm, norm))
    handles = [m.register_forward_hook(hook) for m in model.modules() for kind, hook in hooks if isinstance(m, kind)]
    handles += [m.register_forward_hook(attention, with_kwargs=True) for m in model.modules()
                if isinstance(m, nn.MultiheadAttention)]
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
