"""Joining a torchrun job and the small collectives the engine needs."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from ..elastic import restart_count
from ..training.collectives import all_reduce, comm_device


class NotUnderTorchrun(ValueError):
    """`init_distributed` was called in a process that torchrun did not start."""


def init_distributed(device_text: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun job from its environment: (rank, world size, this rank's device).

    gloo on CPU, NCCL on GPU (cuda:LOCAL_RANK). Raises NotUnderTorchrun (a ValueError) outside torchrun.
    """
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise NotUnderTorchrun(f"--distributed needs the torchrun environment (missing {', '.join(missing)}); "
                         f"launch with: torchrun --nproc_per_node S -m loft_kernels pretrain --distributed ...")
    use_cuda = torch.cuda.is_available() if device_text == "auto" else device_text.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's c10d rendezvous shares its store with the workers and keeps it across restarts, so a
            # restarted group would read the killed ranks' addresses; a prefix per restart isolates each attempt.
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=default_pg_timeout)
            store = dist.PrefixStore(f"loft_kernels/restart{restart_count()}/", agent)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


def all_ranks_sum(value: int) -> int:
    """Sum of an int over every rank (every rank must call it)."""
    return int(all_reduce(torch.tensor([int(value)], dtype=torch.int64, device=comm_device())).item())
