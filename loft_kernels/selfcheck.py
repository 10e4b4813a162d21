"""Kernel self-check: every op on every backend usable here, against the reference.

`python -m loft_kernels.selfcheck` prints, per op and backend, the maximum
error against the plain-PyTorch reference evaluated in float64 and the speed
relative to that reference in float32 (same process, calls interleaved, median
of repeated timings, fresh random inputs for every repetition).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import ops
from .backends import available_backends, use_backend

# name -> function(generator, dtype) -> (callable(*inputs) -> result, inputs)
# Shapes are one PreActResNet-18 stage-2 layer at batch 8 (the partial convs) and
# a model's worth of conv weights (statistics ops).
_CONV = dict(N=8, C=64, H=16, K=128, k=3)


def _partial_conv(g, dtype, device):
    c = _CONV
    x = torch.randn(c["N"], c["C"] // 2, c["H"], c["H"], generator=g, dtype=dtype).to(device)
    w = torch.randn(c["K"], c["C"], c["k"], c["k"], generator=g, dtype=dtype).to(device)
    oi = torch.randperm(c["K"], generator=g)[: c["K"] // 4].to(device)
    ii = torch.randperm(c["C"], generator=g)[: c["C"] // 2].to(device)
    return (lambda x, w: ops.partial_conv2d(x, w, None, 1, 1, out_index=oi, in_index=ii)), (x, w)


def _partial_conv_backward(g, dtype, device):
    fwd, (x, w) = _partial_conv(g, dtype, device)

    def run(x, w):
        x, w = x.requires_grad_(), w.requires_grad_()
        y = fwd(x, w)
        return torch.autograd.grad(y, [x, w], torch.ones_like(y))
    return run, (x, w)


def _grouped_conv(g, dtype, device):
    c = _CONV
    x = torch.randn(4, c["N"] // 2, c["C"], c["H"], c["H"], generator=g, dtype=dtype).to(device)
    w = torch.randn(c["K"], c["C"], c["k"], c["k"], generator=g, dtype=dtype).to(device)
    oi = torch.randperm(c["K"], generator=g).view(4, -1).to(device)
    return (lambda x, w: ops.grouped_partial_conv2d(x, w, None, 1, 1, out_index=oi)), (x, w)


def _weights(g, dtype, device):
    shapes = [(64, 3, 3, 3)] + [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3)] + [(128, 128, 3, 3)] * 3
    return [torch.randn(*s, generator=g, dtype=dtype).to(device) for s in shapes]


def _filter_norms(g, dtype, device):
    return (lambda *ts: ops.filter_norms(list(ts))), tuple(_weights(g, dtype, device))


def _filter_stats(g, dtype, device):
    a, b = _weights(g, dtype, device), _weights(g, dtype, device)
    n = len(a)
    return (lambda *ts: ops.filter_stats(list(ts[:n]), list(ts[n:]))), tuple(a + b)


def _footrule(g, dtype, device):
    scores = [torch.rand(20, n, generator=g, dtype=dtype).to(device) for n in (64, 128, 256)]
    return (lambda *s: ops.footrule_matrix(list(s))), tuple(scores)


def _mask_distance(g, dtype, device):
    scores = [torch.rand(20, n, generator=g, dtype=dtype).to(device) for n in (64, 128, 256)]
    return (lambda *s: ops.mask_distance_matrix(list(s), 0.5)), tuple(scores)


def _pack(g, dtype, device):
    ts = _weights(g, dtype, device)
    idx = [torch.randperm(t.shape[0], generator=g)[: t.shape[0] // 4].to(device) for t in ts]
    return (lambda *t: ops.pack_rows(list(t), idx)), tuple(ts)


CHECKS = {
    "partial_conv2d": _partial_conv,
    "partial_conv2d (backward)": _partial_conv_backward,
    "grouped_partial_conv2d": _grouped_conv,
    "filter_norms": _filter_norms,
    "filter_stats": _filter_stats,
    "footrule_matrix": _footrule,
    "mask_distance_matrix": _mask_distance,
    "pack_rows": _pack,
}


def _max_error(got, want) -> float:
    """Largest error relative to the largest reference magnitude, over all outputs."""
    if isinstance(got, torch.Tensor):
        want = want.double().cpu()
        return (got.double().cpu() - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    return max(_max_error(a, b) for a, b in zip(got, want))


def _time_once(fn, inputs, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def check(name: str, backend: str, device: torch.device, repeats: int = 15, seed: int = 0) -> dict:
    """Max error vs the float64 reference and median time ratio vs the float32 reference."""
    make = CHECKS[name]
    fn, inputs = make(torch.Generator().manual_seed(seed), torch.float32, device)
    with use_backend(backend):
        got = fn(*inputs)
    with use_backend("torch"):
        want = fn(*[t.double() for t in inputs])
    error = _max_error(got, want)
    if backend == "torch" or not (device.type == "cuda" or backend != "triton"):
        # torch against itself is 1.0 by definition; the Triton interpreter is not worth timing
        return dict(op=name, backend=backend, max_error=error, ratio=None)
    ratios = []
    for rep in range(repeats):
        fn, inputs = make(torch.Generator().manual_seed(seed + 1 + rep), torch.float32, device)
        order = ("torch", backend) if rep % 2 else (backend, "torch")
        times = {}
        for b in order:
            with use_backend(b):
                times[b] = _time_once(fn, inputs, device)
        ratios.append(times[backend] / times["torch"])
    return dict(op=name, backend=backend, max_error=error, ratio=statistics.median(ratios))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loft_kernels.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per op and backend (>= 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)
    backends = available_backends()
    print(f"loft_kernels self-check on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"backends: {', '.join(backends)}")
    print(f"{'op':28s} {'backend':8s} {'max rel err vs fp64 ref':>24s} {'time vs torch ref':>18s}")
    worst = 0.0
    for name in CHECKS:
        for backend in backends:
            if backend == "cuda" and device.type != "cuda":
                continue
            try:
                r = check(name, backend, device, args.repeats)
            except (RuntimeError, TypeError) as exc:  # op or dtype not offered by this backend
                print(f"{name:28s} {backend:8s} {'not run: ' + str(exc).splitlines()[0][:60]}")
                continue
            worst = max(worst, r["max_error"])
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            print(f"{name:28s} {backend:8s} {r['max_error']:24.2e} {ratio:>18s}")
    ok = worst < 1e-4  # float32 against float64: ~1e-6 expected
    print("all backends agree with the reference" if ok else "ERROR: a backend disagrees with the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
