"""How a LoFT rank exchanges its sync payload with its peers: the one thing a LoftOptimizer is given to sync.

An exchange knows its `rank` and `workers` and, called with this rank's
`Payload`, returns what every rank receives: the mean of the `mean` buffers,
the max of the `max` buffers and every rank's `gather` buffer stacked in rank
order. `check(fingerprint, what)` compares the configuration of all ranks.

- `Solo`: one worker, nothing to exchange;
- `DistributedExchange`: the ranks of a torch.distributed process group;
- `InProcessExchange`: S workers simulated in one process (`LoftSimulator`).
  Its workers sync together inside `InProcessExchange.run`, each worker's
  `LoftOptimizer.sync()` on its own thread, meeting at a barrier where the
  buffers are combined once.
"""
from __future__ import annotations

import abc
import threading
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from . import fingerprint as fp
from .collectives import Collectives
from .sync import Payload


class Exchange(abc.ABC):
    """Base: rank `rank` of `workers`; see the module docstring."""

    def __init__(self, rank: int, workers: int):
        self.rank, self.workers = rank, workers

    @abc.abstractmethod
    def __call__(self, payload: Payload, what: str) -> Payload:
        """This rank's exchanged buffers for `payload` (the sync named `what` in errors)."""

    def check(self, fingerprint: dict, what: str, local_error: str = "") -> None:
        """Raise the same ValueError on every rank if the configurations differ (or one rank reports an error)."""
        if local_error:
            raise ValueError(local_error)


class Solo(Exchange):
    """One worker: a sync exchanges nothing."""

    def __init__(self):
        super().__init__(0, 1)

    def __call__(self, payload: Payload, what: str) -> Payload:
        return payload


class DistributedExchange(Exchange):
    """The ranks of a torch.distributed process group; the all_gather outputs are reused between syncs."""

    def __init__(self, group):
        super().__init__(dist.get_rank(group), dist.get_world_size(group))
        self.group = group
        self._buffers: dict = {}

    def __call__(self, payload: Payload, what: str) -> Payload:
        return distributed_exchange(payload, self.group, self.rank, self.workers, what, self._buffers)

    def check(self, fingerprint: dict, what: str, local_error: str = "") -> None:
        fp.check_across_ranks(fingerprint, self.group, self.rank, self.workers, what=what, local_error=local_error)

    def __getstate__(self):
        raise TypeError("a LoftOptimizer on a torch.distributed process group cannot be copied or pickled (its "
                        "process group cannot); save optimizer.state_dict() and model.state_dict() instead")


def exchange_for(process_group) -> Exchange:
    """The exchange of `process_group` (see LoftOptimizer): None -> the default group if initialised, else Solo."""
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        return DistributedExchange(dist.group.WORLD) if initialised and dist.get_world_size() > 1 else Solo()
    if not initialised:
        raise ValueError("process_group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__}")
    if dist.get_rank(process_group) < 0:
        raise ValueError("process_group does not contain this process")
    return DistributedExchange(process_group) if dist.get_world_size(process_group) > 1 else Solo()


