"""Optional dependencies: which extra installs each, and a clear error when a feature needs a missing one.

The core (ops, training, tickets, the CLI's training commands) needs only
torch, numpy, ninja and tqdm; plots need matplotlib (`loft_kernels[plots]`)
the embedded digits dataset needs scikit-learn (`loft_kernels[digits]`) and
the triton backend triton (`loft_kernels[triton]`).
"""
from __future__ import annotations

import importlib

# import name -> (pip package, extra that installs it, what needs it)
OPTIONAL = {
    "matplotlib": ("matplotlib", "plots", "plots (loft run, loft distance, loft_kernels.report)"),
    "sklearn": ("scikit-learn", "digits", "the digits dataset"),
    "triton": ("triton", "triton", "the triton backend"),
}


def missing_message(module: str) -> str | None:
    """The install hint for optional `module` (a dotted name is fine), or None when it is not optional."""
    entry = OPTIONAL.get(module.split(".")[0])
    if entry is None:
        return None
    package, extra, feature = entry
    return f"{feature} need(s) {package}, which is not installed: pip install 'loft_kernels[{extra}]'"


def require(module: str):
    """Import optional `module`, or raise ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        message = missing_message(module)
        if message is None or (exc.name or "").split(".")[0] != module.split(".")[0]:
            raise  # not an optional module, or something it imports is what is missing
        raise ModuleNotFoundError(message, name=exc.name) from None
