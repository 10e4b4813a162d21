"""The C++/OpenMP extension itself: build guard, source discovery, and what the
generic op tests do not reach (layouts, every dtype, thread splits, exact half
conversion). The op-vs-reference suite (tests/test_ops_*.py) runs the `cpu`
backend on top of this.
"""
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import naive
import pytest
import torch

import loft_kernels as lk
from loft_kernels import _ext
from loft_kernels.backends import unavailable_reason

REPO = Path(__file__).resolve().parents[1]

needs_ext = pytest.mark.skipif(unavailable_reason("cpu") is not None,
                               reason=f"cpu extension unavailable: {unavailable_reason('cpu')}")


def _run_python(code, **env):
    """Run `code` in a fresh interpreter (the registry caches availability per process)."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ guard ----
def test_env_var_disables_extension_and_dispatch_falls_back_with_one_warning():
    code = r"""
import json, warnings, torch
import loft_kernels as lk
from loft_kernels.backends import unavailable_reason, select
out = {"reason": unavailable_reason("cpu"), "available": lk.available_backends()}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    n1 = lk.filter_norms([torch.ones(3, 4)])
    n2 = lk.filter_norms([torch.ones(2, 9)])
out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
out["chosen"] = select("filter_norms", torch.device("cpu"), torch.float32)[0]
out["values"] = [n1[0].tolist(), n2[0].tolist()]
try:
    with lk.use_backend("cpu"):
        pass
    out["explicit"] = None
except RuntimeError as exc:
    out["explicit"] = str(exc)
