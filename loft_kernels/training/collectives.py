"""Collectives whose tensors are always let go of by the Python thread, never by a backend thread.

Why: a gloo worker thread can still hold a collective's tensors for a moment
after `wait()` has returned (it drops its reference to the finished work a
little later). If Python has already let go of those tensors, that thread is
the one that frees them, and freeing a tensor Python has seen takes the GIL.
When the interpreter starts finalizing meanwhile (the collective was among a
process's last), CPython ends such a thread on the spot, inside a C++
destructor, and the process aborts with "terminate called without an active
exception". torch keeps the default gloo group (and so its threads) alive
past `destroy_process_group` once `torch._dynamo` has been imported, which
every `torch.optim` optimizer does, so the threads are there at exit. The
reasoning and measurements are in docs/algorithm.md ("Leaving cleanly").

`Collectives` launches asynchronously, waits for every collective (all of
them, even after one failed), drops the work handles, and then waits, with
the GIL released, until each tensor's reference count is back where it was
before the backend saw it. Only then does the caller get its tensors back.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# How long to wait for a backend thread to let go of a tensor before parking it (normally < 1 ms).
RELEASE_TIMEOUT_S = 10.0
# Tensors a backend thread still held when we stopped waiting. Kept for the life of the process: their
# last reference then goes when the interpreter is already past the point where freeing takes the GIL.
_PARKED: list[Tensor] = []


def _use_count(t: Tensor) -> int:
    count = getattr(t, "_use_count", None)  # owners of the tensor, C++ ones included
    return count() if count is not None else 0


class Collectives:
    """Asynchronous collectives on one process group, awaited together; see the module docstring.

    Between launching and `wait()`, do not create lasting views of the
    tensors handed over (a view counts as an owner): make them before.
    """

    def __init__(self, group=None):
        self.group = group
        self._works: list = []
        self._held: list[tuple[Tensor, int]] = []  # (tensor, its owner count before the backend saw it)

    def _hand_over(self, *tensors: Tensor) -> None:
        # CPU tensors only (gloo): NCCL's watchdog thread keeps a GPU collective's tensors until the device has
        # finished it, so waiting for it to let go would stall every sync on the GPU; that path is left as is.
        self._held.extend((t, _use_count(t)) for t in tensors if t.device.type == "cpu")

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        self._hand_over(tensor)
        self._works.append(dist.all_reduce(tensor, op=op, group=self.group, async_op=True))
        return tensor

    def all_gather(self, output: Tensor, tensor: Tensor) -> Tensor:
        """`output` (world size x tensor.numel(), flat) = every rank's `tensor`, in rank order."""
        self._hand_over(output, tensor)
        self._works.append(all_gather_single(output, tensor, group=self.group, async_op=True))
        return output

    def wait(self) -> None:
        """Wait for every launched collective, then for the backend to let go; re-raise the first failure.

        A collective that fails (a peer died) still lets the others finish
        first (they fail fast once a peer is gone): leaving with gloo work in
        flight is what aborts a process.
        """
        error = _wait_all(self._works)  # empties the list: the work handles own the tensors too
        release(self._held)
        self._held = []
        if error is not None:
            raise error


def _wait_all(works: list) -> Optional[RuntimeError]:
    """Wait for every work; the first failure, if any (its handles go with this frame)."""
    error = None
    while works:
        try:
            works.pop(0).wait()  # no variable keeps the handle (nor a failure's traceback)
        except RuntimeError as exc:  # DistBackendError/DistNetworkError are RuntimeErrors
            error = error or exc
    return error


def release(held: list[tuple[Tensor, int]], timeout: float = RELEASE_TIMEOUT_S) -> None:
    """Wait until every tensor's owner count is back to (at most) the recorded one; park stragglers."""
    pending = [(t, n) for t, n in held if _use_count(t) > n]
    deadline, spins = time.monotonic() + timeout, 0
    while pending:
        if time.monotonic() > deadline:
            _PARKED.extend(t for t, _ in pending)
            return
        time.sleep(0 if spins < 1000 else 1e-4)  # sleeping releases the GIL the backend thread may need
        spins += 1
        pending = [(t, n) for t, n in pending if _use_count(t) > n]


def comm_device(group=None) -> torch.device:
    """The device `group`'s collectives run on: the current GPU under NCCL, the CPU under gloo."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: Tensor, op=dist.ReduceOp.SUM, group=None) -> Tensor:
    """`dist.all_reduce` that returns only once the backend has let go of `tensor`."""
    c = Collectives(group)
    c.all_reduce(tensor, op)
    c.wait()
    return tensor


def all_gather(output: Tensor, tensor: Tensor, group=None) -> Tensor:
    """All-gather into the flat `output` (rank order) that returns only once the backend has let go."""
    c = Collectives(group)
    c.all_gather(output, tensor)
    c.wait()
    return output


def all_gather_int_lists(values: list[int], group=None) -> list[list[int]]:
    """Every rank's list of ints (lengths may differ), in rank order: two fixed-size tensor collectives."""
    device = comm_device(group)
    world = dist.get_world_size(group)
    length = all_reduce(torch.tensor([len(values)], dtype=torch.int64, device=device), dist.ReduceOp.MAX, group)
    width = int(length.item()) + 1  # slot 0: this rank's length
    mine = torch.zeros(width, dtype=torch.int64, device=device)
    mine[0] = len(values)
    if values:
        mine[1:1 + len(values)] = torch.tensor(values, dtype=torch.int64)
    table = all_gather(torch.empty(world * width, dtype=torch.int64, device=device), mine, group)
    rows = table.view(world, width).tolist()
    return [row[1:1 + row[0]] for row in rows]
