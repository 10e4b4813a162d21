"""Measurements behind the LoFT training note (issue 3): run `python bench/measure_training.py [--quick] [--json F]`.

1. step:   a LoFT-4 worker step (forward + backward + optimizer) of PreActResNet-18 on 32x32 inputs,
           batch 32, against a dense step of the same model: time (interleaved, median) and memory
           (bytes saved for backward, counted exactly; peak RSS growth of a fresh process per variant).
2. opt:    how the base optimizer is kept off non-owned rows: compact views (gather grads, step, scatter:
           what LoftOptimizer does) against a full step followed by restoring the non-owned rows and state.
3. layer:  the simulator's choice: S workers as a loop of `partial_conv2d` against one
           `grouped_partial_conv2d`, forward + backward, per PreActResNet-18 layer shape.
4. sync:   a LoFT sync of PreActResNet-18 on 2 gloo processes against one all_reduce of the same bytes,
           one all_reduce + one all_gather of exactly the sync's buffers, and per-tensor collectives.
Everything is a ratio inside one process with the candidate and baseline interleaved; medians.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import loft_kernels as lk
from loft_kernels.io import atomic_write_text

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4)


def median_ms(samples):
    return 1e3 * statistics.median(samples)


def model_and_groups(policy):
    torch.manual_seed(0)
    model = lk.preact_resnet18(num_classes=10)
    return lk.convert(model, torch.randn(2, 3, 32, 32), policy=policy)


def data(batch=32):
    return torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def one_step(model, opt):
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def dense_and_worker(policy, workers=4):
    """(dense model, its SGD), (worker 0's model, its LoftOptimizer) of a LoFT-`workers` simulator."""
    model, groups = model_and_groups(policy)
    dense = copy.deepcopy(model)
    lk.activate(dense, groups, None)
    sim = lk.LoftSimulator(model, groups, SGD, workers=workers, sync_every=10 ** 9)  # no sync inside the timing
    return (dense, SGD(dense.parameters())), (sim.worker_models[0], sim.optimizers[0]), groups


def saved_bytes(model, opt):
    """Bytes of the distinct tensors autograd saves for backward in one forward (the activation memory)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    x, y = data()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.zero_grad()
    return sum(seen.values())


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(variant, policy, steps=3):
    """Peak RSS during a step minus RSS before it (MiB), in a fresh process, median over `steps` steps.

    glibc is told to mmap every block >= 128 KiB, so freed tensors leave RSS at once and
    RSS follows the live tensor memory; a thread samples it every ~0.2 ms.
    """
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import measure_training as m; m._rss_child({variant!r}, {policy!r}, {steps})")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_child(variant, policy, steps):
    import threading
    (dense, dense_opt), (worker, opt), _ = dense_and_worker(policy)
    model, o = (dense, dense_opt) if variant == "dense" else (worker, opt)
    model.train()
    one_step(model, o)  # optimizer state exists from here on
    growth = []
    for _ in range(steps):
        o.zero_grad(set_to_none=True)
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.0002)
        th = threading.Thread(target=sample)
        th.start()
        one_step(model, o)
        done.set()
        th.join()
        growth.append(max(0, peak[0] - base))
    print(statistics.median(growth) / 2 ** 20)


def bench_step(reps, policy):
    (dense, dense_opt), (worker, opt), groups = dense_and_worker(policy)
    dense.train()
    worker.train()
    for _ in range(2):  # warm up both
        one_step(dense, dense_opt)
        one_step(worker, opt)
    td, tw = [], []
    for _ in range(reps):
        for model, o, out in ((dense, dense_opt, td), (worker, opt, tw)):
            t0 = time.perf_counter()
            one_step(model, o)
            out.append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(td, tw)]
    return {"policy": policy, "groups": len(groups), "dense_ms": median_ms(td), "worker_ms": median_ms(tw),
            "worker_over_dense": statistics.median(ratios),
            "saved_activation_MiB_dense": saved_bytes(dense, dense_opt) / 2 ** 20,
            "saved_activation_MiB_worker": saved_bytes(worker, opt) / 2 ** 20,
            "peak_rss_growth_MiB_dense": peak_rss_growth("dense", policy),
            "peak_rss_growth_MiB_worker": peak_rss_growth("worker", policy)}


def bench_optimizer_strategies(reps, policy="all", workers=4):
    """Compact views (LoftOptimizer) vs full step + restore of non-owned rows and their momentum."""
    (_, _), (model, opt), groups = dense_and_worker(policy, workers)
    slots = opt._slot_params  # measuring the internals on purpose: both strategies on the same rows
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    full = SGD(params)
    for p, g in zip(params, grads):  # give the full optimizer momentum state, as mid-round
        p.grad = g
    full.step()
    kept = []  # (param, dim, non-owned indices): rows for conv_a/bias/norms, columns for conv_b
    for sp in slots:
        dim = 0 if sp.rows is not None else 1
        owned = sp.rows if sp.rows is not None else sp.cols
        keep = torch.ones(sp.param.shape[dim], dtype=torch.bool)
        keep[owned] = False
        kept.append((sp.param, dim, keep.nonzero().flatten()))
    if any(sp.rows is not None and sp.cols is not None for sp in slots):
        raise ValueError("this comparison handles row or column slots only (no VGG chains)")

    def compact():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    def restore():
        for p, g in zip(params, grads):
            p.grad = g
        saved = [(p, d, i, p.detach().index_select(d, i), full.state[p]["momentum_buffer"].index_select(d, i))
                 for p, d, i in kept]
        full.step()
        with torch.no_grad():
            for p, d, i, v, buf in saved:
                p.index_copy_(d, i, v)
                full.state[p]["momentum_buffer"].index_copy_(d, i, buf)
    for f in (compact, restore):
        f()
    tc, tr = [], []
    for _ in range(reps):
        for f, out in ((compact, tc), (restore, tr)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return {"policy": policy, "compact_ms": median_ms(tc), "save_restore_ms": median_ms(tr),
            "restore_over_compact": statistics.median([b / a for a, b in zip(tc, tr)])}


LAYERS = [  # PreActResNet-18 3x3 convs at batch 32, 32x32 input: (C, H)
    (64, 32), (128, 16), (256, 8), (512, 4)]


def bench_layers(reps, workers=4, batch=32):
    rows = []
    for c, h in LAYERS:
        w = torch.randn(c, c, 3, 3, requires_grad=True)
        perm = torch.randperm(c).view(workers, c // workers).sort(1).values
        xs = torch.randn(workers, batch, c, h, h)
        g = torch.randn(workers, batch, c // workers, h, h)

        def loop():
            outs = [lk.partial_conv2d(xs[s], w, None, 1, 1, out_index=perm[s]) for s in range(workers)]
            torch.autograd.backward(outs, list(g))
            w.grad = None

        def grouped():
            out = lk.grouped_partial_conv2d(xs, w, None, 1, 1, out_index=perm)
            out.backward(g)
            w.grad = None
        loop()
        grouped()
        tl, tg = [], []
        for _ in range(reps):
            for f, out in ((loop, tl), (grouped, tg)):
                t0 = time.perf_counter()
                f()
                out.append(time.perf_counter() - t0)
        rows.append({"layer": f"{c}x{h}x{h}", "loop_ms": median_ms(tl), "grouped_ms": median_ms(tg),
                     "grouped_over_loop": statistics.median([b / a for a, b in zip(tl, tg)])})
    return rows


# ---------------------------------------------------------------- sync ----
def _sync_rank(rank, world, init_file, reps, out_file):
    import torch.distributed as dist
    from loft_kernels.training.sync import _all_gather_single, flatten, owned_numel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    model, groups = model_and_groups("all")
    opt = lk.LoftOptimizer(SGD(model.parameters()), model, groups, sync_every=10 ** 9)
    one = lk.loft_sync_bytes(model, groups, world, "reset")
    payload = opt._pack()  # the buffers a sync sends, to size the baselines exactly
    opt._pending = None
    ar_bufs = [b.clone() for b in (*payload.mean.values(), *payload.max.values())]
    ag_bufs = [b.clone() for b in payload.gather.values()]
    ag_outs = [b.new_empty(world * b.numel()) for b in ag_bufs]
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    same_bytes = flatten(state)  # one all_reduce of the full model's floats: a dense sync of the same model
    tensors = opt._plan.tensors(model)
    shared = [tensors[n] for n in opt._plan.shared_params + opt._plan.shared_buffers]
    pieces = [torch.randn(owned_numel(tensors[s.name].shape, s, opt._plan.sizes, world, 0)) for s in opt._plan.slots]

    def loft_sync():
        opt._step_in_round = 1  # as after a step: finalize() then syncs
        opt.finalize()

    def one_all_reduce():
        dist.all_reduce(same_bytes)

    def exact_collectives():
        for b in ar_bufs:
            dist.all_reduce(b)
        for b, o in zip(ag_bufs, ag_outs):
            _all_gather_single(o, b)

    def per_tensor():  # the official code's style: one collective per tensor
        for p in shared:
            dist.all_reduce(p.detach().clone())
        for t in pieces:
            dist.all_gather([torch.empty_like(t) for _ in range(world)], t)
    fns = {"loft_sync": loft_sync, "one_all_reduce_same_bytes": one_all_reduce,
           "all_reduce_plus_all_gather_exact": exact_collectives, "per_tensor_collectives": per_tensor}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    if rank == 0:
        res = {k: median_ms(v) for k, v in times.items()}
        res["sync_over_one_all_reduce"] = statistics.median(
            [a / b for a, b in zip(times["loft_sync"], times["one_all_reduce_same_bytes"])])
        res["sync_over_exact_collectives"] = statistics.median(
            [a / b for a, b in zip(times["loft_sync"], times["all_reduce_plus_all_gather_exact"])])
        res["per_tensor_over_sync"] = statistics.median(
            [b / a for a, b in zip(times["loft_sync"], times["per_tensor_collectives"])])
        res["sync_bytes_sent_per_rank"] = one["bytes_sent"]
        res["same_bytes_buffer_bytes"] = same_bytes.numel() * same_bytes.element_size()
        res["per_tensor_collective_count"] = len(shared) + len(pieces)
        with open(out_file, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def bench_sync(reps, world=2):
    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        here = os.path.dirname(os.path.abspath(__file__))
        procs = [subprocess.Popen([sys.executable, "-c",
                                   f"import sys; sys.path.insert(0, {here!r}); import measure_training as m; "
                                   f"m._sync_rank({r}, {world}, {init!r}, {reps}, {out!r})"])
                 for r in range(world)]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError("a sync benchmark rank failed")
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--only", choices=["step", "opt", "layer", "sync"], action="append")
    args = ap.parse_args(argv)
    reps = 5 if args.quick else 15
    parts = args.only or ["step", "opt", "layer", "sync"]
    res = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "loadavg": os.getloadavg(), "backends": lk.available_backends()}}
    if "step" in parts:
        res["step"] = [bench_step(reps, p) for p in ("paper", "all")]
    if "opt" in parts:
        res["opt"] = [bench_optimizer_strategies(reps, p) for p in ("paper", "all")]
    if "layer" in parts:
        res["layer"] = bench_layers(reps)
    if "sync" in parts:
        res["sync"] = bench_sync(reps)
    print(json.dumps(res, indent=1))
    if args.json:
        atomic_write_text(json.dumps(res, indent=1), args.json)


if __name__ == "__main__":
    main()
