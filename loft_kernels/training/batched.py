"""The simulator's batched execution: all S workers' forward and backward through one network.

The S worker models have the same structure and differ only in their tensors
(each its own block of every partitioned layer, its own copy of every shared
one). The batched network is a shallow copy of that structure whose leaf
layers run the S workers side by side on worker-major activations
`[N, S * C, H, W]` (worker s owns channels `[s * C, (s + 1) * C)`; its own
channel count where a partitioned layer gives the workers different counts):

- a convolution: one convolution with S times the channel groups over the S
  workers' weights concatenated along the filters (a stacked grouped
  convolution), or, where the workers' blocks differ in size (n not divisible
  by S), one convolution per worker on its channel slice;
- a BatchNorm: one batch norm over all S * C channels, each channel being one
  worker's own channel, so the statistics are per worker as in the loop;
- a linear layer: one batched matrix product over `[N, S, F]`, or a loop where
  the workers' blocks differ;
- channel-wise layers (ReLU, pooling, identity) and the containers' own code
  (residual adds, flatten) act on the stacked activations unchanged.

Autograd writes every worker's gradients into that worker's own parameters,
so the workers' optimizers step exactly as in the loop. Only model classes
whose forward code is known to be channel-wise are accepted (`unsupported`
says why a model is not); everything else runs in the loop.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import models
from . import execution_choice as choice

# Containers whose forward code (adds, flatten, functional relu/pooling) acts per channel or per sample.
_CONTAINERS = (nn.Sequential, models.ResNet, models.PreActBlock, models.BasicBlock, models.Bottleneck, models.VGG,
               models.WideResNet, models.WideBlock)
UNEVEN = "the workers' blocks differ in size"  # the choices' key where only the loop form exists
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Flatten)


def unsupported(model: nn.Module) -> Optional[str]:
    """None if the batched execution can run `model`, else why not (one sentence)."""
    for name, m in model.named_modules():
        where = f"module {name or '(root)'} ({type(m).__name__})"
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                return f"{where} pads with {m.padding_mode!r}; the batched execution runs zero padding only"
        elif isinstance(m, nn.BatchNorm2d):
            if not m.affine or not m.track_running_stats:
                return f"{where} has no affine parameters or running statistics"
        elif isinstance(m, nn.Dropout):
            if m.p > 0:
                return f"{where}: dropout draws per worker in the loop's order, which one batched draw cannot match"
        elif type(m) not in _CONTAINERS and not isinstance(m, _CHANNELWISE + (nn.Linear,)):
            if next(m.children(), None) is not None:  # a container whose forward code is not known to be channel-wise
                known = ", ".join(sorted({c.__name__ for c in _CONTAINERS if c is not nn.Sequential}))
                return (f"{where}: its forward code is not known to act per worker (the batched execution runs "
                        f"nn.Sequential and {known})")
            return f"{where} is not a layer the batched execution knows to act per worker"
    return None


def _split_sizes(mods, size_of) -> list[int]:
    return [size_of(m) for m in mods]


class _Conv(nn.Module):
    def __init__(self, mods: Sequence[nn.Conv2d], name: str, auto: bool):
        super().__init__()
        self.mods = list(mods)  # plain list: the workers' modules are not children of the batched network
        self.name, self.auto = name, auto
        self.chosen: dict[str, str] = {}  # measurement key -> form, for this layer

    def _stacked(self, x: Tensor, ws, bs) -> Tensor:
        m0 = self.mods[0]
        bias = None if bs[0] is None else torch.cat(bs)
        return F.conv2d(x, torch.cat(ws), bias, m0.stride, m0.padding, m0.dilation, m0.groups * len(ws))

    def _loop(self, x: Tensor, ws, bs) -> Tensor:
        xs = x.split([w.shape[1] * m.groups for m, w in zip(self.mods, ws)], dim=1)
        return torch.cat([m._conv_forward(xi, w, b) for m, xi, w, b in zip(self.mods, xs, ws, bs)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        mods = self.mods
        ws, bs = [m.weight for m in mods], [m.bias for m in mods]
        if not all(w.shape == ws[0].shape for w in ws) or not all(m.groups == mods[0].groups for m in mods):
            self.chosen.setdefault(UNEVEN, choice.LOOP)
            return self._loop(x, ws, bs)  # blocks of different sizes: no stacked form
        if not self.auto:
            return self._stacked(x, ws, bs)
        m0 = mods[0]
        k = choice.key(x, ws, (m0.stride, m0.padding, m0.dilation, m0.groups, bs[0] is not None), len(mods))
        how = self.chosen.get(k)
        if how is None:
            how = self.chosen[k] = choice.choose(k, lambda: choice.measure_conv(x, ws, bs, self._stacked,
                                                                                 self._loop))
        return (self._stacked if how == choice.STACKED else self._loop)(x, ws, bs)


class _BatchNorm(nn.Module):
    def __init__(self, mods: Sequence[nn.BatchNorm2d]):
        super().__init__()
        self.mods = list(mods)
        self.training = mods[0].training

    def forward(self, x: Tensor) -> Tensor:
        mods, m0 = self.mods, self.mods[0]
        factor = 0.0
        if self.training:
            for m in mods:
                m.num_batches_tracked.add_(1)
            factor = 1.0 / float(m0.num_batches_tracked) if m0.momentum is None else m0.momentum
        mean, var = torch.cat([m.running_mean for m in mods]), torch.cat([m.running_var for m in mods])
        y = F.batch_norm(x, mean, var, torch.cat([m.weight for m in mods]), torch.cat([m.bias for m in mods]),
                         self.training, factor, m0.eps)
        if self.training:
            with torch.no_grad():  # the updated statistics back into each worker's own buffers
                sizes = _split_sizes(mods, lambda m: m.running_mean.shape[0])
                for m, mi, vi in zip(mods, mean.split(sizes), var.split(sizes)):
                    m.running_mean.copy_(mi)
                    m.running_var.copy_(vi)
        return y


class _Linear(nn.Module):
    def __init__(self, mods: Sequence[nn.Linear]):
        super().__init__()
        self.mods = list(mods)

    def forward(self, x: Tensor) -> Tensor:
        mods = self.mods
        if x.dim() != 2:
            raise ValueError(f"the batched execution runs linear layers on [N, features] inputs, got {tuple(x.shape)}")
        ws = [m.weight for m in mods]
        if all(w.shape == ws[0].shape for w in ws):
            n, s = x.shape[0], len(mods)
            y = torch.einsum("nsf,sof->nso", x.view(n, s, -1), torch.stack(ws))
            if mods[0].bias is not None:  # in y's dtype, as F.linear adds it (under autocast too)
                y = y + torch.stack([m.bias for m in mods]).to(y.dtype)
            return y.reshape(n, -1)
        xs = x.split(_split_sizes(mods, lambda m: m.weight.shape[1]), dim=1)
        return torch.cat([F.linear(xi, m.weight, m.bias) for m, xi in zip(mods, xs)], dim=1)


def _build(mods: Sequence[nn.Module], name: str, auto: bool) -> nn.Module:
    m0 = mods[0]
    if isinstance(m0, nn.Conv2d):
        return _Conv(mods, name, auto)
    if isinstance(m0, nn.BatchNorm2d):
        return _BatchNorm(mods)
    if isinstance(m0, nn.Linear):
        return _Linear(mods)
    if isinstance(m0, _CHANNELWISE + (nn.Dropout,)):
        return m0
    net = copy.copy(m0)  # the container's own code and attributes; children replaced below
    net._modules = {}
    for child_name, child in m0._modules.items():
        net._modules[child_name] = None if child is None else _build(
            [m._modules[child_name] for m in mods], f"{name}.{child_name}" if name else child_name, auto)
    net._parameters, net._buffers = {}, {}
    return net


class BatchedWorkers:
    """Runs the S worker models' forward, loss and backward as one network (see the module docstring)."""

    def __init__(self, worker_models: Sequence[nn.Module], auto: bool = False):
        reason = unsupported(worker_models[0])
        if reason is not None:
            raise ValueError(f"execution='batched' cannot run this model: {reason}; use execution='loop'")
        self.workers = len(worker_models)
        self.net = _build(list(worker_models), "", auto)
        self._convs = [m for m in self.net.modules() if isinstance(m, _Conv)]

    def choices(self) -> dict[str, dict[str, str]]:
        """For every convolution (by its name in the model): measurement key -> the form `auto` chose."""
        return {c.name: dict(c.chosen) for c in self._convs}

    def all_loop(self) -> bool:
        """True when `auto` measured the loop faster on every convolution it has run (and ran at least one)."""
        chosen = [how for c in self._convs for how in c.chosen.values()]
        return bool(chosen) and all(how == choice.LOOP for how in chosen)

    @staticmethod
    def accepts(inputs: Sequence) -> bool:
        """Whether the workers' inputs stack: [N, C, H, W] tensors of one shape."""
        return all(isinstance(x, Tensor) and x.dim() == 4 and x.shape == inputs[0].shape for x in inputs)

    def forward_backward(self, batches: Sequence, loss_fn: Callable, scalers: Optional[Sequence],
                         training: bool, losses: list) -> None:
        """Every worker's loss (appended to `losses`, as floats) and gradients, in one forward and one backward."""
        inputs = [x for x, _ in batches]
        if not self.accepts(inputs):
            raise ValueError("execution='batched' needs every worker's inputs as [N, C, H, W] tensors of one shape, "
                             f"got {[tuple(getattr(x, 'shape', ())) for x in inputs]}")
        self.net.train(training)
        out = self.net(torch.cat(inputs, dim=1))
        outs = out.view(out.shape[0], self.workers, -1)
        total = []
        for s, (_, targets) in enumerate(batches):
            loss = loss_fn(outs[:, s], targets)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got "
                                 f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}")
            total.append(loss if scalers is None else scalers[s].scale(loss))
            losses.append(float(loss.detach()))
        torch.stack(total).sum().backward()
