"""The automatic backend choice on CUDA devices: only what the GPU check measured.

A kernel path that has never run on a GPU class is never its default. Without
a stored GPU check result for the device class, every op runs on the `torch`
backend (plain PyTorch: ATen's and cuDNN's kernels, which PyTorch tests on
GPUs); the package's own CUDA and Triton kernels (compiled and run in CI only
on the CPU side, the Triton ones in its interpreter) are not used.

With a stored result (`gpu-check-<device class>/summary.json`, written by
`bash bench/gpu_check.sh` into bench/results/, or under the directory in
LOFT_KERNELS_GPU_RESULTS), each op takes its backends in the measured order:
fastest first, among those that matched the float64 reference in every dtype,
`torch` included; `torch` closes every order. A result measured on other
kernel sources than the installed ones (`kernel_sources()`) counts as none.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from . import table

RESULTS_ENV = "LOFT_KERNELS_GPU_RESULTS"
_REPO_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
UNMEASURED_ORDER = ("torch",)
_BACKENDS = ("cuda", "triton", "torch")


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
    """The stored result if it is well formed: orders maps op names to lists of backend names."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    orders = data.get("orders") if isinstance(data, dict) else None
    if not isinstance(orders, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(b in _BACKENDS for b in v) for k, v in orders.items()):
        return None
    return data


@functools.lru_cache(maxsize=None)
def kernel_sources() -> str:
    """A hash of the package's GPU kernel sources (CUDA, host side, headers, Triton): a GPU check result
    describes the kernels it measured, and no others."""
    from .. import _ext
    h = hashlib.sha256()
    roots = [(Path(__file__).resolve().parent, ["cuda.py", "triton/*.py"])]
    if _ext.source_root() is not None:
        roots.append((_ext.source_root(), ["cuda/*", "host/*", "include/**/*.h"]))
    for root, patterns in roots:
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                if path.is_file():
                    h.update(str(path.relative_to(root)).encode())
                    h.update(path.read_bytes())
    return h.hexdigest()[:16]


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
        return UNMEASURED_ORDER, (f"no GPU check result for {cls} ({result_path(cls)}): the plain-PyTorch "
                                  f"reference, never a kernel that has not run on this GPU class "
                                  f"(bash bench/gpu_check.sh measures them)")
    if stored.get("sources") != kernel_sources():
        return UNMEASURED_ORDER, (f"the GPU check result for {cls} measured other kernel sources than the "
                                  f"installed ones: the plain-PyTorch reference until bash bench/gpu_check.sh "
                                  f"measures these")
    measured = stored["orders"].get(public, [])  # backend names, as _load checked
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
