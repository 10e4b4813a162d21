"""execution="auto": for each convolution of the batched network, the faster of its two forms, measured.

The two forms of one layer over S workers: one stacked grouped convolution
(the workers' weights concatenated, S times the channel groups) or a loop of S
per-worker convolutions on channel slices. Which is faster depends on the
device, dtype, shape and S (on a 2-core CPU the loop usually wins; on a GPU one
launch for S small convolutions usually does), so it is measured: forward +
backward of both forms on random inputs of the layer's shape, interleaved,
medians, once per (device, dtype, shape, S); a close call (medians within
`CLOSE` of each other, or repetitions whose middle halves overlap) gets up to
`MORE_ROUNDS` times the repetitions, since one short round on a busy machine
cannot separate forms that close. Then the whole forward + backward
of the batched network with those choices is timed against the loop's on the
step's batch shapes (the network's other layers and copies cost too), and
the faster is run. Both are kept in a JSON file under the user's cache directory ($LOFT_KERNELS_CACHE_DIR, else $XDG_CACHE_HOME/loft_kernels,
else ~/.cache/loft_kernels), never in the repository. Before the batched network is
timed, its gradients are compared with the loop's (`gradient_mismatch`); that
check is never cached.
"""
from __future__ import annotations

import json
import os
import statistics
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

from ..benchmarks.timing import interleaved
from ..io import atomic_write_text
from .worker_model import channels_last

ENV_VAR = "LOFT_KERNELS_CACHE_DIR"
FILE = "execution_choices.json"
STACKED, LOOP = "stacked", "loop"
REPEATS = 5
WARMUP = 2  # the first calls of a new shape build kernels and allocate; two untimed repetitions absorb that
CLOSE = 1.15  # medians within this factor of each other: measure more before deciding
MORE_ROUNDS = 3  # a close call takes at most this many rounds of REPEATS

_lock = threading.Lock()
_memory: dict[Path, dict] = {}


def cache_dir() -> Path:
    """Where the measured choices are kept (see the module docstring)."""
    own = os.environ.get(ENV_VAR)
    if own:
        return Path(own)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loft_kernels"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _layout(t: torch.Tensor) -> str:
    return "channels_last" if channels_last(t) else "strided"


