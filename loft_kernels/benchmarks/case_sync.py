"""P5: a LoFT sync of PreActResNet-18 between 2 gloo processes, against two ways of moving its bytes.

Two processes are spawned (one CPU thread each) and join a gloo group. Each
repetition, after an untimed local step on fresh random gradients, both ranks
time (rank 0's times are reported), interleaved:
- candidate: `LoftOptimizer.finalize()`, the real sync (pack, one bucketed
  collective per kind and dtype, unpack, repartition);
- bucketed: one all_reduce and one all_gather of exactly the sync's buffer
  sizes (from `loft_sync_bytes`), nothing else: the floor for these bytes
  (through the same launcher as the sync, `training.collectives`, which
  returns once gloo's threads have let go of the buffers);
- official: the official LoFT code's sync scheme, tensor by tensor through
  rank 0 (a star), with a process group created and destroyed for every
  tensor: shared tensors are reduced to rank 0, averaged and broadcast;
  each partitioned tensor's owned rows are sent to rank 0, written into the
  tensor there and the whole tensor is broadcast.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..models import preact_resnet18
from ..training.collectives import Collectives
from ..training.comm import loft_sync_bytes, make_plan
from ..training.groups import convert
from ..training.optimizer import LoftOptimizer
from ..training.worker_model import gather, scatter_
from .result import Config, Result, Spec, timed
from .shapes import RESOLUTION
from .timing import Timings, interleaved

WORKERS = 2
NEVER = 1 << 30  # sync_every: the benchmark triggers each sync itself (finalize)

P5 = (
    Spec("P5a", "LoFT sync, PreActResNet-18, 2 gloo processes", "one all_reduce + one all_gather of the same bytes",
         1.2, "ratio <= 1.2"),
    Spec("P5b", "LoFT sync, PreActResNet-18, 2 gloo processes",
         "official code's sync: rank-0 star, tensor by tensor, a process group per tensor",
         0.2, "ratio <= 0.2 (>= 5x faster)"),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loft_setup(model, opt):
    def setup():
        for p in model.parameters():  # a local step on fresh random gradients, then the timed sync
            p.grad = torch.randn_like(p)
        opt.step()
        dist.barrier()
        return opt.finalize
    return setup


def _bucketed_setup(reduce_bytes: int, gather_bytes: int):
    def setup():
        flat = torch.randn(reduce_bytes // 4)
        mine = torch.randn(gather_bytes // 4 // WORKERS)
        out = torch.empty(WORKERS * mine.numel())
        dist.barrier()

        def run():
            comm = Collectives()
            comm.all_reduce(flat)
            comm.all_gather(out, mine)
            comm.wait()
        return run
    return setup


def _official_setup(model, groups, opt):
    plan = make_plan(model, groups, WORKERS)
    rank = dist.get_rank()

    def star_reduce(t, op=dist.ReduceOp.SUM):
        pg = dist.new_group(list(range(WORKERS)))
        dist.reduce(t, dst=0, op=op, group=pg)
        if rank == 0 and op == dist.ReduceOp.SUM:
            t.div_(WORKERS)
        dist.broadcast(t, src=0, group=pg)
        dist.destroy_process_group(pg)

    def star_rows(t, blocks):
        """blocks[r]: (rows, cols) rank r owns; rank 0 collects them into t, then everyone gets t."""
        pg = dist.new_group(list(range(WORKERS)))
        if rank == 0:
            for r in range(1, WORKERS):
                block = torch.empty_like(gather(t, *blocks[r]))
                dist.recv(block, src=r, group=pg)
                scatter_(t, *blocks[r], block)
        else:
            dist.send(gather(t, *blocks[rank]), dst=0, group=pg)
        dist.broadcast(t, src=0, group=pg)
        dist.destroy_process_group(pg)

    def setup():
        tensors = plan.tensors(model)
        with torch.no_grad():
            for t in tensors.values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
        part = opt.partition(opt.round)
        dist.barrier()

        def run():
            for name in plan.shared_params + plan.shared_buffers:
                star_reduce(tensors[name].data)
            for name in plan.counters:
                star_reduce(tensors[name], dist.ReduceOp.MAX)
            for slot in plan.slots:
                star_rows(tensors[slot.name].data,
                          [slot.index({g: idx[r] for g, idx in part.items()}) for r in range(WORKERS)])
        return run
    return setup


def _worker(rank: int, port: int, repeats: int, warmup: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        torch.manual_seed(0)  # same initial model on both ranks
        model = preact_resnet18(num_classes=10)
        example = torch.randn(2, 3, RESOLUTION, RESOLUTION)
        model, groups = convert(model, example, policy="all")
        sizes = loft_sync_bytes(model, groups, WORKERS)
        shadow = copy.deepcopy(model)  # the official scheme works on its own full-size copy
        opt = LoftOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model, groups,
                            sync_every=NEVER)
        t = interleaved({"loft": _loft_setup(model, opt),
                         "bucketed": _bucketed_setup(sizes["all_reduce"]["buffer_bytes"],
                                                     sizes["all_gather"]["buffer_bytes"]),
                         "official": _official_setup(shadow, groups, opt)}, repeats, warmup=warmup)
        if rank == 0:
            Path(out_path).write_text(json.dumps({"samples": t.samples, "bytes": sizes["bytes_sent"],
                                                  "collectives": sizes["collectives"]}))
    finally:
        dist.destroy_process_group()


def p5(cfg: Config) -> list[Result]:
    reps = cfg.reps(full=20, quick=5)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p5.json"
        mp.start_processes(_worker, args=(_free_port(), reps, cfg.warmup, str(out)), nprocs=WORKERS,
                           start_method="spawn")
        data = json.loads(out.read_text())
    t = Timings(data["samples"])
    extra = dict(repeats=reps, bytes_sent_per_rank=data["bytes"], collectives=data["collectives"])
    return [timed(P5[0], t, "loft", "bucketed", backend="gloo", **extra),
            timed(P5[1], t, "loft", "official", backend="gloo", **extra)]


CASES = {"P5": (P5, p5)}
