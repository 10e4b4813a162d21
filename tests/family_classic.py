"""Structural stand-ins for torchvision's classic CNN families (written here, no torchvision needed).

DenseNet-121 (dense concat), GoogLeNet and Inception-v3 (parallel branches
concatenated; auxiliary heads off, as with weights=None and aux_logits=False),
SqueezeNet 1.0 (fire modules), VGG-11 with BatchNorm and AlexNet. Real size by
default; `width` scales every channel count (and the classifiers' hidden
sizes) for the reduced models the tests train.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _scaler(width):
    return lambda c: max(2, int(round(c * width)))


# ------------------------------------------------------------------ DenseNet ----
class _DenseLayer(nn.Module):
    """BN -> ReLU -> 1x1 (bn_size * growth) -> BN -> ReLU -> 3x3 (growth) over the concat of all earlier outputs."""

    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, inputs):
        x = torch.cat(inputs, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, layers, cin, growth, bn_size):
        super().__init__({f"denselayer{i + 1}": _DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth=32, blocks=(6, 12, 24, 16), init=64, bn_size=4, num_classes=10):
        super().__init__()
        feats = OrderedDict(conv0=nn.Conv2d(3, init, 7, 2, 3, bias=False), norm0=nn.BatchNorm2d(init),
                            relu0=nn.ReLU(inplace=True), pool0=nn.MaxPool2d(3, 2, 1))
        c = init
        for i, n in enumerate(blocks, 1):
            feats[f"denseblock{i}"] = _DenseBlock(n, c, growth, bn_size)
            c += n * growth
            if i != len(blocks):
                feats[f"transition{i}"] = nn.Sequential(OrderedDict(
                    norm=nn.BatchNorm2d(c), relu=nn.ReLU(inplace=True), conv=nn.Conv2d(c, c // 2, 1, bias=False),
                    pool=nn.AvgPool2d(2, 2)))
                c //= 2
        feats["norm5"] = nn.BatchNorm2d(c)
        self.features, self.classifier = nn.Sequential(feats), nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(F.relu(self.features(x), inplace=True), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def densenet121(num_classes=10, growth=32, blocks=(6, 12, 24, 16), init=64):
    return DenseNet(growth, blocks, init, 4, num_classes)


# -------------------------------------------------------- GoogLeNet / Inception ----
class BasicConv2d(nn.Module):
    """conv (no bias) -> BN (eps 0.001) -> ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, bias=False, **kw), nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class _Branches(nn.Module):
    """Runs every `branch*` child on the input, in registration order, and concatenates their outputs."""

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.children()], 1)