def key(x: torch.Tensor, weights, conf, workers: int) -> str:
    """The measurement's identity: device (model), the dtype convolutions run in, input and weight shapes and
    layouts (channels-last kernels time differently), S."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.amp.is_autocast_available(x.device.type) and \
        torch.is_autocast_enabled(x.device.type) else x.dtype
    layouts = [_layout(x)] + [_layout(w) for w in weights]
    return json.dumps([_device_name(x.device), str(dtype), workers, list(x.shape),
                       [list(w.shape) for w in weights], [list(c) if isinstance(c, tuple) else c for c in conf],
                       layouts])


def _load(path: Path) -> dict:
    if path not in _memory:
        try:
            data = json.loads(path.read_text())
            _memory[path] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):  # none yet, or unreadable: measure again
            _memory[path] = {}
    return _memory[path]


def cached(k: str) -> str | None:
    """The stored choice for key `k`, or None if it has not been measured (or the entry is unreadable)."""
    with _lock:
        entry = _load(cache_dir() / FILE).get(k)
    return entry["choice"] if isinstance(entry, dict) and entry.get("choice") in (STACKED, LOOP) else None


def choose(k: str, measure: Callable[[], dict[str, float]]) -> str:
    """The cached choice for key `k`, measuring (and storing) it first if there is none."""
    path = cache_dir() / FILE
    known = cached(k)
    if known is not None:
        return known
    times = measure()
    entry = {"choice": min(times, key=times.get), "ms": times}
    with _lock:
        table = _load(path)
        table[k] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(table, indent=1, sort_keys=True), path)
        except OSError:  # a read-only home still runs, it measures again in the next process
            pass
    return entry["choice"]


def _medians(setups: dict, device, repeats: int) -> dict[str, float]:
    """Interleaved median milliseconds of `setups`, with more rounds while the two fastest are a close call."""
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for rounds in range(1, MORE_ROUNDS + 1):
        t = interleaved(setups, repeats, warmup=WARMUP if rounds == 1 else 0, device=device)
        for name in samples:
            samples[name] += t.samples[name]
        medians = {name: statistics.median(v) for name, v in samples.items()}
        first, second = sorted(medians, key=medians.get)[:2]
        if medians[second] > CLOSE * medians[first] and _apart(samples[first], samples[second]):
            break
    return medians


def _apart(faster: list[float], slower: list[float]) -> bool:
    """Whether the middle halves of two timing samples do not overlap.

    Medians 15 % apart can still be one outlier round: the repetitions of one
    form scatter widely on a busy machine (measured here: 516 to 754 ms for the
    same large 1x1 convolution), and such a form is not decided until its
    spread clears the other form's.
    """
    if len(faster) < 2 or len(slower) < 2:
        return True
    return statistics.quantiles(faster, n=4)[2] < statistics.quantiles(slower, n=4)[0]


def conv_setups(x: torch.Tensor, weights, biases, forms: dict[str, Callable]) -> dict[str, Callable]:
    """For `interleaved`: each form's forward + backward on fresh random inputs shaped like the layer's."""
    def setup(run):
        def make():
            xs = torch.randn(x.shape, device=x.device, dtype=x.dtype, requires_grad=True)
            ws = [torch.randn(w.shape, device=w.device, dtype=w.dtype, requires_grad=True) for w in weights]
            bs = [None if b is None else torch.randn(b.shape, device=b.device, dtype=b.dtype, requires_grad=True)
                  for b in biases]

            def go():
                with torch.enable_grad():
                    y = run(xs, ws, bs)
                    y.backward(torch.ones_like(y))
            return go
        return make
    return {name: setup(run) for name, run in forms.items()}


def measure_conv(x: torch.Tensor, weights, biases, run_stacked, run_loop, repeats: int | None = None) -> dict[str, float]:
    """Median forward + backward milliseconds of both forms (see `conv_setups`; close calls measured longer)."""
    setups = conv_setups(x, weights, biases, {STACKED: run_stacked, LOOP: run_loop})
    return _medians(setups, x.device, repeats or REPEATS)


def measure_steps(runs: dict[str, Callable[[], None]], device) -> dict[str, float]:
    """Median milliseconds of whole forward + backward passes (`runs`: name -> a pass that leaves no trace)."""
    return _medians({name: (lambda run=run: run) for name, run in runs.items()}, device, REPEATS)


# How far the batched network's gradients may lie from the loop's: the L2 norm of the difference, relative to the
# loop gradient's norm (floored at a thousandth of the model's largest gradient norm, so a gradient that is
# rounding noise, such as a conv bias before a BatchNorm, is not compared digit by digit). Both sum the same
# products in different orders, and in float32 a deep BatchNorm network's backward amplifies that rounding: up to
# 0.5 % measured on a PreActResNet-18 at width 0.25, 1.8 % on the Fashion-MNIST showcase's VGG. A wrong gradient
# (a worker's loss counted twice, a worker's channels mixed with another's) is off by tens of percent.
_AGREE = {torch.float64: 1e-6, torch.float32: 5e-2}
_AGREE_LOW_PRECISION = 2e-1  # float16 / bfloat16 tensors, or any dtype under autocast


def gradient_mismatch(batched: list, loop: list, autocast: bool) -> Optional[str]:
    """None if the two lists of gradients agree (see _AGREE), else where and by how much they differ."""
    norms = [None if g is None else float(g.double().norm()) for g in loop]
    scale = max((n for n in norms if n is not None), default=0.0)
    for i, (b, g, norm) in enumerate(zip(batched, loop, norms)):
        if (b is None) != (g is None):
            return f"parameter {i} has a gradient in one execution only"
        if g is None or not g.numel():
            continue
        tol = _AGREE_LOW_PRECISION if autocast else _AGREE.get(g.dtype, _AGREE_LOW_PRECISION)
        err = float((b.double() - g.double()).norm())
        bound = tol * max(norm, 1e-3 * scale)
        if not err <= bound:  # also catches NaN
            return f"parameter {i} {tuple(g.shape)}: difference of norm {err:.3g}, more than {bound:.3g}"
    return None
