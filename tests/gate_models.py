"""Small models with squeeze-and-excitation gates and grouped convolutions (the block structures of EfficientNet,
MobileNetV3, ResNeXt and RegNetY), for the SE-gated and grouped-conv filter group tests. Plain nn code."""
import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    """pool -> reduce 1x1 conv -> act -> expand 1x1 conv -> gate -> scale the input."""

    def __init__(self, channels: int, squeeze: int, act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class LinearSqueezeExcite(nn.Module):
    """The same gate written with Linear layers: mean -> Linear -> ReLU -> Linear -> sigmoid -> view -> scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, squeeze)
        self.fc2 = nn.Linear(squeeze, channels)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * s.view(s.shape[0], s.shape[1], 1, 1)


class MBConv(nn.Module):
    """[expand 1x1 -> BN -> act] -> depthwise 3x3 -> BN -> act -> SE -> project 1x1 -> BN (+ input)."""

    def __init__(self, cin: int, cout: int, expand: int, act=nn.SiLU, gate=nn.Sigmoid, se_act=nn.SiLU,
                 linear_se: bool = False, stride: int = 1):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
        squeeze = max(2, cin // 2)
        layers.append(LinearSqueezeExcite(hidden, squeeze) if linear_se else
                      SqueezeExcite(hidden, squeeze, se_act, gate))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        y = self.block(x)
        return y + x if self.residual else y


class TinyEfficientNet(nn.Module):
    """Stem -> MBConv(expand 1, the stem's group crosses its SE gate) -> MBConv x2 (expand 4) -> head conv -> fc."""

    def __init__(self, num_classes: int = 5, act=nn.SiLU, gate=nn.Sigmoid, se_act=nn.SiLU, linear_se=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), act())
        kw = dict(act=act, gate=gate, se_act=se_act, linear_se=linear_se)
        self.blocks = nn.Sequential(MBConv(8, 6, 1, **kw), MBConv(6, 12, 4, stride=2, **kw), MBConv(12, 12, 4, **kw))
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), act())
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_mobilenet_v3(num_classes: int = 5):
    """MobileNetV3-style: hardswish activations, ReLU inside the gate, hardsigmoid gate."""
    return TinyEfficientNet(num_classes, nn.Hardswish, nn.Hardsigmoid, nn.ReLU)


class Bottleneck(nn.Module):
    """ResNeXt / RegNet bottleneck: 1x1 -> BN -> ReLU -> grouped 3x3 -> BN -> ReLU [-> SE] -> 1x1 -> BN (+ input)."""

    def __init__(self, cin: int, cout: int, width: int, conv_groups: int, se: bool = False, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=conv_groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.se = SqueezeExcite(width, max(4, cin // 2), nn.ReLU) if se else nn.Identity()
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None if cin == cout and stride == 1 else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.se(F.relu(self.bn2(self.conv2(y))))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNeXt(nn.Module):
    """Stem -> two grouped bottlenecks (4 conv groups of 4 channels, then 4 of 6) -> fc; `se` makes it RegNetY."""

    def __init__(self, num_classes: int = 5, se: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Bottleneck(8, 16, 16, 4, se)
        self.layer2 = Bottleneck(16, 16, 24, 4, se, stride=2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class ConvBN(nn.Sequential):
    """conv (no bias) -> BN (eps 0.001) -> ReLU, as Inception's basic conv."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout, eps=0.001),
                         nn.ReLU())


class InceptionBlock(nn.Module):
    """1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1, concatenated."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.b1 = ConvBN(cin, width)
        self.b3 = nn.Sequential(ConvBN(cin, width), ConvBN(width, width, 3, padding=1))
        self.b33 = nn.Sequential(ConvBN(cin, width), ConvBN(width, width, 3, padding=1),
                                 ConvBN(width, width, 3, padding=1))
        self.pool = ConvBN(cin, width)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b33(x), self.pool(F.avg_pool2d(x, 3, 1, 1))], 1)


class TinyInception(nn.Module):
    """Stem -> two Inception blocks around a stride-2 reduction -> fc; in training mode also an auxiliary head on
    the first block, returned as (logits, aux_logits) as torchvision's Inception-v3 does."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, 8, 3, 2), ConvBN(8, 16, 3, padding=1))
        self.mixed1 = InceptionBlock(16, 8)
        self.reduce = ConvBN(32, 32, 3, 2)
        self.mixed2 = InceptionBlock(32, 12)
        self.aux = nn.Sequential(ConvBN(32, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.mixed1(self.stem(x))
        aux = self.aux(x) if self.training else None
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.mixed2(self.reduce(x)), 1), 1))
        return (logits, aux) if self.training else logits
