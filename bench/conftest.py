"""Microbenchmarks: `pytest bench/ --benchmark-only` (add `--benchmark-json FILE` to save them).

Every op on every backend that runs natively on this machine's device, with
its baselines in the same pytest-benchmark group, on PreActResNet-18 shapes
(batch 32, 32x32 inputs). Each round runs on fresh random inputs made by an
untimed setup (loft_kernels.benchmarks.workloads, shared with `loft bench`).
Triton on a CPU-only machine would run in the numpy interpreter, a
correctness tool, so it is skipped here with that reason. Each test is timed
in a block of its own (pytest-benchmark's model), not interleaved with its
baselines: `loft bench` measures the ratios that way.
"""
import pytest
import torch

import loft_kernels as lk
from loft_kernels.backends import BACKENDS, unavailable_reason
from loft_kernels.benchmarks.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 5


def skip_reason(backend: str):
    reason = unavailable_reason(backend)
    if reason is not None:
        return reason
    if DEVICE.type == "cpu" and backend in ("triton", "cuda"):
        return "a GPU backend and there is no GPU (Triton on CPU is the numpy interpreter: not a speed measurement)"
    if DEVICE.type == "cuda" and backend == "cpu":
        return "the benchmarks run on the GPU here"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend that runs natively on DEVICE (explicitly selected for the benchmarked ops)."""
    reason = skip_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r}: {reason}")
    with lk.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def run(benchmark):
    """run(setup, group, rounds=..., warmup=..., **info): time setup()'s function, fresh inputs each round."""
    def go(setup, group: str, rounds: int = ROUNDS, warmup: int = 1, **info):
        benchmark.group = group
        benchmark.extra_info.update(info, device=str(DEVICE))

        def target(fn):
            fn()
            synchronize(DEVICE)
        def fresh():
            fn = setup()
            synchronize(DEVICE)  # the inputs' generation, queued on a GPU, finishes before the timer starts
            return (fn,), {}
        benchmark.pedantic(target, setup=fresh, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return go
