"""The automatic backend choice on CUDA devices: only what the GPU check measured.

A kernel path that has never run on a GPU class is never its default. Without
a stored GPU check result for the device class, every op runs on the `cuda`
backend: the convolutions through the cuDNN-based path (the arithmetic is
ATen's/cuDNN's; the backend only gathers and scatters the weight slice) and
the other ops through the CUDA kernels, whose arithmetic is shared with, and
tested through, the CPU build. The Triton kernels (tested only in Triton's
CPU interpreter until a GPU check passes them) are never the default then.

With a stored result (`gpu-check-<device class>/summary.json`, written by
`bash bench/gpu_check.sh` into bench/results/, or under the directory in
LOFT_KERNELS_GPU_RESULTS), each op takes its backends in the measured order:
fastest first, among those that matched the float64 reference in every dtype.
`torch` closes every order: it is the reference itself.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch

from . import table

RESULTS_ENV = "LOFT_KERNELS_GPU_RESULTS"
_REPO_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
UNMEASURED_ORDER = ("cuda", "torch")


def device_class(name: str) -> str:
    """A GPU model name as a file-name key: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@functools.lru_cache(maxsize=None)
def device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def results_dir() -> Path:
    env = os.environ.get(RESULTS_ENV, "").strip()
    return Path(env) if env else _REPO_RESULTS


def result_folder(cls: str) -> Path:
    return results_dir() / f"gpu-check-{cls}"


def result_path(cls: str) -> Path:
    return result_folder(cls) / "summary.json"


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    orders = data.get("orders") if isinstance(data, dict) else None
    return data if isinstance(orders, dict) else None


_cache: dict[Path, tuple[float, dict | None]] = {}


def stored_result(cls: str) -> dict | None:
    """The stored GPU check result of a device class (None if there is none, or it is unreadable)."""
    path = result_path(cls)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    hit = _cache.get(path)
    if hit is None or hit[0] != mtime:
        hit = (mtime, _load(path))
        _cache[path] = hit
    return hit[1]


def _class_of(device: torch.device) -> str:
    return device_class(device_name(device.index if device.index is not None else torch.cuda.current_device()))


def order_for(public: str, cls: str) -> tuple[tuple[str, ...], str]:
    """(backends to try in order, why) for a public op on a device class."""
    stored = stored_result(cls)
    if stored is None:
        return UNMEASURED_ORDER, (f"no GPU check result for {cls} ({result_path(cls)}): the cuda backend "
                                  f"(cuDNN-based convolutions, CUDA kernels), never an unmeasured Triton kernel")
    measured = [b for b in stored["orders"].get(public, []) if b in ("cuda", "triton", "torch")]
    if not measured:
        return ("torch",), f"the GPU check of {cls} found no correct kernel backend for {public}: the reference"
    when = stored.get("date", "an earlier run")
    return tuple(dict.fromkeys([*measured, "torch"])), (
        f"fastest correct backend in the GPU check of {cls} ({when}): {', '.join(measured)}")


def automatic_order(op: str, device: torch.device) -> tuple[str, ...]:
    """The automatic choice's order for dispatch key `op` on a CUDA device."""
    return order_for(table.public_of(op) if op in table.BY_NAME else op, _class_of(device))[0]


def automatic_reason(public: str, device: torch.device) -> str:
    return order_for(public, _class_of(device))[1]
