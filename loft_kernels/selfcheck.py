"""Kernel self-check: every public op on every backend usable here, against the float64 reference.

`python -m loft_kernels.selfcheck` prints, per op and backend, the largest
error against the plain-PyTorch reference evaluated in float64 on the same
(rounded) inputs, the speed relative to the float32 reference (same process,
calls interleaved, median of repeated timings, fresh random inputs for every
repetition), and which backend the automatic choice takes for each op and why.
The ops are the table's (loft_kernels.backends.table); the inputs have the
benchmarks' PreActResNet-18 shapes (loft_kernels.benchmarks.shapes), smaller
batch. The GPU check (loft_kernels.benchmarks.gpu_check) runs the same checks.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from . import ops
from ._argparse import Parser
from .backends import available_backends, backend_choices, table, use_backend
from .benchmarks.shapes import block_convs, group_sizes, preact_resnet18_convs

CONV = block_convs()[1]  # 128 filters at 16x16
BATCH = 8
SNAPSHOTS = 20
# Largest error relative to the largest reference magnitude that passes, per input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _conv_grads(fwd):
    """fwd(x, w) -> run(x, w) returning the output and the input and weight gradients."""
    def run(x, w):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = fwd(x, w)
        return (y.detach(), *torch.autograd.grad(y, [x, w], torch.ones_like(y)))
    return run


def _partial_conv(g):
    c = CONV
    oi, ii = torch.randperm(c.c_out, generator=g)[: c.c_out // 4], torch.randperm(c.c_in, generator=g)[: c.c_in // 2]
    x, w = _randn(g, BATCH, ii.numel(), c.size, c.size), _randn(g, c.c_out, c.c_in, c.kernel, c.kernel)

    def fwd(x, w):
        return ops.partial_conv2d(x, w, None, 1, c.padding, out_index=oi.to(x.device), in_index=ii.to(x.device))
    return _conv_grads(fwd), (x, w)


def _grouped_conv(g):
    c = CONV
    oi = torch.randperm(c.c_out, generator=g).view(4, -1)
    x, w = _randn(g, 4, BATCH // 2, c.c_in, c.size, c.size), _randn(g, c.c_out, c.c_in, c.kernel, c.kernel)

    def fwd(x, w):
        return ops.grouped_partial_conv2d(x, w, None, 1, c.padding, out_index=oi.to(x.device))
    return _conv_grads(fwd), (x, w)


def _weights(g):
    return [_randn(g, s.c_out, s.c_in, s.kernel, s.kernel) for s in preact_resnet18_convs()[:9]]


def _filter_norms(g):
    return (lambda *ts: ops.filter_norms(list(ts))), tuple(_weights(g))


def _filter_stats(g):
    a, b = _weights(g), _weights(g)
    return (lambda *ts: ops.filter_stats(list(ts[:len(a)]), list(ts[len(a):]))), tuple(a + b)


def _scores(g):
    return tuple(torch.rand(SNAPSHOTS, n, generator=g) for n in group_sizes()[::2])


def _footrule(g):
    return (lambda *s: ops.footrule_matrix(list(s))), _scores(g)


def _mask_distance(g):
    return (lambda *s: ops.mask_distance_matrix(list(s), 0.5)), _scores(g)


def _rows(ts, g):
    return [torch.randperm(t.shape[0], generator=g)[: t.shape[0] // 4] for t in ts]


def _pack(g):
    ts = _weights(g)
    idx = _rows(ts, g)
    return (lambda *t: ops.pack_rows(list(t), [i.to(t[0].device) for i in idx])), tuple(ts)


def _unpack(g):
    ts = _weights(g)
    idx = _rows(ts, g)
    flat = _randn(g, sum(t[i].numel() for t, i in zip(ts, idx)))

    def run(flat, *ts):
        ts = [t.clone() for t in ts]
        ops.unpack_rows(flat, ts, [i.to(flat.device) for i in idx])
        return ts
    return run, (flat, *ts)


# public op -> make(generator) -> (run(*inputs) -> outputs, float32 CPU inputs)
CHECKS = {"partial_conv2d": _partial_conv, "grouped_partial_conv2d": _grouped_conv, "filter_norms": _filter_norms,
          "filter_stats": _filter_stats, "footrule_matrix": _footrule, "mask_distance_matrix": _mask_distance,
          "pack_rows": _pack, "unpack_rows": _unpack}
assert list(CHECKS) == table.public_ops(), "every op of the table needs exactly one self-check"


def max_error(got, want) -> float:
    """Largest error relative to the largest reference magnitude, over all outputs."""
    if isinstance(got, torch.Tensor):
        want = want.double().cpu()
        return (got.double().cpu() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return max(max_error(a, b) for a, b in zip(got, want))


def _time_once(fn, inputs, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _inputs(make, seed, dtype, device):
    fn, inputs = make(torch.Generator().manual_seed(seed))
    return fn, [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in inputs]


@contextlib.contextmanager
def full_float32():
    """TF32 off for the block: on an Ampere or newer GPU a float32 convolution or matmul otherwise rounds its
    inputs to 10 mantissa bits (errors of ~3e-4), which no float32 tolerance should have to absorb."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def accuracy(name: str, backend: str, device: torch.device, dtype=torch.float32, seed: int = 0) -> float:
    """Error of `backend` in `dtype` against the float64 reference on the same rounded inputs (TF32 off)."""
    fn, inputs = _inputs(CHECKS[name], seed, dtype, device)
    with use_backend(backend), full_float32():
        got = fn(*inputs)
    with use_backend("torch"):
        want = fn(*[t.double() for t in inputs])
    return max_error(got, want)