class InProcessExchange:
    """The meeting point of S workers simulated in one process; `rank(r)` is worker r's exchange."""

    def __init__(self, workers: int):
        self.workers = workers
        self._payloads: list = [None] * workers
        self._result: Optional[Payload] = None
        self._barrier: Optional[threading.Barrier] = None

    def rank(self, r: int) -> "LocalRank":
        return LocalRank(self, r)

    def run(self, syncs: Sequence[Callable[[], None]]) -> None:
        """Call syncs[r]() for every worker r, each on its own thread (they meet in the exchange); the first
        failure is raised once all have returned (a failed worker breaks the barrier, so none waits forever)."""
        if len(syncs) != self.workers:
            raise ValueError(f"internal: {len(syncs)} syncs for {self.workers} workers")
        self._barrier = threading.Barrier(self.workers, action=self._combine)
        errors: list = [None] * self.workers

        def run_one(r):
            try:
                syncs[r]()
            except BaseException as exc:  # noqa: BLE001 (re-raised below, on the caller's thread)
                errors[r] = exc
                self._barrier.abort()
        threads = [threading.Thread(target=run_one, args=(r,), name=f"loft-sim-sync-{r}") for r in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._barrier, self._result, self._payloads = None, None, [None] * self.workers
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]

    def _combine(self) -> None:
        self._result = simulate_exchange(self._payloads)

    def _exchange(self, r: int, payload: Payload) -> Payload:
        if self._barrier is None:
            raise RuntimeError(f"worker {r} of {self.workers} is simulated in one process; its sync runs with every "
                               f"other worker's, from LoftSimulator (step() or finalize())")
        self._payloads[r] = payload
        self._barrier.wait()
        return self._result

    def __getstate__(self):
        if self._barrier is not None:
            raise TypeError("the simulated workers are syncing: a copy cannot be taken during the sync")
        return dict(self.__dict__)


class LocalRank(Exchange):
    """Worker r of an `InProcessExchange`."""

    def __init__(self, meeting: InProcessExchange, r: int):
        super().__init__(r, meeting.workers)
        self.meeting = meeting

    def __call__(self, payload: Payload, what: str) -> Payload:
        return self.meeting._exchange(self.rank, payload)


def simulate_exchange(payloads: Sequence[Payload]) -> Payload:
    """What every rank receives when all S payloads are exchanged (same result for every rank)."""
    s = len(payloads)
    out = Payload()
    for dt in payloads[0].mean:
        total = payloads[0].mean[dt].clone()
        for p in payloads[1:]:
            total += p.mean[dt]
        out.mean[dt] = total.div_(s)
    for dt in payloads[0].max:
        out.max[dt] = torch.stack([p.max[dt] for p in payloads]).amax(0)
    for dt in payloads[0].gather:
        out.gather[dt] = torch.stack([p.gather[dt] for p in payloads])
    return out


def distributed_exchange(payload: Payload, group, rank: int, size: int, what: str,
                         buffers: Optional[dict] = None) -> Payload:
    """Run the payload's collectives on a torch.distributed group (all launched, then awaited).

    `buffers` (dtype -> tensor) keeps the all_gather outputs between syncs, so each
    sync does not page in a fresh model-sized buffer. A peer that died or stalled
    makes the backend raise (gloo: connection closed, or the process group's
    timeout); that becomes a RuntimeError saying so. Returns only once the
    backend's threads have let go of every buffer (see `collectives`).
    """
    buffers = {} if buffers is None else buffers
    comm, out = Collectives(group), Payload()
    try:
        for dt, buf in payload.mean.items():
            out.mean[dt] = comm.all_reduce(buf, dist.ReduceOp.SUM)
        for dt, buf in payload.max.items():
            out.max[dt] = comm.all_reduce(buf, dist.ReduceOp.MAX)
        for dt, buf in payload.gather.items():
            flat = buffers.get(dt)
            if flat is None or flat.numel() != size * buf.numel() or flat.device != buf.device:
                flat = buffers[dt] = buf.new_empty(size * buf.numel())  # gloo takes the concatenated form only
            out.gather[dt] = flat.view(size, buf.numel())  # the view before the hand-over: it owns `flat` too
            comm.all_gather(flat, buf)
        comm.wait()
    except RuntimeError as exc:
        raise RuntimeError(f"LoFT sync failed on rank {rank} of {size} during {what}: a peer process died, "
                           f"was killed or stalled past the process group's timeout ({exc})") from exc
    for buf in out.mean.values():
        buf.div_(size)
    return out


__all__ = ["Exchange", "Solo", "DistributedExchange", "InProcessExchange", "LocalRank", "exchange_for",
           "simulate_exchange", "distributed_exchange"]
