"""Shared test fixtures.

Triton kernels run on CPU tensors only in the numpy interpreter, so the
interpreter is switched on for the whole session when no GPU is present
(before anything asks the backend registry whether triton is usable).
Measured execution choices go to a temporary directory, never the user's cache.
On a GPU, TF32 is switched off for the session.
"""
import atexit
import functools
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # float32 means float32 in the comparisons with float64 references (TF32 rounds inputs to 10 bits)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
os.environ["LOFT_KERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="loft_kernels_test_cache_")
atexit.register(functools.partial(shutil.rmtree, os.environ["LOFT_KERNELS_CACHE_DIR"], ignore_errors=True))

import pytest  # noqa: E402

import loft_kernels as lk  # noqa: E402
from loft_kernels.backends import BACKENDS, unavailable_reason  # noqa: E402

KERNEL_BACKENDS = [b for b in BACKENDS if b != "cuda"] + ["cuda"]


def _backend_param(name):
    return pytest.param(name, id=name)


@pytest.fixture(params=[_backend_param(b) for b in KERNEL_BACKENDS])
def backend(request):
    """Every backend; skipped (with the reason) where it cannot run in this process."""
    name = request.param
    reason = unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable here: {reason}")
    with lk.use_backend(name):
        yield name


@pytest.fixture
def device(backend):
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
                        else "cpu")


def backend_accepts(op: str, backend: str, dtype: torch.dtype) -> bool:
    from loft_kernels.backends import _impls
    impl = _impls.get((op, backend))
    return impl is not None and impl.accepts(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