print(json.dumps(out))
"""
    out = _run_python(code, LOFT_KERNELS_NO_EXT="1", LOFT_KERNELS_BACKEND="")
    assert "LOFT_KERNELS_NO_EXT" in out["reason"]
    assert "cpu" not in out["available"] and "torch" in out["available"]
    assert len(out["warnings"]) == 1 and "'cpu'" in out["warnings"][0] and "LOFT_KERNELS_NO_EXT" in out["warnings"][0]
    assert out["chosen"] == "torch"
    assert out["values"] == [[2.0, 2.0, 2.0], [3.0, 3.0]]
    assert "LOFT_KERNELS_NO_EXT" in out["explicit"] and "'cpu'" in out["explicit"]


@pytest.fixture
def fresh_ext(monkeypatch):
    """_ext with its load state cleared (restored afterwards by monkeypatch)."""
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_failure", None)
    monkeypatch.setattr(_ext, "_cuda_failure", None)
    monkeypatch.delenv(_ext.ENV_DISABLE, raising=False)
    return _ext


def test_build_failure_becomes_a_reason_not_an_exception(fresh_ext, monkeypatch):
    import torch.utils.cpp_extension as cpp

    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Error building extension 'x': csrc/cpu/ranking.cpp:1: error: expected ';'")

    monkeypatch.setattr(cpp, "load", failing_load)
    reason = fresh_ext.unavailable_reason()
    assert reason.startswith("building the C++ extension failed")
    assert "expected ';'" in reason
    with pytest.raises(_ext.ExtensionUnavailable, match="building the C\\+\\+ extension failed"):
        fresh_ext.load()
    assert len(calls) == 1  # the failure is remembered, not retried on every call


def test_a_failing_cuda_build_still_builds_the_cpu_kernels(fresh_ext, monkeypatch):
    """The CPU and CUDA code build together; when the CUDA part fails (an nvcc the torch build refuses), the CPU
    kernels are built alone and the cuda backend says why it is missing."""
    import torch.utils.cpp_extension as cpp

    from loft_kernels.backends import cuda
    calls = []

    def load(**kwargs):
        calls.append(kwargs["with_cuda"])
        if kwargs["with_cuda"]:
            raise RuntimeError("nvcc fatal: Unsupported gpu architecture 'compute_100'")
        return type("Module", (), {"with_cuda": False, "__file__": "cpu-only.so"})()
    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(fresh_ext, "cuda_skip_reason", lambda: None)  # as on a machine with CUDA
    assert fresh_ext.unavailable_reason() is None and calls == [True, False]
    assert "Unsupported gpu architecture" in cuda.unavailable_reason()
    assert "CPU kernels alone" in cuda.unavailable_reason()


def test_missing_sources_are_reported(fresh_ext, monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "_SOURCE_ROOTS", (tmp_path / "a", tmp_path / "b"))
    assert fresh_ext.source_root() is None
    assert "C++ sources were not found" in fresh_ext.unavailable_reason()


def test_sources_found_in_checkout_then_in_installed_package(monkeypatch, tmp_path):
    assert _ext.source_root() == REPO / "csrc"  # editable checkout
    installed = tmp_path / "site" / "loft_kernels" / "csrc"
    shutil.copytree(REPO / "csrc", installed)
    monkeypatch.setattr(_ext, "_SOURCE_ROOTS", (tmp_path / "site" / "csrc", installed))
    assert _ext.source_root() == installed


def test_setup_build_py_ships_csrc_inside_the_package(tmp_path):
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shipped = tmp_path / "loft_kernels" / "csrc"
    for rel in ("cpu/module.cpp", "include/loft_kernels/common.h", "cuda/launchers.h"):
        assert (shipped / rel).is_file(), rel
    assert sorted(p.name for p in shipped.rglob("*.cu")) == sorted(p.name for p in (REPO / "csrc").rglob("*.cu"))


def test_build_name_tracks_sources(tmp_path):
    root = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", root)
    name = _ext.build_name(root, with_cuda=False)
    assert re.fullmatch(r"loft_kernels_cpu_[0-9a-f]{16}", name)
    assert _ext.build_name(root, with_cuda=False) == name
    assert _ext.build_name(root, with_cuda=True) != name
    header = root / "include" / "loft_kernels" / "ranking.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert _ext.build_name(root, with_cuda=False) != name


def test_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _ext.build_directory("some_ext") == tmp_path / "some_ext"
    assert (tmp_path / "some_ext").is_dir()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX-only")
def test_a_lock_left_by_a_killed_build_is_removed_not_waited_on(tmp_path):
    # torch's `lock` file with no live builder (here: a child that took the flock and was killed mid-build)
    child = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(tmp_path / '.loft_kernels_builder')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        f"open({str(tmp_path / 'lock')!r}, 'w').close(); print('building', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "building"
        entered = []
        waiter = threading.Thread(target=lambda: _enter(tmp_path, entered))
        waiter.start()
        waiter.join(1.0)
        assert not entered and (tmp_path / "lock").exists()  # a live builder is waited for, its lock kept
    finally:
        child.kill()
        child.wait()
    waiter.join(30)
    assert entered == ["stale lock removed"] and not (tmp_path / "lock").exists()


def _enter(build_dir, log):
    with pytest.warns(RuntimeWarning, match="interrupted"):
        with _ext.builder_lock(build_dir):
            log.append("stale lock removed" if not (build_dir / "lock").exists() else "lock still there")


def test_cuda_sources_need_no_torch_headers():
    """The .cu files and their headers must compile with plain nvcc (CI builds them for sm_80/sm_90)."""
    files = list((REPO / "csrc" / "cuda").glob("*.cu")) + list((REPO / "csrc" / "cuda").glob("*.h")) + \
        list((REPO / "csrc" / "include").rglob("*.h"))
    assert any(f.suffix == ".cu" for f in files)
    for f in files:
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', f.read_text())
        bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not bad, f"{f.name} includes {bad}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_backend_says_why_it_is_unavailable():
    reason = unavailable_reason("cuda")
    assert reason is not None and ("CUDA" in reason)
    with pytest.raises(RuntimeError, match="'cuda' was requested but is unavailable"):
        with lk.use_backend("cuda"):
            pass


# ------------------------------------------------------------- kernels ----
@contextlib.contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _both(fn):
    with lk.use_backend("torch"):
        want = fn()
    with lk.use_backend("cpu"):
        got = fn()
    return got, want


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int8, torch.bool, torch.complex128])
def test_pack_unpack_layouts_and_dtypes(dtype):
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * 50
        return (t > 0) if dtype == torch.bool else t.to(dtype)

    base = rand(6, 4, 5)
    tensors = [
        rand(7, 5, 3),                 # contiguous, middle dim
        rand(9, 4).t(),                # transposed: strided but mergeable
        base[:, 1:3],                  # a slice that cannot be viewed as [outer, size_d, inner]
        rand(3),                       # 1-D
        rand(4, 6)[:, ::2],            # stepped columns, last dim selected
        rand(2, 0, 3),                 # empty
    ]
    indices = [torch.tensor([4, 1]), torch.tensor([2, 0, 3]), torch.tensor([1]), torch.tensor([2, 0]),
               torch.tensor([2, 0, 1]), torch.tensor([1])]
    dims = [1, 0, 2, 0, -1, 0]
    got, want = _both(lambda: lk.pack_rows(tensors, indices, dims))
    assert got.dtype == dtype and torch.equal(got, want)
    flat = rand(want.numel())
    targets = {}
    for backend in ("torch", "cpu"):
        b = base.clone()
        ts = [t.clone() for t in tensors]
        ts[2] = b[:, 1:3]  # a view: the unpack must land in the base tensor
        with lk.use_backend(backend):
            lk.unpack_rows(flat, ts, indices, dims)
        targets[backend] = (b, ts)
    assert torch.equal(targets["cpu"][0], targets["torch"][0])
    for x, y in zip(targets["cpu"][1], targets["torch"][1]):
        assert torch.equal(x, y)


@needs_ext
def test_pack_split_across_threads_matches_torch():
    """Big enough that the flat buffer is split over threads mid-row and mid-tensor."""
    g = torch.Generator().manual_seed(6)
    tensors = [torch.randn(n, c, 3, 3, generator=g) for n, c in [(64, 3), (257, 131), (512, 256), (31, 7)]]
    indices = [torch.randperm(t.shape[1], generator=g)[: t.shape[1] // 2 + 1] for t in tensors]
    dims = [1] * len(tensors)
    for threads in (1, 2, 3):
        with _threads(threads):
            got, want = _both(lambda: lk.pack_rows(tensors, indices, dims))
        assert torch.equal(got, want)


@needs_ext
def test_half_conversion_is_exact_for_every_float16_value():
    """filter_norms of one-element rows is |x|, exactly, for all 2^16 half bit patterns."""
    bits = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(torch.float16).reshape(-1, 1)
    with lk.use_backend("cpu"):
        got = lk.filter_norms([x])[0]
    want = x.float().abs().reshape(-1)
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want[finite])
    assert bool(torch.isinf(got[torch.isinf(want)]).all()) and bool(torch.isnan(got[torch.isnan(want)]).all())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filter_stats_many_rows_over_threads_deterministic(dtype):
    """Rows of very different lengths (1-D, empty, 1-element, several blocks) over a thread split:
    equal to the float64 definition, and bit-identical for any thread count."""
    g = torch.Generator().manual_seed(7)
    shapes = [(300, 1100), (5,), (3, 0), (1, 1), (1000, 3, 3, 3), (2, 100000), (64, 64, 3, 3)]
    a = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
    b = [(t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(dtype) for t in a]
    results = []
    for threads in (1, 2):
        with _threads(threads), lk.use_backend("cpu"):
            results.append((lk.filter_stats(a, b), lk.filter_norms(a)))
    for x, y in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(x, y)
    stats, norms = results[0]
    for got, want, n in zip(stats, naive.filter_stats(a, b), norms):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(n.double(), want[:, 0].sqrt(), rtol=2e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_ranking_ties_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(8)
    scores = [torch.randint(-2, 3, (5, 9), generator=g).to(dtype),  # many ties, incl. -0.0 vs 0.0
              torch.randn(5, 4, generator=g).to(dtype)]
    scores[0][1, :3] = torch.tensor([0.0, -0.0, 0.0], dtype=dtype)
    with lk.use_backend("cpu"):
        fr = lk.footrule_matrix(scores)
        md = lk.mask_distance_matrix(scores, 0.34)
    torch.testing.assert_close(fr.double(), naive.footrule_matrix(scores), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(md.double(), naive.mask_distance_matrix(scores, 0.34), rtol=0, atol=1e-7)


@needs_ext
def test_footrule_many_pairs_over_threads():
    """T = 12 snapshots of 3 layers (parallel over 432 pairs) against the definition, thread-count independent."""
    g = torch.Generator().manual_seed(9)
    scores = [torch.randn(12, n, generator=g) for n in (3, 40, 1500)]
    got = []
    for threads in (1, 2):
        with _threads(threads), lk.use_backend("cpu"):
            got.append(lk.footrule_matrix(scores))
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0].double(), naive.footrule_matrix(scores), rtol=1e-6, atol=1e-6)
    # two filters swapped: 1.5 ln 2, by hand
    two = [torch.tensor([[2.0, 1.0], [1.0, 2.0]])]
    with lk.use_backend("cpu"):
        assert math.isclose(float(lk.footrule_matrix(two)[0, 0, 1]), 1.5 * math.log(2), rel_tol=1e-6)


@needs_ext
def test_partial_conv2d_channels_last_and_strided_weight():
    """Layouts the op tests do not use: channels_last input and weight, a non-contiguous weight."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 5, 9, 9, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    w_full = torch.randn(7, 11, 3, 3, generator=g)
    weights = [w_full[:, :6].clone().to(memory_format=torch.channels_last).requires_grad_(),
               w_full[:, 3:9].detach().requires_grad_()]  # a non-contiguous slice
    oi, ii = torch.tensor([6, 0, 3]), torch.tensor([5, 1, 2, 0, 4])
    for w in weights:
        ref_in = x.detach().clone().requires_grad_()
        with lk.use_backend("cpu"):
            y = lk.partial_conv2d(x, w, None, 1, 1, out_index=oi, in_index=ii)
        want = naive.partial_conv2d(ref_in, w, None, 1, 1, 1, 1, oi, ii)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        grad = torch.randn(y.shape, generator=g)
        gx, gw = torch.autograd.grad(y, [x, w], grad)
        rx, rw = torch.autograd.grad(want, [ref_in, w], grad)
        torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


