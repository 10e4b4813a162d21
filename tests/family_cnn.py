"""Structural stand-ins for torchvision's residual and mobile CNN families (written here, no torchvision needed).

Same layer structure, module layout and forward data flow as the torchvision
models of the same name: ResNet / ResNeXt / Wide-ResNet, RegNetX / RegNetY,
MobileNetV2, MobileNetV3 (hardswish, hardsigmoid SE), EfficientNet-B0 and
EfficientNetV2-S (MBConv with SE, fused MBConv, stochastic depth), MNASNet
(with state-dict versioning) and ShuffleNetV2 (channel split and shuffle).
Every constructor builds the real size by default and takes size knobs (width
multipliers, blocks per stage) for the reduced models the tests train.
Also the building blocks the other family modules share.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from functools import partial

import torch
from torch import nn


# ------------------------------------------------------------- shared blocks ----
def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of `divisor` (at least `divisor`), never more than 10 % below `value`."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> activation as modules "0", "1", "2" (torchvision's Conv2dNormActivation)."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, act=nn.ReLU, norm=nn.BatchNorm2d, bias=None,
                 padding=None):
        padding = (kernel - 1) // 2 if padding is None else padding
        layers = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups,
                            bias=norm is None if bias is None else bias)]
        if norm is not None:
            layers.append(norm(cout))
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
        self.out_channels = cout


class SqueezeExcitation(nn.Module):
    """x * scale_act(fc2(act(fc1(avgpool(x))))) with 1x1 convs."""

    def __init__(self, channels, squeeze, act=nn.ReLU, scale_act=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = act(), scale_act()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class StochasticDepth(nn.Module):
    """Drops the whole residual branch of a random subset of the samples while training (row mode)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(keep).div_(keep)