class GoogLeNetInception(_Branches):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 (torchvision keeps 3x3 here) | 3x3 max pool -> 1x1."""

    def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, kernel_size=1), BasicConv2d(c3r, c3, kernel_size=3,
                                                                                       padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, kernel_size=1), BasicConv2d(c5r, c5, kernel_size=3,
                                                                                       padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool, kernel_size=1))


GOOGLENET = OrderedDict(inception3a=(64, 96, 128, 16, 32, 32), inception3b=(128, 128, 192, 32, 96, 64),
                        maxpool3=None, inception4a=(192, 96, 208, 16, 48, 64), inception4b=(160, 112, 224, 24, 64, 64),
                        inception4c=(128, 128, 256, 24, 64, 64), inception4d=(112, 144, 288, 32, 64, 64),
                        inception4e=(256, 160, 320, 32, 128, 128), maxpool4=None,
                        inception5a=(256, 160, 320, 32, 128, 128), inception5b=(384, 192, 384, 48, 128, 128))


class GoogLeNet(nn.Module):
    def __init__(self, num_classes=10, width=1.0):
        super().__init__()
        w = _scaler(width)
        self.conv1 = BasicConv2d(3, w(64), kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(w(64), w(64), kernel_size=1)
        self.conv3 = BasicConv2d(w(64), w(192), kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        c = w(192)
        for name, cfg in GOOGLENET.items():
            if cfg is None:
                setattr(self, name, nn.MaxPool2d(2 if name == "maxpool4" else 3, 2, ceil_mode=True))
                continue
            cfg = [w(v) for v in cfg]
            setattr(self, name, GoogLeNetInception(c, *cfg))
            c = cfg[0] + cfg[2] + cfg[4] + cfg[5]
        self.avgpool, self.dropout = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        for name in GOOGLENET:
            x = getattr(self, name)(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def googlenet(num_classes=10, width=1.0):
    return GoogLeNet(num_classes, width)


def _seq(*convs):
    return nn.Sequential(*convs)


class InceptionA(_Branches):
    def __init__(self, cin, pool, w):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, w(64), kernel_size=1)
        self.branch5x5 = _seq(BasicConv2d(cin, w(48), kernel_size=1), BasicConv2d(w(48), w(64), kernel_size=5,
                                                                                  padding=2))
        self.branch3x3dbl = _seq(BasicConv2d(cin, w(64), kernel_size=1),
                                 BasicConv2d(w(64), w(96), kernel_size=3, padding=1),
                                 BasicConv2d(w(96), w(96), kernel_size=3, padding=1))
        self.branch_pool = _seq(nn.AvgPool2d(3, 1, 1), BasicConv2d(cin, pool, kernel_size=1))


class InceptionB(_Branches):
    def __init__(self, cin, w):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, w(384), kernel_size=3, stride=2)
        self.branch3x3dbl = _seq(BasicConv2d(cin, w(64), kernel_size=1),
                                 BasicConv2d(w(64), w(96), kernel_size=3, padding=1),
                                 BasicConv2d(w(96), w(96), kernel_size=3, stride=2))
        self.branch_pool = nn.MaxPool2d(3, 2)


class InceptionC(_Branches):
    """Factorised 7x7: (1,7) and (7,1) convs."""

    def __init__(self, cin, c7, w):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, w(192), kernel_size=1)
        self.branch7x7 = _seq(BasicConv2d(cin, c7, kernel_size=1), BasicConv2d(c7, c7, **row),
                              BasicConv2d(c7, w(192), **col))
        self.branch7x7dbl = _seq(BasicConv2d(cin, c7, kernel_size=1), BasicConv2d(c7, c7, **col),
                                 BasicConv2d(c7, c7, **row), BasicConv2d(c7, c7, **col),
                                 BasicConv2d(c7, w(192), **row))
        self.branch_pool = _seq(nn.AvgPool2d(3, 1, 1), BasicConv2d(cin, w(192), kernel_size=1))


class InceptionD(_Branches):
    def __init__(self, cin, w):
        super().__init__()
        self.branch3x3 = _seq(BasicConv2d(cin, w(192), kernel_size=1),
                              BasicConv2d(w(192), w(320), kernel_size=3, stride=2))
        self.branch7x7x3 = _seq(BasicConv2d(cin, w(192), kernel_size=1),
                                BasicConv2d(w(192), w(192), kernel_size=(1, 7), padding=(0, 3)),
                                BasicConv2d(w(192), w(192), kernel_size=(7, 1), padding=(3, 0)),
                                BasicConv2d(w(192), w(192), kernel_size=3, stride=2))
        self.branch_pool = nn.MaxPool2d(3, 2)


class InceptionE(nn.Module):
    """Expanded filter bank: a 1x1 feeds both a (1,3) and a (3,1) conv whose outputs are concatenated."""

    def __init__(self, cin, w):
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(cin, w(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, w(384), kernel_size=1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(w(384), w(384), **row), BasicConv2d(w(384), w(384), **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, w(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(w(448), w(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(w(384), w(384), **row)
        self.branch3x3dbl_3b = BasicConv2d(w(384), w(384), **col)
        self.branch_pool = BasicConv2d(cin, w(192), kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                          self.branch3x3dbl_3b(b), self.branch_pool(F.avg_pool2d(x, 3, 1, 1))], 1)


class Inception3(nn.Module):
    """Inception-v3 (aux head off). stem_pools=False drops the two stem max pools so 32x32 inputs fit."""

    def __init__(self, num_classes=10, width=1.0, stem_pools=True):
        super().__init__()
        w = _scaler(width)
        self.Conv2d_1a_3x3 = BasicConv2d(3, w(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(w(32), w(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(w(32), w(64), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2) if stem_pools else nn.Identity()
        self.Conv2d_3b_1x1 = BasicConv2d(w(64), w(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(w(80), w(192), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(3, 2) if stem_pools else nn.Identity()
        a_out = lambda pool: w(64) + w(64) + w(96) + pool  # noqa: E731
        self.Mixed_5b = InceptionA(w(192), w(32), w)
        self.Mixed_5c = InceptionA(a_out(w(32)), w(64), w)
        self.Mixed_5d = InceptionA(a_out(w(64)), w(64), w)
        c = a_out(w(64))
        self.Mixed_6a = InceptionB(c, w)
        c = c + w(384) + w(96)
        self.Mixed_6b = InceptionC(c, w(128), w)
        self.Mixed_6c, self.Mixed_6d = InceptionC(4 * w(192), w(160), w), InceptionC(4 * w(192), w(160), w)
        self.Mixed_6e = InceptionC(4 * w(192), w(192), w)
        self.Mixed_7a = InceptionD(4 * w(192), w)
        c = 4 * w(192) + w(320) + w(192)
        self.Mixed_7b = InceptionE(c, w)
        c = w(320) + 4 * w(384) + w(192)
        self.Mixed_7c = InceptionE(c, w)
        self.avgpool, self.dropout, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.5), nn.Linear(c, num_classes)

    def forward(self, x):
        for module in list(self.children())[:-3]:
            x = module(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def inception_v3(num_classes=10, width=1.0, stem_pools=True):
    return Inception3(num_classes, width, stem_pools)


# ---------------------------------------------------------------- SqueezeNet ----
class Fire(nn.Module):
    """squeeze 1x1 -> ReLU, then expand 1x1 and expand 3x3 (each -> ReLU) on it, concatenated."""

    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.0: 7x7/2 conv, fire modules between 3x3/2 max pools, a 1x1 conv classifier, global pool."""

    def __init__(self, num_classes=10, width=1.0):
        super().__init__()
        w = _scaler(width)
        pool = partial(nn.MaxPool2d, 3, 2, ceil_mode=True)
        fire = lambda cin, s, e: Fire(cin, w(s), w(e), w(e))  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, w(96), 7, 2), nn.ReLU(inplace=True), pool(),
            fire(w(96), 16, 64), fire(2 * w(64), 16, 64), fire(2 * w(64), 32, 128), pool(),
            fire(2 * w(128), 32, 128), fire(2 * w(128), 48, 192), fire(2 * w(192), 48, 192),
            fire(2 * w(192), 64, 256), pool(), fire(2 * w(256), 64, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(2 * w(256), num_classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_0(num_classes=10, width=1.0):
    return SqueezeNet(num_classes, width)


# ------------------------------------------------------------- VGG / AlexNet ----
class _PooledClassifier(nn.Module):
    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VGG(_PooledClassifier):
    """conv 3x3 -> BN -> ReLU stacks between max pools, 7x7 adaptive pool, 4096-4096 MLP head."""

    def __init__(self, cfg=(64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"), num_classes=10,
                 width=1.0, hidden=4096):
        super().__init__()
        w, layers, c = _scaler(width), [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [nn.Conv2d(c, w(v), 3, padding=1), nn.BatchNorm2d(w(v)), nn.ReLU(inplace=True)]
            c = w(v)
        self.features, self.avgpool = nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(c * 49, hidden), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(hidden, num_classes))


def vgg11_bn(num_classes=10, width=1.0, hidden=4096):
    return VGG(num_classes=num_classes, width=width, hidden=hidden)


class AlexNet(_PooledClassifier):
    def __init__(self, num_classes=10, width=1.0, hidden=4096):
        super().__init__()
        w = _scaler(width)
        self.features = nn.Sequential(
            nn.Conv2d(3, w(64), 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(w(64), w(192), 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(w(192), w(384), 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w(384), w(256), 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w(256), w(256), 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(w(256) * 36, hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))


def alexnet(num_classes=10, width=1.0, hidden=4096):
    return AlexNet(num_classes, width, hidden)
