"""A small model zoo for CIFAR-sized inputs: pre-/post-activation ResNets, VGG, WideResNet
(and, from models_modern, MobileNetV2 and a ConvNeXt-style network).

Written the usual way (kuangliu/pytorch-cifar, torchvision, xternalz/WideResNet):
3x3 stride-1 stem without max-pool, stages `layer1..layerN` of blocks
`layerS.B`, residual adds in forward. Pre-activation blocks use functional
F.relu, post-activation blocks a shared nn.ReLU module (as torchvision does),
VGG nn.ReLU modules in an nn.Sequential, so filter-group discovery sees both
forms. Every constructor takes `num_classes`, `in_channels` and a `width`
multiplier on all channel counts (tiny widths for tests). The global pool is
adaptive, so any input size that survives the strides works.
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as C
from ._model_args import _common, _depths, _scaled
from .models_modern import convnext_cifar, mobilenet_v2


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


# -------------------------------------------------------------- ResNets ----
class PreActBlock(nn.Module):
    """Pre-activation BasicBlock: bn1-relu-conv1-bn2-relu-conv2 + shortcut."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """Post-activation BasicBlock: conv1-bn1-relu-conv2-bn2 (+ shortcut) - relu."""
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # one module used twice, as in torchvision
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Post-activation Bottleneck: 1x1 conv1 - 3x3 conv2 (stride) - 1x1 conv3 (x4 channels)."""
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet over `block` with `depths[s]` blocks in stage s (planes 64 * 2**s * width).

    Pre-activation blocks get a final bn-relu before the pool (He et al. 2016).
    """

    def __init__(self, block: type, depths: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0):
        super().__init__()
        depths = _depths(depths)
        num_classes, in_channels, width = _common(num_classes, in_channels, width)
        self.preact = block is PreActBlock
        self.in_planes = _scaled(64, width)
        self.conv1 = _conv3x3(in_channels, self.in_planes)
        if not self.preact:
            self.bn1 = nn.BatchNorm2d(self.in_planes)
        for s, depth in enumerate(depths):
            planes = _scaled(64 * 2 ** s, width)
            blocks = []
            for b in range(depth):
                blocks.append(block(self.in_planes, planes, 2 if (s > 0 and b == 0) else 1))
                self.in_planes = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        if self.preact:
            self.bn = nn.BatchNorm2d(self.in_planes)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        for s in range(self.num_stages):
            out = getattr(self, f"layer{s + 1}")(out)
        if self.preact:
            out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


def preact_resnet(depths: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                  width: float = 1.0) -> ResNet:
    """Pre-activation ResNet with BasicBlocks; e.g. depths=(1, 1, 1, 1), width=0.125 for a tiny one."""
    return ResNet(PreActBlock, depths, num_classes, in_channels, width)


def resnet(depths: Sequence[int] = (2, 2, 2, 2), block: str = "basic", num_classes: int = 10,
           in_channels: int = 3, width: float = 1.0) -> ResNet:
    """Post-activation ResNet; block "basic" (BasicBlock) or "bottleneck" (Bottleneck)."""
    kinds = {"basic": BasicBlock, "bottleneck": Bottleneck}
    if not isinstance(block, str) or block not in kinds:
        raise ValueError(f"block must be one of {tuple(kinds)}, got {block!r}")
    return ResNet(kinds[block], depths, num_classes, in_channels, width)


def preact_resnet18(**kw) -> ResNet:
    return preact_resnet((2, 2, 2, 2), **kw)


def preact_resnet34(**kw) -> ResNet:
    return preact_resnet((3, 4, 6, 3), **kw)


def resnet18(**kw) -> ResNet:
    return resnet((2, 2, 2, 2), "basic", **kw)


def resnet34(**kw) -> ResNet:
    return resnet((3, 4, 6, 3), "basic", **kw)


def resnet50(**kw) -> ResNet:
    return resnet((3, 4, 6, 3), "bottleneck", **kw)


# ------------------------------------------------------------------ VGG ----
VGG_CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg_small": (64, "M", 128, "M", 256, "M"),  # for 8x8 (digits) and tests
}


class VGG(nn.Module):
    """VGG with BatchNorm: `features` = [conv(bias) - bn - relu | maxpool]*, then pool and `classifier`."""

    def __init__(self, cfg: Sequence, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        num_classes, in_channels, width = _common(num_classes, in_channels, width)
        if not isinstance(cfg, (list, tuple)) or not any(isinstance(v, int) for v in cfg):
            raise TypeError(f"cfg must be a sequence of channel counts and 'M' (max-pool) with at least one "
                            f"conv, got {cfg!r}")
        layers, c = [], in_channels
        for i, v in enumerate(cfg):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                v = _scaled(C.positive_int(v, f"cfg[{i}]"), width)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg(cfg: Sequence = VGG_CONFIGS["vgg_small"], num_classes: int = 10, in_channels: int = 3,
        width: float = 1.0) -> VGG:
    """VGG-BN from a config such as VGG_CONFIGS["vgg11"]: ints are conv widths, "M" a 2x2 max-pool."""
    return VGG(cfg, num_classes, in_channels, width)


def vgg11(**kw) -> VGG:
    return vgg(VGG_CONFIGS["vgg11"], **kw)


def vgg16(**kw) -> VGG:
    return vgg(VGG_CONFIGS["vgg16"], **kw)


# ------------------------------------------------------------ WideResNet ----
class WideBlock(nn.Module):
    """WRN pre-activation block: bn1-relu-conv1-bn2-relu-dropout-conv2 + shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return torch.add(out, shortcut)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis): 3 stages `layer1..layer3` of (depth-4)/6 blocks, widths 16k/32k/64k."""

    def __init__(self, depth: int = 16, widen_factor: int = 4, dropout: float = 0.3, num_classes: int = 10,
                 in_channels: int = 3, width: float = 1.0):
        super().__init__()
        depth = C.positive_int(depth, "depth")
        widen_factor = C.positive_int(widen_factor, "widen_factor")
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6k + 4 with k >= 1 (10, 16, 22, 28, ...), got {depth}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        num_classes, in_channels, width = _common(num_classes, in_channels, width)
        n = (depth - 4) // 6
        c = _scaled(16, width)
        self.conv1 = _conv3x3(in_channels, c)
        for s in range(3):
            planes = _scaled(16 * 2 ** s * widen_factor, width)
            blocks = []
            for b in range(n):
                blocks.append(WideBlock(c, planes, 2 if (s > 0 and b == 0) else 1, float(dropout)))
                c = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(c)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.linear(out.flatten(1))


def wide_resnet(depth: int = 16, widen_factor: int = 4, dropout: float = 0.3, num_classes: int = 10,
                in_channels: int = 3, width: float = 1.0) -> WideResNet:
    return WideResNet(depth, widen_factor, dropout, num_classes, in_channels, width)


# ------------------------------------------------------------- registry ----
_MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet": preact_resnet, "preact_resnet18": preact_resnet18, "preact_resnet34": preact_resnet34,
    "resnet": resnet, "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
    "vgg": vgg, "vgg11": vgg11, "vgg16": vgg16, "wide_resnet": wide_resnet,
    "mobilenet_v2": mobilenet_v2, "convnext_cifar": convnext_cifar,
}


def available_models() -> list[str]:
    """Names accepted by `get_model`."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, e.g. get_model("preact_resnet18", num_classes=100, width=0.5)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (one of {available_models()}), got {type(name).__name__}")
    if name not in _MODELS:
        raise ValueError(f"name: unknown model {name!r}; available: {available_models()}")
    return _MODELS[name](**kwargs)