def speed(name: str, backend: str, device: torch.device, repeats: int, seed: int = 0) -> dict:
    """Median float32 times of `backend` and of the reference, interleaved, fresh inputs per repetition."""
    times = {backend: [], "torch": []}
    for rep in range(repeats):
        fn, inputs = _inputs(CHECKS[name], seed + 1 + rep, torch.float32, device)
        for b in (("torch", backend) if rep % 2 else (backend, "torch")):
            with use_backend(b):
                times[b].append(_time_once(fn, inputs, device))
    ratios = [a / b for a, b in zip(times[backend], times["torch"])]
    return dict(ms=1e3 * statistics.median(times[backend]), torch_ms=1e3 * statistics.median(times["torch"]),
                ratio=statistics.median(ratios))


def check(name: str, backend: str, device: torch.device, repeats: int = 15, seed: int = 0) -> dict:
    """Max error vs the float64 reference and median time ratio vs the float32 reference."""
    error = accuracy(name, backend, device, torch.float32, seed)
    if backend == "torch" or (backend == "triton" and device.type != "cuda"):
        # torch against itself is 1.0 by definition; the Triton interpreter is not worth timing
        return dict(op=name, backend=backend, max_error=error, ratio=None)
    return dict(op=name, backend=backend, max_error=error, ratio=speed(name, backend, device, repeats, seed)["ratio"])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m loft_kernels.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per op and backend (>= 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)
    backends = available_backends()
    print(f"loft_kernels self-check on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"backends: {', '.join(backends)}")
    print(f"{'op':24s} {'backend':8s} {'max rel err vs fp64 ref':>24s} {'time vs torch ref':>18s}")
    ok = True
    for name in CHECKS:
        for backend in backends:
            if backend == "cuda" and device.type != "cuda" or backend == "cpu" and device.type != "cpu":
                continue
            try:
                r = check(name, backend, device, args.repeats)
            except (RuntimeError, TypeError) as exc:  # op or dtype not offered by this backend
                print(f"{name:24s} {backend:8s} {'not run: ' + str(exc).splitlines()[0][:60]}")
                continue
            ok &= r["max_error"] < TOLERANCE[torch.float32]
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            print(f"{name:24s} {backend:8s} {r['max_error']:24.2e} {ratio:>18s}")
    print("automatic choice:")
    for name, (backend, why) in backend_choices(device).items():
        print(f"  {name:24s} {backend:8s} {why}")
    print("all backends agree with the reference" if ok else "ERROR: a backend disagrees with the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
