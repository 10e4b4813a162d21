"""Evaluation of the full model and BatchNorm recalibration after LoFT pretraining."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks as C
from ..data import BatchLoader
from ..nn import full_view
from ..nn.views import training_mode


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device=None, batch_size: int = 500,
             memory_format: Optional[torch.memory_format] = None) -> dict:
    """{"loss": mean cross-entropy, "acc": accuracy in percent} of the full model (all filters) in eval mode.

    memory_format: the layout the batches are put in (the model's, for speed; None: as sliced from x).
    """
    C.tensor(x, "x", ndim=4, floating=True)
    C.tensor(y, "y", ndim=1)
    C.memory_format(memory_format, "memory_format")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same non-zero number of samples, got {x.shape[0]} and {y.shape[0]}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    with training_mode(model, False), full_view(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            if memory_format is not None:
                xb = xb.contiguous(memory_format=memory_format)
            out = model(xb)
            loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    return {"loss": loss_sum / x.shape[0], "acc": 100.0 * correct / x.shape[0]}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, *, epoch: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics of `model` from one pass over `batches`.

    Use it before evaluating a model pretrained with LoFT (see docs/algorithm.md,
    "The assembled model"): a LoFT worker's consumer sums only its 1/S of the input
    channels (no 1/S rescaling, as in the official code), so the running
    statistics of the layers after it describe sub-model activations while the
    full model's are about S times larger. One forward pass of the full model in
    train mode (cumulative averages, no gradients) measures the right ones.

    batches: a `BatchLoader` (its `epoch(epoch)` is used) or any iterable of
    input batches, each a floating tensor [N, ...] or a tuple/list whose first
    item is one (e.g. a torch DataLoader yielding (x, y)); moved to the model's
    device. Other parameters and buffers are untouched. Modifies `model` in
    place and returns it; a model without BatchNorm statistics is returned as is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    epoch = C.non_negative_int(epoch, "epoch")
    if isinstance(batches, BatchLoader):
        batches = batches.epoch(epoch)
    elif isinstance(batches, torch.Tensor) or not hasattr(batches, "__iter__"):
        raise TypeError(f"batches must be a BatchLoader or an iterable of batches (tensors or (x, y) tuples), "
                        f"got {type(batches).__name__}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    device = next(iter(model.parameters()), norms[0].running_mean).device
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    seen, ok = 0, False
    try:
        with training_mode(model, True), full_view(model):
            for i, batch in enumerate(batches):
                x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
                C.tensor(x, f"batch {i} of batches" + (" (its first item)" if x is not batch else ""),
                         floating=True)
                model(x.to(device))
                seen += 1
        if not seen:
            raise ValueError("batches yielded no batch; the statistics need at least one")
        ok = True
    finally:
        for m, momentum, mean, var, count in saved:
            m.momentum = momentum
            if not ok:  # a failed pass leaves the statistics as they were
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    return model