class _Classifier(nn.Module):
    """features -> global average pool -> flatten -> classifier: the common forward of the mobile families."""

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ------------------------------------------------------- ResNet / ResNeXt / Wide ----
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(planes), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, `groups`: ResNeXt) -> 1x1 (x4); the 3x3 width is planes * base_width / 64 * groups."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3, self.relu = nn.BatchNorm2d(planes * 4), nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """7x7/2 stem, 3x3/2 max pool, four stages `layer1..4`, global pool, `fc`. `base`: the first stage's planes."""

    def __init__(self, block, layers, num_classes=10, groups=1, width_per_group=64, base=64):
        super().__init__()
        self.cin = base
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(base), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        make = partial(self._stage, block, groups=groups, base_width=width_per_group)
        self.layer1 = make(base, layers[0])
        self.layer2 = make(base * 2, layers[1], 2)
        self.layer3 = make(base * 4, layers[2], 2)
        self.layer4 = make(base * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(base * 8 * block.expansion, num_classes)

    def _stage(self, block, planes, blocks, stride=1, **kw):
        downsample = None
        if stride != 1 or self.cin != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.cin, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        out = [block(self.cin, planes, stride, downsample, **kw)]
        self.cin = planes * block.expansion
        out += [block(self.cin, planes, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=10, layers=(2, 2, 2, 2), base=64):
    return ResNet(BasicBlock, layers, num_classes, base=base)


def resnet50(num_classes=10, layers=(3, 4, 6, 3), base=64):
    return ResNet(Bottleneck, layers, num_classes, base=base)


def resnext50_32x4d(num_classes=10, layers=(3, 4, 6, 3), base=64, groups=32, width_per_group=4):
    return ResNet(Bottleneck, layers, num_classes, groups, width_per_group, base)


def wide_resnet50_2(num_classes=10, layers=(3, 4, 6, 3), base=64):
    return ResNet(Bottleneck, layers, num_classes, width_per_group=128, base=base)


# -------------------------------------------------------------------- RegNet ----
def regnet_stages(depth, w_0, w_a, w_m, group_width):
    """(widths, depths, group widths) per stage of the quantized linear RegNet rule (Radosavovic et al. 2020):
    block i gets width w_0 * w_m^round(log((w_0 + w_a i) / w_0) / log(w_m)), rounded to 8; equal runs form stages;
    a stage's group width is at most its width, and its width a multiple of the group width."""
    widths, depths = [], []
    for i in range(depth):
        w = int(round(w_0 * w_m ** round(math.log((w_0 + w_a * i) / w_0) / math.log(w_m)) / 8) * 8)
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    groups = [min(group_width, w) for w in widths]
    widths = [int(w / g + 0.5) * g for w, g in zip(widths, groups)]
    return widths, depths, groups


class ResBottleneckBlock(nn.Module):
    """RegNet block: f = a (1x1) -> b (3x3 grouped, stride) -> [se] -> c (1x1, no act); relu(proj(x) + f(x))."""

    def __init__(self, w_in, w_out, stride, group_width, se_ratio=None):
        super().__init__()
        self.proj = ConvBNAct(w_in, w_out, 1, stride, act=None) if w_in != w_out or stride != 1 else None
        f = OrderedDict(a=ConvBNAct(w_in, w_out, 1), b=ConvBNAct(w_out, w_out, 3, stride, w_out // group_width))
        if se_ratio:
            f["se"] = SqueezeExcitation(w_out, int(round(se_ratio * w_in)))
        f["c"] = ConvBNAct(w_out, w_out, 1, act=None)
        self.f, self.activation = nn.Sequential(f), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activation((x if self.proj is None else self.proj(x)) + self.f(x))


class RegNet(nn.Module):
    """3x3/2 stem of 32, `trunk_output.block<s>.block<s>-<i>`, global pool, `fc`."""

    def __init__(self, widths, depths, group_widths, num_classes=10, se_ratio=None, stem=32):
        super().__init__()
        self.stem = ConvBNAct(3, stem, 3, 2)
        stages, cin = OrderedDict(), stem
        for s, (w, d, g) in enumerate(zip(widths, depths, group_widths), 1):
            blocks = OrderedDict()
            for i in range(d):
                blocks[f"block{s}-{i}"] = ResBottleneckBlock(cin, w, 2 if i == 0 else 1, g, se_ratio)
                cin = w
            stages[f"block{s}"] = nn.Sequential(blocks)
        self.trunk_output = nn.Sequential(stages)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.trunk_output(self.stem(x))), 1))


def regnet_x_400mf(num_classes=10, stages=None):
    """stages: (widths, depths, group widths) to override the 400MF rule (depth 22, w_0 24, w_a 24.48, w_m 2.54)."""
    return RegNet(*(stages or regnet_stages(22, 24, 24.48, 2.54, 16)), num_classes)


def regnet_y_400mf(num_classes=10, stages=None):
    """RegNetX blocks with a squeeze-excitation (ratio 0.25 of the block input) after the grouped conv."""
    return RegNet(*(stages or regnet_stages(16, 48, 27.89, 2.09, 8)), num_classes, se_ratio=0.25)


# --------------------------------------------------------------- MobileNetV2 ----
class InvertedResidualV2(nn.Module):
    """`conv` = [expand 1x1 -> BN -> ReLU6] -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN; + x if it fits."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvBNAct(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [ConvBNAct(hidden, hidden, 3, stride, hidden, act=nn.ReLU6), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # expansion t, channels c, blocks n, first stride s


class MobileNetV2(_Classifier):
    def __init__(self, num_classes=10, width_mult=1.0, setting=MOBILENET_V2, max_blocks=None):
        super().__init__()
        cin, last = make_divisible(32 * width_mult), make_divisible(1280 * max(1.0, width_mult))
        features = [ConvBNAct(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in setting:
            cout = make_divisible(c * width_mult)
            for i in range(min(n, max_blocks or n)):
                features.append(InvertedResidualV2(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNAct(cin, last, 1, act=nn.ReLU6))
        self.features, self.avgpool = nn.Sequential(*features), nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))


def mobilenet_v2(num_classes=10, width_mult=1.0, max_blocks=None):
    return MobileNetV2(num_classes, width_mult, max_blocks=max_blocks)


# --------------------------------------------------------------- MobileNetV3 ----
class InvertedResidualV3(nn.Module):
    """`block` = [expand 1x1] -> depthwise kxk -> [SE, hardsigmoid] -> project 1x1 (no act); + x if it fits."""

    def __init__(self, cin, kernel, expanded, cout, use_se, act, stride):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers = [ConvBNAct(cin, expanded, 1, norm=norm, act=act)] if expanded != cin else []
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, expanded, norm=norm, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4), scale_act=nn.Hardsigmoid))
        layers.append(ConvBNAct(expanded, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


RE, HS = nn.ReLU, nn.Hardswish
# kernel, expanded, out, SE, activation, stride (the input is the previous row's out; the stem gives 16)
MOBILENET_V3_LARGE = ((3, 16, 16, False, RE, 1), (3, 64, 24, False, RE, 2), (3, 72, 24, False, RE, 1),
                      (5, 72, 40, True, RE, 2), (5, 120, 40, True, RE, 1), (5, 120, 40, True, RE, 1),
                      (3, 240, 80, False, HS, 2), (3, 200, 80, False, HS, 1), (3, 184, 80, False, HS, 1),
                      (3, 184, 80, False, HS, 1), (3, 480, 112, True, HS, 1), (3, 672, 112, True, HS, 1),
                      (5, 672, 160, True, HS, 2), (5, 960, 160, True, HS, 1), (5, 960, 160, True, HS, 1))
MOBILENET_V3_SMALL = ((3, 16, 16, True, RE, 2), (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
                      (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
                      (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1), (5, 288, 96, True, HS, 2),
                      (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1))


class MobileNetV3(_Classifier):
    def __init__(self, setting, last_channel, num_classes=10, width_mult=1.0):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        cin = make_divisible(16 * width_mult)
        features = [ConvBNAct(3, cin, 3, 2, norm=norm, act=HS)]
        for k, exp, out, se, act, s in setting:
            cout = make_divisible(out * width_mult)
            features.append(InvertedResidualV3(cin, k, make_divisible(exp * width_mult), cout, se, act, s))
            cin = cout
        features.append(ConvBNAct(cin, 6 * cin, 1, norm=norm, act=HS))
        last = make_divisible(last_channel * width_mult)
        self.features, self.avgpool = nn.Sequential(*features), nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, last), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))


def mobilenet_v3_large(num_classes=10, width_mult=1.0):
    return MobileNetV3(MOBILENET_V3_LARGE, 1280, num_classes, width_mult)


def mobilenet_v3_small(num_classes=10, width_mult=1.0):
    return MobileNetV3(MOBILENET_V3_SMALL, 1024, num_classes, width_mult)


# --------------------------------------------------------------- EfficientNet ----
class MBConv(nn.Module):
    """`block` = [expand 1x1 -> BN -> SiLU] -> depthwise -> BN -> SiLU -> SE (in/4, SiLU) -> project 1x1 -> BN;
    stochastic depth on the branch and + x when the shape is kept."""

    def __init__(self, cin, cout, kernel, stride, expand, sd_prob, norm):
        super().__init__()
        hidden = make_divisible(cin * expand)
        self.use_res_connect = stride == 1 and cin == cout
        layers = [ConvBNAct(cin, hidden, 1, norm=norm, act=nn.SiLU)] if hidden != cin else []
        layers += [ConvBNAct(hidden, hidden, kernel, stride, hidden, norm=norm, act=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, cin // 4), act=nn.SiLU),
                   ConvBNAct(hidden, cout, 1, norm=norm, act=None)]
        self.block, self.stochastic_depth = nn.Sequential(*layers), StochasticDepth(sd_prob)

    def forward(self, x):
        out = self.block(x)
        return self.stochastic_depth(out) + x if self.use_res_connect else out


class FusedMBConv(nn.Module):
    """EfficientNetV2's early blocks: `block` = fused kxk expand (stride) -> BN -> SiLU -> project 1x1 -> BN
    (a single kxk conv -> BN -> SiLU when expand is 1); stochastic depth and + x as MBConv."""

    def __init__(self, cin, cout, kernel, stride, expand, sd_prob, norm):
        super().__init__()
        hidden = make_divisible(cin * expand)
        self.use_res_connect = stride == 1 and cin == cout
        if hidden != cin:
            layers = [ConvBNAct(cin, hidden, kernel, stride, norm=norm, act=nn.SiLU),
                      ConvBNAct(hidden, cout, 1, norm=norm, act=None)]
        else:
            layers = [ConvBNAct(cin, cout, kernel, stride, norm=norm, act=nn.SiLU)]
        self.block, self.stochastic_depth = nn.Sequential(*layers), StochasticDepth(sd_prob)

    forward = MBConv.forward


# block, expansion, kernel, stride, in, out, layers
EFFICIENTNET_B0 = ((MBConv, 1, 3, 1, 32, 16, 1), (MBConv, 6, 3, 2, 16, 24, 2), (MBConv, 6, 5, 2, 24, 40, 2),
                   (MBConv, 6, 3, 2, 40, 80, 3), (MBConv, 6, 5, 1, 80, 112, 3), (MBConv, 6, 5, 2, 112, 192, 4),
                   (MBConv, 6, 3, 1, 192, 320, 1))
EFFICIENTNET_V2_S = ((FusedMBConv, 1, 3, 1, 24, 24, 2), (FusedMBConv, 4, 3, 2, 24, 48, 4),
                     (FusedMBConv, 4, 3, 2, 48, 64, 4), (MBConv, 4, 3, 2, 64, 128, 6),
                     (MBConv, 6, 3, 1, 128, 160, 9), (MBConv, 6, 3, 2, 160, 256, 15))


class EfficientNet(_Classifier):
    """`features` = stem, one Sequential per stage, 1x1 head conv; stochastic depth rises linearly to 0.2."""

    def __init__(self, setting, last_channel, num_classes=10, width_mult=1.0, max_blocks=None, eps=1e-5):
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=eps)
        width = lambda c: make_divisible(c * width_mult)  # noqa: E731
        setting = [(*row[:-1], min(row[-1], max_blocks or row[-1])) for row in setting]
        total, done = sum(row[-1] for row in setting), 0
        features = [ConvBNAct(3, width(setting[0][4]), 3, 2, norm=norm, act=nn.SiLU)]
        for block, expand, kernel, stride, cin, cout, n in setting:
            stage = []
            for i in range(n):
                stage.append(block(width(cin if i == 0 else cout), width(cout), kernel, stride if i == 0 else 1,
                                   expand, 0.2 * done / total, norm))
                done += 1
            features.append(nn.Sequential(*stage))
        last = last_channel or 4 * width(setting[-1][5])  # B0: 4x the last stage
        features.append(ConvBNAct(width(setting[-1][5]), last, 1, norm=norm, act=nn.SiLU))
        self.features, self.avgpool = nn.Sequential(*features), nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))


def efficientnet_b0(num_classes=10, width_mult=1.0, max_blocks=None):
    return EfficientNet(EFFICIENTNET_B0, None, num_classes, width_mult, max_blocks)


def efficientnet_v2_s(num_classes=10, width_mult=1.0, max_blocks=None):
    return EfficientNet(EFFICIENTNET_V2_S, 1280, num_classes, width_mult, max_blocks, eps=1e-3)


# -------------------------------------------------------------------- MNASNet ----
_BN_MOMENTUM = 1 - 0.9997


class _InvertedResidualMnas(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM))

    def forward(self, x):
        return self.layers(x) + x if self.apply_residual else self.layers(x)


def _mnas_stack(cin, cout, kernel, stride, expand, repeats):
    blocks = [_InvertedResidualMnas(cin, cout, kernel, stride, expand)]
    blocks += [_InvertedResidualMnas(cout, cout, kernel, 1, expand) for _ in range(1, repeats)]
    return nn.Sequential(*blocks)


def _mnas_depths(alpha):
    return [make_divisible(c * alpha) for c in (32, 16, 24, 40, 80, 96, 192, 320)]


MNASNET_STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))


def _mnas_stem(c0, c1):
    return [nn.Conv2d(3, c0, 3, 2, 1, bias=False), nn.BatchNorm2d(c0, momentum=_BN_MOMENTUM), nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, 3, 1, 1, groups=c0, bias=False), nn.BatchNorm2d(c0, momentum=_BN_MOMENTUM),
            nn.ReLU(inplace=True), nn.Conv2d(c0, c1, 1, bias=False), nn.BatchNorm2d(c1, momentum=_BN_MOMENTUM)]


class MNASNet(nn.Module):
    """MNASNet-B1: `layers` = stem (3x3/2, depthwise 3x3, 1x1), six inverted-residual stacks, 1x1 to 1280;
    spatial mean; `classifier`. Version 2 scales the stem with alpha; a version-1 state dict (fixed 32/16
    stem) loads by switching the stem back, so `_version` is part of the module's checkpoint contract."""
    _version = 2

    def __init__(self, alpha=1.0, num_classes=10, dropout=0.2):
        super().__init__()
        if alpha <= 0.0:
            raise ValueError(f"alpha should be greater than 0.0 instead of {alpha}")
        self.alpha = alpha
        d = _mnas_depths(alpha)
        layers = _mnas_stem(d[0], d[1])
        for (k, s, e, r), cin, cout in zip(MNASNET_STACKS, d[1:], d[2:]):
            layers.append(_mnas_stack(cin, cout, k, s, e, r))
        layers += [nn.Conv2d(d[7], 1280, 1, bias=False), nn.BatchNorm2d(1280, momentum=_BN_MOMENTUM),
                   nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        if version == 1 and self.alpha != 1.0:
            # a version-1 checkpoint has the unscaled stem: rebuild it (and the first stack's input) to match
            stem = _mnas_stem(32, 16) + [_mnas_stack(16, _mnas_depths(self.alpha)[2], *MNASNET_STACKS[0])]
            for i, layer in enumerate(stem):
                self.layers[i] = layer
            self._version = 1
            warnings.warn("loaded a version-1 MNASNet state dict: the stem is now the fixed-size version-1 stem")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def mnasnet1_0(num_classes=10, alpha=1.0):
    return MNASNet(alpha, num_classes)


# -------------------------------------------------------------- ShuffleNetV2 ----
def channel_shuffle(x, groups: int):
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """stride 1: split the channels in two, branch2 on the second half, concat, shuffle; stride 2: both branches
    on the whole input (branch1 = depthwise 3x3/2 -> BN -> 1x1 -> BN -> ReLU)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, half = stride, cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(4, 8, 4), channels=(24, 116, 232, 464, 1024), num_classes=10):
        super().__init__()
        c = channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (n, cout) in enumerate(zip(repeats, channels[1:4]), 2):
            setattr(self, f"stage{i}", nn.Sequential(ShuffleUnit(c, cout, 2),
                                                     *(ShuffleUnit(cout, cout, 1) for _ in range(n - 1))))
            c = cout
        self.conv5 = nn.Sequential(nn.Conv2d(c, channels[-1], 1, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))


def shufflenet_v2_x1_0(num_classes=10, repeats=(4, 8, 4), channels=(24, 116, 232, 464, 1024)):
    return ShuffleNetV2(repeats, channels, num_classes)
