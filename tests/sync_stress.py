"""One of two gloo processes syncing a LoftOptimizer and leaving; tests/test_sync_stress.py runs them many times.

python sync_stress.py RANK PORT SYNCS [DIE_AT]: with DIE_AT, rank 1 dies
(os._exit) before sync number DIE_AT, and rank 0 must fail with the sync's
RuntimeError and a normal interpreter exit (status 1), never an abort.
"""
import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, port: int, syncs: int, die_at) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import loft_kernels as lk
    try:
        torch.manual_seed(0)
        model = lk.get_model("preact_resnet18", num_classes=10, width=0.125)
        model, groups = lk.convert(model, torch.randn(2, 3, 32, 32), "all")
        opt = lk.LoftOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model, groups,
                               sync_every=1 << 30)
        for i in range(syncs):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
            if die_at == i and rank == 1:
                os._exit(0)  # a crash: no cleanup, no goodbye
            opt.finalize()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
