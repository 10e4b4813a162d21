"""P7: the communication model against the paper's GPipe numbers (PreActResNet-34, CIFAR-10 shapes).

The paper reports GPipe-2 131.88 GB and GPipe-4 461.60 GB; their ratio (3.50)
depends only on where the stages are cut and on the activation sizes, which
`lk.comm_cost` measures on the zoo's PreActResNet-34 with a 32x32 input.
"""
from __future__ import annotations

import torch

from ..comm_model import comm_cost
from ..models import preact_resnet34
from .result import Config, Result, Spec, valued

PAPER_GPIPE = {2: 131.88e9, 4: 461.60e9}  # bytes over the whole pretraining (poster table)
CIFAR10_TRAIN = 50_000
EPOCHS = 10  # the epoch count the paper's absolute GPipe numbers are closest to (docs/comm_model.md)

P7 = (
    Spec("P7", "comm model GPipe-4 / GPipe-2, PreActResNet-34 CIFAR-10", "paper: 461.60 / 131.88 = 3.50",
         0.02, "abs(ratio - 1) <= 0.02", within=True),
)


def p7(cfg: Config) -> list[Result]:
    model = preact_resnet34(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    samples = EPOCHS * CIFAR10_TRAIN
    cost = {s: comm_cost(model, x, "gpipe", s, 128, samples) for s in (2, 4)}
    ours = cost[4].total_bytes / cost[2].total_bytes
    paper = PAPER_GPIPE[4] / PAPER_GPIPE[2]
    note = (f"{EPOCHS} epochs: GPipe-2 {cost[2].total_bytes / 1e9:.2f} GB (paper 131.88), "
            f"GPipe-4 {cost[4].total_bytes / 1e9:.2f} GB (paper 461.60)")
    return [valued(P7[0], ours, paper, unit="", note=note,
                   cuts={str(s): cost[s].details["cut_before"] for s in cost})]


CASES = {"P7": (P7, p7)}
