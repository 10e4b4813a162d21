"""P9: the trainers' memory format, channels-last against the contiguous layout, one training step each.

`TrainConfig(memory_format="auto")` puts the model's 4-D tensors and the
batches in channels-last on a CPU (contiguous elsewhere); these rows are the
measurement that default rests on. Each times one step (forward, backward,
SGD) of the same weights on fresh inputs in both layouts, interleaved:

P9v: the Fashion-MNIST showcase's VGG (width 0.5, 1x28x28, batch 64), dense.
P9r: PreActResNet-18 at the suite's shapes (batch 32, 32x32), dense.
P9s: `LoftSimulator` with 4 workers on that VGG (64 samples per worker, the
loop execution), one step of every worker.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from ..models import VGG_CONFIGS, preact_resnet18, vgg
from ..training.groups import convert
from ..training.simulator import LoftSimulator
from .case_step import sgd_step
from .result import Config, Result, Spec, failed, timed
from .shapes import BATCH, RESOLUTION
from .timing import interleaved

WORKERS = 4
NEVER = 1 << 30
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

P9 = (
    Spec("P9v", "dense step in channels-last, showcase VGG (width 0.5, 28x28, batch 64)", "the contiguous layout",
         1.0, "ratio <= 1.0"),
    Spec("P9r", "dense step in channels-last, PreActResNet-18 (batch 32, 32x32)", "the contiguous layout",
         1.0, "ratio <= 1.0"),
    Spec("P9s", "LoftSimulator S=4 step in channels-last, showcase VGG (64 per worker)", "the contiguous layout",
         1.0, "ratio <= 1.0"),
)
_sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)


def _showcase_vgg():
    return vgg(VGG_CONFIGS["vgg_small"], num_classes=10, in_channels=1, width=0.5), (1, 28, 28), 64


def _resnet():
    return preact_resnet18(num_classes=10), (3, RESOLUTION, RESOLUTION), BATCH


def _batch(shape, n, layout, device):
    x = torch.randn(n, *shape, device=device).contiguous(memory_format=layout)
    return x, torch.randint(0, 10, (n,), device=device)


def _dense_setups(build, device) -> dict:
    torch.manual_seed(0)
    model, shape, n = build()
    setups = {}
    for name, layout in LAYOUTS.items():
        m = copy.deepcopy(model).to(device, memory_format=layout).train()
        opt = _sgd(m.parameters())

        def setup(m=m, opt=opt, layout=layout):
            x, y = _batch(shape, n, layout, device)
            return lambda: sgd_step(m, opt, x, y)
        setups[name] = setup
    return setups


def _simulator_setups(device) -> dict:
    torch.manual_seed(0)
    model, shape, n = _showcase_vgg()
    example = torch.randn(2, *shape, device=device)
    setups = {}
    for name, layout in LAYOUTS.items():
        full, groups = convert(copy.deepcopy(model).to(device, memory_format=layout).train(), example, policy="all")
        sim = LoftSimulator(full, groups, _sgd, workers=WORKERS, sync_every=NEVER, execution="loop")

        def setup(sim=sim, layout=layout):
            batches = [_batch(shape, n, layout, device) for _ in range(WORKERS)]
            return lambda: sim.step(batches, F.cross_entropy)
        setups[name] = setup
    return setups


def p9(cfg: Config) -> list[Result]:
    rows = []
    for spec, make, (full, quick) in ((P9[0], lambda: _dense_setups(_showcase_vgg, cfg.device), (20, 3)),
                                      (P9[1], lambda: _dense_setups(_resnet, cfg.device), (10, 2)),
                                      (P9[2], lambda: _simulator_setups(cfg.device), (10, 2))):
        try:
            reps = cfg.reps(full=full, quick=quick)
            t = interleaved(make(), reps, warmup=cfg.warmup, device=cfg.device)
            rows.append(timed(spec, t, "channels_last", "contiguous", repeats=reps))
        except Exception as exc:  # one failing row still reports the others
            rows.append(failed(spec, f"{type(exc).__name__}: {exc}"))
    return rows


CASES = {"P9": (P9, p9)}
