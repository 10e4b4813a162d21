"""Today's compact CNNs for CIFAR-sized inputs: MobileNetV2 and a small ConvNeXt-style network.

MobileNetV2 (Sandler et al. 2018) as kuangliu/pytorch-cifar writes it for
32x32: stride-1 stem, the (expansion, out, blocks, stride) table with the
second stage at stride 1, inverted residual blocks expand 1x1 - BN - ReLU6 -
depthwise 3x3 - BN - ReLU6 - project 1x1 - BN, a residual add when the stride
is 1. Each block's expand/depthwise/project chain is one filter group with the
depthwise conv as a per-channel member.

ConvNeXt-style (Liu et al. 2022), scaled to 32x32: a 2x2 stride-2 patchify stem,
stages of blocks depthwise 7x7 - channels-last LayerNorm - Linear (4x) - GELU -
Linear - layer scale - residual add, LayerNorm + 2x2 stride-2 conv between
stages, global mean - LayerNorm - Linear head. Each block's MLP (the two
channels-last Linear layers) is one filter group.

Both take `num_classes`, `in_channels` and a `width` multiplier on every
channel count, like the rest of the zoo.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._model_args import _common, _depths, _scaled

# (expansion, output channels, blocks, stride of the first block) per stage, for 32x32 inputs.
MOBILENET_V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """expand 1x1 - BN - ReLU6 - depthwise 3x3 (stride) - BN - ReLU6 - project 1x1 - BN (+ shortcut if stride 1)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        planes = expansion * in_planes
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu6(self.bn1(self.conv1(x)))
        out = F.relu6(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs; blocks are `layers.<i>`, the stem `conv1`/`bn1`, the last 1x1 `conv2`/`bn2`."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 cfg: Sequence = MOBILENET_V2_CFG):
        super().__init__()
        num_classes, in_channels, width = _common(num_classes, in_channels, width)
        c = _scaled(32, width)
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        blocks = []
        for expansion, out, count, stride in cfg:
            out = _scaled(out, width)
            for b in range(count):
                blocks.append(InvertedResidual(c, out, expansion, stride if b == 0 else 1))
                c = out
        self.layers = nn.Sequential(*blocks)
        last = _scaled(1280, width)
        self.conv2 = nn.Conv2d(c, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(self.layers(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 for CIFAR (stride-1 stem, 2.3M parameters at width 1)."""
    return MobileNetV2(num_classes, in_channels, width)


# ------------------------------------------------------------- ConvNeXt ----
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's channels-first LayerNorm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 - permute to NHWC - LayerNorm - pwconv1 (Linear, 4x) - GELU - pwconv2 (Linear) - gamma - add."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x):
        out = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        out = self.pwconv2(self.act(self.pwconv1(out)))
        return x + (self.gamma * out).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """ConvNeXt-style network for 32x32: `stem`, stages `stages.<s>.<b>`, `downsample.<s>` between them, head."""

    def __init__(self, depths: Sequence[int] = (2, 2, 2), dims: Sequence[int] = (64, 128, 256),
                 num_classes: int = 10, in_channels: int = 3, width: float = 1.0, layer_scale: float = 1e-6):
        super().__init__()
        depths = _depths(depths)
        dims = _depths(dims, "dims")
        if len(dims) != len(depths):
            raise ValueError(f"dims must give one width per stage ({len(depths)}), got {dims}")
        num_classes, in_channels, width = _common(num_classes, in_channels, width)
        dims = [_scaled(d, width) for d in dims]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, stride=2), LayerNorm2d(dims[0]))
        self.downsample = nn.ModuleList(
            nn.Sequential(LayerNorm2d(dims[s - 1]), nn.Conv2d(dims[s - 1], dims[s], 2, stride=2))
            for s in range(1, len(dims)))
        self.stages = nn.ModuleList(nn.Sequential(*(ConvNeXtBlock(d, layer_scale) for _ in range(depth)))
                                    for d, depth in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stages[0](self.stem(x))
        for down, stage in zip(self.downsample, self.stages[1:]):
            x = stage(down(x))
        return self.head(self.norm(x.mean((-2, -1))))


def convnext_cifar(depths: Sequence[int] = (2, 2, 2), dims: Sequence[int] = (64, 128, 256), num_classes: int = 10,
                   in_channels: int = 3, width: float = 1.0) -> ConvNeXt:
    """A small ConvNeXt-style network for 32x32 inputs (three stages; 32 -> 16 -> 8 -> 4 spatial)."""
    return ConvNeXt(depths, dims, num_classes, in_channels, width)