@needs_ext
def test_grouped_backward_adds_overlapping_rows_and_handles_no_index():
    """All groups share every filter (maximal overlap) and a call without any index."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2, 4, 6, 6, generator=g, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    oi = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]])
    for out_index in (oi, None):
        with lk.use_backend("cpu"):
            y = lk.grouped_partial_conv2d(x, w, b, 1, 1, out_index=out_index)
        want = torch.stack([naive.partial_conv2d(x[i], w, b, 1, 1, 1, 1, None if out_index is None
                                                 else out_index[i], None) for i in range(3)])
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        grad = torch.randn(y.shape, generator=g)
        for got, ref in zip(torch.autograd.grad(y, [x, w, b], grad), torch.autograd.grad(want, [x, w, b], grad)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_ext
def test_kernels_refuse_out_of_range_indices():
    """Inside torch.compile the ops layer skips value checks; the C++ side must not read out of bounds."""
    ext = _ext.load()
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="out_index has entry 3, out of range"):
        ext.partial_conv2d(x, w, None, torch.tensor([0, 3]), None, (1, 1), (0, 0), (1, 1), 1)
    with pytest.raises(RuntimeError, match="in_index has entry -1, out of range"):
        ext.partial_conv2d_backward(torch.randn(1, 3, 3, 3), x, w, None, torch.tensor([-1, 0]), False, (1, 1),
                                    (0, 0), (1, 1), 1, True, True)
    with pytest.raises(RuntimeError, match=r"indices\[0\] has entry 4, out of range"):
        ext.pack_rows([torch.randn(4, 2)], [torch.tensor([4])], [0])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["out", "in", "both"])
def test_grouped_stacked_and_loop_formulations_agree_with_the_reference(dtype, side):
    """Both ways the cpu backend can run the grouped op (it picks one per dtype and shape)."""
    from loft_kernels.backends import cpu, reference
    ext = _ext.load()
    g = torch.Generator().manual_seed(12)
    G, N, C, K = 3, 2, 6, 7
    oi = torch.stack([torch.randperm(K, generator=g)[:3] for _ in range(G)]) if side != "in" else None
    ii = torch.stack([torch.randperm(C, generator=g)[:4] for _ in range(G)]) if side != "out" else None
    x = torch.randn(G, N, 4 if ii is not None else C, 7, 7, generator=g, dtype=torch.float64)
    w, b = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)
    grad = torch.randn(G, N, 3 if oi is not None else K, 4, 4, generator=g, dtype=torch.float64)
    conf = ([2, 2], [1, 1], [1, 1])
    want = reference.grouped_partial_conv2d(x, w, b, oi, ii, *conf)
    want_grads = reference.grouped_partial_conv2d_backward(grad, x, w, oi, ii, True, *conf, True, True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype in (torch.float32, torch.float64) else dict(rtol=3e-2, atol=1e-1)
    for grouping in (cpu.STACKED, cpu.LOOP):
        args = [t.to(dtype) for t in (x, w, b)]
        y = ext.grouped_partial_conv2d(*args, oi, ii, *conf, grouping)
        torch.testing.assert_close(y.double(), want, **tol)
        grads = ext.grouped_partial_conv2d_backward(grad.to(dtype), args[0], args[1], oi, ii, True, *conf, True,
                                                    True, grouping)
        for got, ref in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), ref, **tol)


def test_cpu_grouping_rule_follows_the_measurements():
    from loft_kernels.backends import cpu
    x = lambda dtype, size: torch.empty(4, 1, 1, size, size, dtype=dtype)  # noqa: E731
    assert cpu.grouping(x(torch.float32, 32)) == cpu.grouping(x(torch.float32, 4)) == cpu.LOOP
    assert cpu.grouping(x(torch.bfloat16, 8)) == cpu.grouping(x(torch.bfloat16, 32)) == cpu.LOOP
    assert cpu.grouping(x(torch.float64, 32)) == cpu.STACKED and cpu.grouping(x(torch.float64, 8)) == cpu.LOOP
    assert cpu.grouping(x(torch.float16, 32)) == cpu.LOOP


@needs_ext
def test_grouped_kernel_rejects_a_bad_grouping_and_malformed_indices():
    ext = _ext.load()
    x, w = torch.randn(2, 1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(RuntimeError, match="grouping must be 0"):
        ext.grouped_partial_conv2d(x, w, None, torch.tensor([[0], [1]]), None, [1, 1], [0, 0], [1, 1], 5)
    with pytest.raises(RuntimeError, match=r"out_index must be a contiguous int64 tensor of shape \[2, n > 0\]"):
        ext.grouped_partial_conv2d(x, w, None, torch.tensor([[0, 1]]), None, [1, 1], [0, 0], [1, 1], 0)
    with pytest.raises(RuntimeError, match="out_index has entry 3, out of range"):
        ext.grouped_partial_conv2d(x, w, None, torch.tensor([[0], [3]]), None, [1, 1], [0, 0], [1, 1], 0)
