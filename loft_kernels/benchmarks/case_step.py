"""P6: one LoFT-4 worker step (forward + backward + optimizer) of PreActResNet-18 against its FLOP share.

The candidate is rank 0 of 4 as `LoftOptimizer` runs it (its filters active,
the base SGD stepping its compact views), on a batch of 32 fresh 32x32
inputs. The limit is a dense step of the same model scaled by the sub-model's
share of the forward FLOPs (`tickets.flops.count_params_flops`, which counts the
filters each layer actually runs), i.e. what the step would cost if it were
exactly as efficient as dense.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..backends import select
from ..models import preact_resnet18
from ..tickets.flops import count_params_flops
from ..training.groups import convert
from ..training.optimizer import LoftOptimizer
from ..training.sync import LocalGroup
from .result import Config, Result, Spec, timed
from .shapes import BATCH, RESOLUTION
from .timing import interleaved

WORKERS = 4
NEVER = 1 << 30  # sync_every: the benchmark times local steps only

P6 = (
    Spec("P6", "LoFT-4 worker step (fwd+bwd+SGD), PreActResNet-18, batch 32",
         "dense step x (sub-model FLOPs / dense FLOPs)", 1.2, "ratio <= 1.2"),
)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def _step_setup(model, opt, device):
    def setup():
        x = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, device=device)
        y = torch.randint(0, 10, (BATCH,), device=device)

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step
    return setup


def p6(cfg: Config) -> list[Result]:
    dev = cfg.device
    dense_model = preact_resnet18(num_classes=10).to(dev).train()
    example = torch.randn(2, 3, RESOLUTION, RESOLUTION, device=dev)
    loft_model, groups = convert(copy.deepcopy(dense_model), example, policy="all")
    loft_opt = LoftOptimizer(_sgd(loft_model.parameters()), loft_model, groups, sync_every=NEVER,
                             process_group=LocalGroup(0, WORKERS))
    share = count_params_flops(loft_model, example)["flops"] / count_params_flops(dense_model, example)["flops"]
    reps = cfg.reps(full=10, quick=2)
    t = interleaved({"loft": _step_setup(loft_model, loft_opt, dev),
                     "dense": _step_setup(dense_model, _sgd(dense_model.parameters()), dev)},
                    reps, warmup=cfg.warmup, device=dev)
    backend = select("partial_conv2d", dev, torch.float32)[0]
    return [timed(P6[0], t, "loft", "dense", scale=share, backend=backend, repeats=reps,
                  flop_share=round(share, 4), groups=len(groups),
                  note=f"sub-model/dense forward FLOPs = {share:.3f} (policy 'all', {len(groups)} groups)")]


CASES = {"P6": (P6, p6)}
