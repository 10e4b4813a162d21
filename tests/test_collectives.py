"""Collectives hand their tensors back only once gloo's threads have let go of them.

A gloo worker thread can hold a finished collective's tensors for a moment
after `wait()` returns; if Python let go first, that thread frees them and
needs the GIL, which aborts a process that is exiting. The check here is the
tensors' owner count (`Tensor._use_count`, C++ owners included), read by the
test before the call and after it returns.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loft_kernels.training import collectives as col
from loft_kernels.training.exchange import distributed_exchange
from loft_kernels.training.sync import Payload

EXCHANGES = 400


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _payload(rank: int, i: int) -> Payload:
    p = Payload()
    p.mean[torch.float32] = torch.full((257,), float(rank + i))
    p.max[torch.int64] = torch.tensor([rank * 10 + i, 3])
    p.gather[torch.float32] = torch.arange(5, dtype=torch.float32) + 100 * rank + i
    return p


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        held_after, wrong, buffers = 0, 0, {}
        for i in range(EXCHANGES):
            payload = _payload(rank, i)
            inputs = [*payload.mean.values(), *payload.max.values(), *payload.gather.values()]
            before = [t._use_count() for t in inputs]
            out = distributed_exchange(payload, None, rank, 2, "a test", buffers)
            flat = buffers[torch.float32]
            # what the backend saw: inputs and the all_gather output (which the returned view also owns)
            held_after += sum(t._use_count() > n for t, n in zip(inputs, before))
            held_after += flat._use_count() > 2
            expected_gather = torch.stack([torch.arange(5, dtype=torch.float32) + 100 * r + i for r in range(2)])
            wrong += not torch.equal(out.mean[torch.float32], torch.full((257,), (1 + 2 * i) / 2))
            wrong += not torch.equal(out.max[torch.int64], torch.tensor([10 + i, 3]))
            wrong += not torch.equal(out.gather[torch.float32], expected_gather)
        # the small helpers the engine and the fingerprint use
        t = torch.tensor([rank + 1.0])
        n = t._use_count()
        col.all_reduce(t)
        held_after += t._use_count() > n
        lists = col.all_gather_int_lists([7, rank] if rank else [])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"held_after": int(held_after), "wrong": int(wrong), "sum": t.item(), "lists": lists}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_exchange_returns_only_after_gloo_let_go_of_every_tensor(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["wrong"] == 0
        assert res["held_after"] == 0, f"rank {rank}: a backend thread still held a tensor after the call returned"
        assert res["sum"] == 3.0
        assert res["lists"] == [[], [7, 1]]


def test_release_parks_a_tensor_the_backend_never_lets_go_of():
    t = torch.ones(4)
    held = [(t, t._use_count())]
    lingering = t.view(2, 2)  # an extra owner that never goes away, as a stuck backend thread would be
    start = time.monotonic()
    col.release(held, timeout=0.05)
    try:
        assert time.monotonic() - start >= 0.05
        assert any(p is t for p in col._PARKED)
    finally:
        col._PARKED[:] = [p for p in col._PARKED if p is not t]
    del lingering


def test_release_returns_at_once_when_nothing_is_held():
    t = torch.ones(4)
    held = [(t, t._use_count())]
    start = time.monotonic()
    col.release(held, timeout=5.0)
    assert time.monotonic() - start < 1.0
    assert not any(p is t for p in col._PARKED)


def test_only_cpu_tensors_are_waited_for():
    # GPU collectives (NCCL) keep their tensors in the backend until the device is done: not waited for
    cpu, meta = torch.ones(2), torch.ones(2, device="meta")
    c = col.Collectives()
    c._hand_over(cpu, meta)
    assert [t for t, _ in c._held] == [cpu]
