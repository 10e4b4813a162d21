"""Build and load the C++/OpenMP (and CUDA) extension from csrc/.

The extension is compiled with ninja through `torch.utils.cpp_extension.load`
on first use and cached (TORCH_EXTENSIONS_DIR, else torch's default cache
directory) under a name that hashes everything the binary depends on: the
sources, the flags, torch and Python versions, and the CPU model (the build
uses -march=native, so a cache shared between machines must not mix them).

Guarded like torchao's extension: importing this module never compiles and
never fails. `load()` builds on first call and raises `ExtensionUnavailable`
with the reason; `unavailable_reason()` returns that reason (None if it loads).
A build interrupted by a kill leaves torch's lock file behind; the next build
removes it (see `builder_lock`) instead of waiting on it forever.
Set LOFT_KERNELS_NO_EXT=1 to disable the extension (the registry then falls
back to the `torch` backend). Prebuild once, e.g. in CI: `python -m loft_kernels._ext`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

ENV_DISABLE = "LOFT_KERNELS_NO_EXT"

_PKG = Path(__file__).resolve().parent
# A non-editable install ships csrc/ inside the package (setup.py's build_py);
# an editable checkout has it beside the package.
_SOURCE_ROOTS = (_PKG.parent / "csrc", _PKG / "csrc")
_MARKER = Path("cpu") / "module.cpp"

_CFLAGS = ["-O3", "-fopenmp", "-march=native"]
_LDFLAGS = ["-fopenmp"]
_CUDA_FLAGS = ["-O3", "-DLK_WITH_CUDA"]
_REASON_CHARS = 3000  # keep the tail of a compiler error, where the error is


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be used in this process; the message says why."""


_lock = threading.Lock()
_module = None
_failure: str | None = None
_cuda_failure: str | None = None  # the CUDA part failed to build and the extension was built without it


def source_root() -> Path | None:
    """The csrc/ directory the extension is built from (checkout first, then the installed copy)."""
    for root in _SOURCE_ROOTS:
        if (root / _MARKER).is_file():
            return root
    return None


def cuda_skip_reason() -> str | None:
    """Why the CUDA kernels are left out of the build (None: they are built in)."""
    if torch.version.cuda is None:
        return "torch was built without CUDA (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        return "no CUDA toolkit was found (set CUDA_HOME)"
    return None


def _sources(root: Path, with_cuda: bool) -> list[Path]:
    # host/: ATen-side code shared by both builds (named *_host.cpp: object files are named by basename);
    # cpu/: the CPU kernels and the module; cuda/: only with CUDA.
    files = sorted((root / "host").glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*.cpp"))
    return files


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def build_name(root: Path, with_cuda: bool) -> str:
    """Extension name: a hash of sources, headers, flags, torch, Python and the CPU."""
    h = hashlib.sha256()
    files = _sources(root, True) + sorted((root / "include").rglob("*.h")) + \
        [h for part in ("host", "cpu", "cuda") for h in sorted((root / part).glob("*.h"))]
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for part in (_CFLAGS, _LDFLAGS, _CUDA_FLAGS if with_cuda else [], [torch.__version__, str(torch.version.cuda),
                 sys.version, _cpu_identity()]):
        h.update(repr(part).encode())
    return f"loft_kernels_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:16]}"


def build_directory(name: str) -> Path:
    """Where extension `name` is built: TORCH_EXTENSIONS_DIR/name, else torch's cache root/<python>_<cpu|cuXY>/name."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        accel = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
        root = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{accel}")
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def builder_lock(build_dir: Path):
    """Hold an exclusive flock on `build_dir` while this process may build there.

    torch marks a build in progress with a `lock` file that outlives a builder
    killed mid-build (Ctrl-C, OOM): every later build then waits on it forever.
    The flock is released by the kernel when its process dies, so a `lock` file
    found while holding the flock belongs to no live builder and is removed.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file alone
        yield
        return
    with open(build_dir / ".loft_kernels_builder", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                warnings.warn(f"loft_kernels: removing {stale}, left by an extension build that was interrupted",
                              RuntimeWarning, stacklevel=3)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(verbose: bool, with_cuda: bool):
    root = source_root()
    if root is None:
        raise ExtensionUnavailable("the C++ sources were not found (looked for "
                                   + " and ".join(str(r / _MARKER) for r in _SOURCE_ROOTS) + ")")
    from torch.utils.cpp_extension import load as cpp_load
    cflags = list(_CFLAGS) + (["-DLK_WITH_CUDA"] if with_cuda else [])
    name = build_name(root, with_cuda)
    directory = build_directory(name)
    with builder_lock(directory):
        return cpp_load(name=name, sources=[str(p) for p in _sources(root, with_cuda)],
                        extra_include_paths=[str(root / "include"), str(root)], extra_cflags=cflags,
                        extra_cuda_cflags=list(_CUDA_FLAGS) if with_cuda else None, extra_ldflags=list(_LDFLAGS),
                        build_directory=str(directory), with_cuda=with_cuda, verbose=verbose)


def load(verbose: bool = False):
    """The compiled extension module, built on first call; raises ExtensionUnavailable."""
    global _module, _failure, _cuda_failure
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        raise ExtensionUnavailable(f"the C++ extension is disabled by the environment variable {ENV_DISABLE}")
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _failure is None:
            with_cuda = cuda_skip_reason() is None
            try:
                _module = _build(verbose, with_cuda)
            except ExtensionUnavailable as exc:
                _failure = str(exc)
            except Exception as exc:  # compiler missing, compile error, ...: report, never crash the import
                if with_cuda:  # the CUDA part (an nvcc the torch build refuses, ...) must not cost the CPU kernels
                    _cuda_failure = _short(exc)
                    try:
                        _module = _build(verbose, False)
                    except Exception as cpu_exc:
                        _failure = f"building the C++ extension failed ({_short(cpu_exc)})"
                else:
                    _failure = f"building the C++ extension failed ({_short(exc)})"
        if _module is None:
            raise ExtensionUnavailable(_failure)
    return _module


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return "... " + text[-_REASON_CHARS:] if len(text) > _REASON_CHARS else text


def cuda_build_failure() -> str | None:
    """Why the CUDA kernels failed to build, when the extension was then built without them (else None)."""
    return _cuda_failure


def unavailable_reason() -> str | None:
    """None if the extension loads (building it if needed), else why not."""
    try:
        load()
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


def build(verbose: bool = True):
    """Build (or find in the cache) the extension now; raises ExtensionUnavailable on failure."""
    return load(verbose=verbose)


def _main() -> int:
    try:
        module = build()
    except ExtensionUnavailable as exc:
        print(f"loft_kernels extension unavailable: {exc}", file=sys.stderr)
        return 1
    cuda = cuda_skip_reason() or (f"their build failed: {_cuda_failure}" if _cuda_failure else None)
    print(f"loft_kernels extension ready: {module.__file__}")
    print("CUDA kernels: " + ("built in" if cuda is None else f"not built ({cuda})"))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
