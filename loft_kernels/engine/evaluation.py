"""Evaluation of the full model and BatchNorm recalibration after LoFT pretraining."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from ..data import BatchLoader
from ..nn import full_view


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device=None, batch_size: int = 500) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy in percent} of the full model (all filters) in eval mode."""
    C.tensor(x, "x", ndim=4, floating=True)
    C.tensor(y, "y", ndim=1)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same non-zero number of samples, got {x.shape[0]} and {y.shape[0]}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with full_view(model):
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                out = model(xb)
                loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / x.shape[0], "acc": 100.0 * correct / x.shape[0]}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: BatchLoader, *, epoch: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics of the full model from one pass over `loader`.

    A LoFT worker's consumer sums only its 1/S of the input channels (no 1/S
    rescaling, as in the official code), so the running statistics of the layers
    after it describe sub-model activations; the full model's are about S times
    larger. One forward pass in train mode (cumulative averages, no gradients)
    measures the full model's. Modifies `model` in place and returns it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    try:
        with full_view(model):
            for x, _ in loader.epoch(epoch):
                model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return model
