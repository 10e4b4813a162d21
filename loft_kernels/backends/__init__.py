"""Backend registry and dispatch.

Every op has a plain-PyTorch reference (`torch` backend, always present) and
optional kernel backends: `cpu` (C++/OpenMP extension), `triton` and `cuda`.
Which backend implements which op, for which dtypes, is declared once in
`table.OPS`; a backend module exposes `unavailable_reason() -> str | None` and
the implementations under the ops' names (`implementation(name)` where they
live elsewhere, e.g. in the compiled extension). Backend modules are imported
lazily, on first dispatch or `available_backends()`, so `import loft_kernels`
stays cheap and never compiles anything.

Selection for each call: an explicit choice (`use_backend(name)` or the
LOFT_KERNELS_BACKEND environment variable) is obeyed or fails loudly. The
automatic choice on CPU tensors takes `cpu`, then `torch`; on CUDA tensors it
takes only backends that passed the GPU check on that device class (see
`choice.py`; `backend_choices()` says which and why). A kernel backend that
should be there but is missing falls back to `torch` with one warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import choice, table

BACKENDS = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "LOFT_KERNELS_BACKEND"

_CPU_PREFERENCE = ("cpu", "torch")  # automatic choice on CPU tensors: first available wins
_MODULES = {"torch": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}


@dataclass(frozen=True)
class Impl:
    fn: Callable
    dtypes: frozenset | None  # None: any dtype

    def accepts(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes


_impls: dict[tuple[str, str], Impl] = {}
_reasons: dict[str, str | None] = {}  # backend -> None (available) or why not
_warned: set[str] = set()
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("loft_kernels_backend", default=None)

_ALL_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _dtypes(dtype_class: str, module) -> frozenset | None:
    if dtype_class == table.FLOAT:
        return _ALL_FLOATS
    if dtype_class == table.ANY:
        return None
    return frozenset(module.DTYPE_CLASSES[dtype_class])  # a class the backend module defines


def _register_all(backend: str, module) -> None:
    """Register every op the table gives `backend`, implemented under the op's name in `module`."""
    lookup = getattr(module, "implementation", None)
    for op in table.ops_of(backend):
        fn = lookup(op.name) if lookup is not None else getattr(module, op.name)
        _impls[(op.name, backend)] = Impl(fn, _dtypes(op.backends[backend], module))


def unavailable_reason(backend: str) -> str | None:
    """None if `backend` works in this process, else a sentence saying why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in _reasons:
        try:
            module = importlib.import_module(f"{__name__}.{_MODULES[backend]}")
            reason = module.unavailable_reason()
            if reason is None:
                _register_all(backend, module)
        except Exception as exc:  # a broken optional backend must not break the package
            reason = f"importing its module failed: {type(exc).__name__}: {exc}"
        _reasons[backend] = reason
    return _reasons[backend]


def available_backends() -> list[str]:
    """Backends that work in this process (`triton` on CPU only under TRITON_INTERPRET=1).

    Which of them the automatic choice takes for each op on a device, and why: `backend_choices(device)`.
    """
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    # triton: GPUs, or CPU tensors under the numpy interpreter
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def requested_backend() -> str | None:
    """The explicitly requested backend (context manager first, then env var), or None for automatic."""
    name = _requested.get()
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or None
        if name == "auto":
            name = None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` ("auto" restores automatic choice)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a backend name string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"name must be one of {BACKENDS + ('auto',)}, got {name!r}")
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} was requested but is unavailable: {reason}")
    token = _requested.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _requested.reset(token)


def select(op: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Callable]:
    """Pick the implementation of `op` for inputs on `device` with `dtype`."""
    name = requested_backend()
    if name is not None:
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} was requested but is unavailable: {reason}")
        if not _device_ok(name, device):
            raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors")
        impl = _impls.get((op, name))
        if impl is None:
            have = [b for b in BACKENDS if (op, b) in _impls]
            raise RuntimeError(f"backend {name!r} does not implement {op}; backends that do: {have}")
        if not impl.accepts(dtype):
            raise TypeError(f"backend {name!r} runs {op} for dtypes {sorted(map(str, impl.dtypes))}, not {dtype}")
        return name, impl.fn
    order = choice.automatic_order(op, device) if device.type == "cuda" else _CPU_PREFERENCE
    for name in order:
        reason = unavailable_reason(name)
        if reason is not None:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"loft_kernels: the {name!r} backend is unavailable ({reason}); "
                              f"falling back to the slower plain-PyTorch reference", RuntimeWarning, stacklevel=3)
            continue
        impl = _impls.get((op, name))
        if impl is not None and impl.accepts(dtype):
            return name, impl.fn
    unavailable_reason("torch")
    return "torch", _impls[(op, "torch")].fn


def backend_choices(device="cpu", dtype: torch.dtype = torch.float32) -> dict[str, tuple[str, str]]:
    """For each public op: (the backend it takes on `device` outside `use_backend` blocks, why)."""
    device = torch.device(device)
    out = {}
    for public in table.public_ops():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with use_backend("auto"):
                name, forced = select(public, device, dtype)[0], requested_backend()
        if forced is not None:  # the environment variable overrides the automatic choice
            why = f"requested by the environment variable {ENV_VAR}"
        elif device.type == "cuda":
            why = choice.automatic_reason(public, device)
        else:
            reason = unavailable_reason("cpu")
            why = ("the C++/OpenMP kernels" if name == "cpu" else
                   f"the reference: the cpu backend is unavailable ({reason})" if reason else
                   f"the reference: the cpu backend does not run {public} for {dtype}")
        out[public] = (name, why)
    return out


def autograd_node(op: str, device: torch.device, dtype: torch.dtype) -> Callable | None:
    """`op` with a compiled autograd node, if the backend `select` picks for it has one (else None).

    A backend module offers one as `autograd_node(op)`; the ops use it for plain
    CPU tensors in eager mode, where a node written in Python costs more than
    a small convolution.
    """
    name, _ = select(op, device, dtype)
    offer = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), "autograd_node", None)
    return offer(op) if offer is not None else None


def dispatch(op: str, ref: torch.Tensor, *args):
    """Run `op` on the backend chosen for the device and dtype of `ref`."""
    name, fn = select(op, ref.device, ref.dtype)
    if name == "triton" and ref.device.type == "cuda":  # Triton launches on the current device, not the tensors'
        with torch.cuda.device(ref.device):
            return fn(*args)
    return fn(*args)
