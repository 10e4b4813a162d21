"""Interleaved-median timing: the one place the ratio benchmarks take times.

Shared machines drift (other jobs, frequency scaling), so a candidate and its
baselines are timed inside one process, round-robin in the same repetition
loop (the starting entry rotates every repetition), each run on inputs made
fresh for it by an untimed `setup`. A ratio is the median over repetitions of
the per-repetition ratio, which cancels slow drift that a ratio of two
separate medians would not.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .. import _checks as C

# setup() makes fresh inputs (untimed) and returns the zero-argument callable that is timed.
Setup = Callable[[], Callable[[], object]]


@dataclass(frozen=True)
class Timings:
    """Per-entry wall times in milliseconds, one per repetition, in repetition order."""
    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, candidate: str, baseline: str, scale: float = 1.0) -> float:
        """Median over repetitions of candidate / (baseline * scale)."""
        return statistics.median(c / (b * scale) for c, b in zip(self.samples[candidate], self.samples[baseline]))


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued device work so a wall-clock time covers it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device=None) -> float:
    """Wall time of one call of fn in milliseconds, device work included, garbage collector paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one sample is noise, as timeit also avoids
    try:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3
    finally:
        if gc_was_enabled:
            gc.enable()


def interleaved(entries: Mapping[str, Setup], repeats: int, *, warmup: int = 1, device=None) -> Timings:
    """Time every entry `repeats` times, interleaved, each call on fresh inputs from its setup.

    Each repetition runs every entry once, starting from a different entry each
    time; `warmup` untimed repetitions come first (allocator, caches, JIT).
    """
    if not isinstance(entries, Mapping) or not entries:
        raise ValueError("entries must be a non-empty mapping name -> setup callable")
    for name, setup in entries.items():
        if not callable(setup):
            raise TypeError(f"entries[{name!r}] must be a callable returning the function to time")
    repeats = C.positive_int(repeats, "repeats")
    warmup = C.non_negative_int(warmup, "warmup")
    names = list(entries)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            run = entries[name]()
            ms = time_once(run, device)
            if rep >= warmup:
                samples[name].append(ms)
    return Timings(samples)
