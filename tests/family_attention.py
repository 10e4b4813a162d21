"""Structural stand-ins for torchvision's ConvNeXt, Swin, ViT and MaxViT families (written here, no torchvision).

ConvNeXt-tiny (depthwise 7x7, channels-last LayerNorm and MLP between
permutes, layer scale, stochastic depth), Swin-T (shifted-window attention,
patch merging, Linear-GELU-Linear MLPs), ViT-B/16 (nn.MultiheadAttention
encoder blocks with Linear-GELU-Linear MLPs) and MaxViT-T (MBConv with SE, then
block and grid attention). Real size by default; the size knobs (dims, depths,
heads, window, image size) give the reduced models the tests train.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from family_cnn import ConvBNAct, SqueezeExcitation, StochasticDepth
from torch import nn


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _mlp(dim, hidden, drop=0.0):
    """Linear -> GELU -> Dropout -> Linear -> Dropout (torchvision's MLP block)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))


def _linear_ramp(total, top):
    return [top * i / max(1, total - 1) for i in range(total)]


# ------------------------------------------------------------------ ConvNeXt ----
class CNBlock(nn.Module):
    """x + stochastic_depth(layer_scale * block(x)), block = dw 7x7 -> NHWC -> LayerNorm -> Linear 4x -> GELU ->
    Linear -> NCHW."""

    def __init__(self, dim, layer_scale, sd_prob):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        out = self.stochastic_depth(self.layer_scale * self.block(x))
        out += x
        return out


class ConvNeXt(nn.Module):
    def __init__(self, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), num_classes=10, layer_scale=1e-6,
                 sd_prob=0.1):
        super().__init__()
        ln = lambda d: LayerNorm2d(d, eps=1e-6)  # noqa: E731
        layers = [ConvBNAct(3, dims[0], 4, 4, act=None, norm=ln, bias=True, padding=0)]
        probs, i = _linear_ramp(sum(depths), sd_prob), 0
        for s, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*(CNBlock(dim, layer_scale, probs[i + b]) for b in range(depth))))
            i += depth
            if s + 1 < len(dims):
                layers.append(nn.Sequential(ln(dim), nn.Conv2d(dim, dims[s + 1], 2, 2)))
        self.features, self.avgpool = nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(ln(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes=10, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), layer_scale=1e-6):
    return ConvNeXt(dims, depths, num_classes, layer_scale)


# ---------------------------------------------------------------------- Swin ----
def relative_position_index(size: int) -> torch.Tensor:
    """[size^2, size^2] index into a ((2 size - 1)^2)-row bias table of the offset between two window cells."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy, dx = ys[:, None] - ys[None, :] + size - 1, xs[:, None] - xs[None, :] + size - 1
    return dy * (2 * size - 1) + dx


def _windows(x, window):
    """[B, H, W, C] -> [B * windows, window^2, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _shift_mask(height, width, window, shift, device):
    """[windows, window^2, window^2]: -100 between cells that the cyclic shift brought from different regions."""
    label = torch.zeros(height, width, device=device)
    bands = lambda n: (slice(0, n - window), slice(n - window, n - shift), slice(n - shift, n))  # noqa: E731
    for i, hs in enumerate(bands(height)):
        for j, ws in enumerate(bands(width)):
            label[hs, ws] = 3 * i + j
    cells = _windows(label[None, :, :, None], window).squeeze(-1)
    return (cells[:, :, None] != cells[:, None, :]).float() * -100.0


class ShiftedWindowAttention(nn.Module):
    """Multi-head self-attention within (cyclically shifted) windows, with a relative position bias."""

    def __init__(self, dim, window, shift, heads):
        super().__init__()
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(window).flatten(), persistent=False)

    def forward(self, x):
        b, h, w, c = x.shape
        win = self.window
        x = F.pad(x, (0, 0, 0, (-w) % win, 0, (-h) % win))
        hp, wp = x.shape[1], x.shape[2]
        shift = self.shift if win < min(hp, wp) else 0
        if shift:
            x = torch.roll(x, (-shift, -shift), (1, 2))
        t = _windows(x, win)
        q, k, v = self.qkv(t).reshape(t.shape[0], win * win, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index].view(win * win, win * win, -1)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + bias.permute(2, 0, 1)
        if shift:
            mask = _shift_mask(hp, wp, win, shift, x.device)
            attn = attn.view(b, mask.shape[0], self.heads, win * win, win * win) + mask[None, :, None]
            attn = attn.view(-1, self.heads, win * win, win * win)
        t = self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(t.shape[0], win * win, c))
        x = t.view(b, hp // win, wp // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if shift:
            x = torch.roll(x, (shift, shift), (1, 2))
        return x[:, :h, :w, :].contiguous()


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, heads, window, shift, sd_prob):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ShiftedWindowAttention(dim, window, shift, heads)
        self.stochastic_depth = StochasticDepth(sd_prob)
        self.norm2, self.mlp = nn.LayerNorm(dim), _mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (4C) -> LayerNorm -> Linear to 2C."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    def __init__(self, embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7, num_classes=10,
                 sd_prob=0.2):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, embed, 4, 4), Permute([0, 2, 3, 1]), nn.LayerNorm(embed))]
        probs, i, dim = _linear_ramp(sum(depths), sd_prob), 0, embed
        for s, (depth, h) in enumerate(zip(depths, heads)):
            layers.append(nn.Sequential(*(SwinTransformerBlock(dim, h, window, 0 if b % 2 == 0 else window // 2,
                                                               probs[i + b]) for b in range(depth))))
            i += depth
            if s + 1 < len(depths):
                layers.append(PatchMerging(dim))
                dim *= 2
        self.features, self.norm, self.permute = nn.Sequential(*layers), nn.LayerNorm(dim), Permute([0, 3, 1, 2])
        self.avgpool, self.flatten, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.flatten(self.avgpool(self.permute(self.norm(self.features(x))))))


def swin_t(num_classes=10, embed=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7):
    return SwinTransformer(embed, depths, heads, window, num_classes)


# ----------------------------------------------------------------------- ViT ----
class EncoderBlock(nn.Module):
    def __init__(self, heads, hidden, mlp_dim, dropout=0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.dropout, self.ln_2 = nn.Dropout(dropout), nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = _mlp(hidden, mlp_dim, dropout)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq, layers, heads, hidden, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, hidden, mlp_dim))
                                                for i in range(layers)))
        self.ln = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """Patchify conv -> tokens + class token -> encoder -> class token -> `heads.head`."""

    def __init__(self, image=224, patch=16, layers=12, heads=12, hidden=768, mlp_dim=3072, num_classes=10):
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.encoder = Encoder((image // patch) ** 2 + 1, layers, heads, hidden, mlp_dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden, num_classes)))

    def forward(self, x):
        n, _, h, w = x.shape
        x = self.conv_proj(x).reshape(n, self.hidden, (h // self.patch) * (w // self.patch)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def vit_b_16(num_classes=10, image=224, patch=16, layers=12, heads=12, hidden=768, mlp_dim=3072):
    return VisionTransformer(image, patch, layers, heads, hidden, mlp_dim, num_classes)


# -------------------------------------------------------------------- MaxViT ----
class MaxVitMBConv(nn.Module):
    """proj(x) + stochastic_depth(layers(x)); layers = BN -> 1x1 (4x) -> BN -> GELU -> dw 3x3 (stride) -> BN ->
    GELU -> SE (SiLU) -> 1x1 with bias; proj = [3x3/2 avg pool] -> 1x1 when the shape changes."""

    def __init__(self, cin, cout, stride, sd_prob, expansion=4, squeeze_ratio=0.25):
        super().__init__()
        mid, bn = int(cout * expansion), lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)
        proj = ([nn.AvgPool2d(3, stride, 1)] if stride == 2 else []) + [nn.Conv2d(cin, cout, 1)]
        self.proj = nn.Sequential(*proj) if stride != 1 or cin != cout else nn.Identity()
        self.layers = nn.Sequential(OrderedDict(
            pre_norm=bn(cin), conv_a=ConvBNAct(cin, mid, 1, act=nn.GELU, norm=bn),
            conv_b=ConvBNAct(mid, mid, 3, stride, mid, act=nn.GELU, norm=bn),
            squeeze_excitation=SqueezeExcitation(mid, int(cout * squeeze_ratio), act=nn.SiLU),
            conv_c=nn.Conv2d(mid, cout, 1)))
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        return self.proj(x) + self.stochastic_depth(self.layers(x))


class RelativePositionalMultiHeadAttention(nn.Module):
    def __init__(self, dim, head_dim, size):
        super().__init__()
        self.heads, self.head_dim, self.scale = dim // head_dim, head_dim, dim ** -0.5
        self.to_qkv, self.merge = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * size - 1) ** 2, self.heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(size).flatten(), persistent=False)

    def forward(self, x):
        b, g, p, d = x.shape
        q, k, v = (t.reshape(b, g, p, self.heads, self.head_dim).permute(0, 1, 3, 2, 4)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        bias = self.relative_position_bias_table[self.relative_position_index].view(p, p, -1).permute(2, 0, 1)
        attn = torch.softmax(q @ (k * self.scale).transpose(-2, -1) + bias, dim=-1)
        return self.merge((attn @ v).permute(0, 1, 3, 2, 4).reshape(b, g, p, d))


class PartitionAttentionLayer(nn.Module):
    """Attention within p x p windows ("window": neighbours) or across a p x p grid of strided cells ("grid"),
    then an MLP; both pre-norm residual with stochastic depth."""

    def __init__(self, dim, head_dim, partition, kind, grid, sd_prob, mlp_ratio=4):
        super().__init__()
        self.kind, self.p = kind, partition if kind == "window" else grid // partition
        self.attn_layer = nn.Sequential(nn.LayerNorm(dim), RelativePositionalMultiHeadAttention(dim, head_dim,
                                                                                              partition),
                                        nn.Dropout(0.0))
        self.mlp_layer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mlp_ratio), nn.GELU(),
                                       nn.Linear(dim * mlp_ratio, dim), nn.Dropout(0.0))
        self.stochastic_dropout = StochasticDepth(sd_prob)

    def _swap(self, x):
        return x.transpose(-2, -3) if self.kind == "grid" else x

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p, c)
        x = self._swap(x)
        x = x + self.stochastic_dropout(self.attn_layer(x))
        x = self._swap(x + self.stochastic_dropout(self.mlp_layer(x)))
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)


class MaxVitLayer(nn.Module):
    def __init__(self, cin, cout, stride, sd_prob, head_dim, partition, grid):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(
            MBconv=MaxVitMBConv(cin, cout, stride, sd_prob),
            window_attention=PartitionAttentionLayer(cout, head_dim, partition, "window", grid, sd_prob),
            grid_attention=PartitionAttentionLayer(cout, head_dim, partition, "grid", grid, sd_prob)))

    def forward(self, x):
        return self.layers(x)


class MaxVit(nn.Module):
    def __init__(self, image=224, stem=64, channels=(64, 128, 256, 512), depths=(2, 2, 5, 2), head_dim=32,
                 partition=7, num_classes=10, sd_prob=0.2):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # noqa: E731
        self.stem = nn.Sequential(ConvBNAct(3, stem, 3, 2, act=nn.GELU, norm=bn),
                                  ConvBNAct(stem, stem, 3, 1, act=None, norm=None, bias=True))
        size = math.ceil(image / 2)
        probs, i, cin, blocks = _linear_ramp(sum(depths), sd_prob), 0, stem, []
        for cout, depth in zip(channels, depths):
            size = (size - 1) // 2 + 1
            layers = []
            for b in range(depth):
                layers.append(MaxVitLayer(cin, cout, 2 if b == 0 else 1, probs[i], head_dim, partition, size))
                cin, i = cout, i + 1
            blocks.append(nn.Sequential(OrderedDict(layers=nn.Sequential(*layers))))
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(cin), nn.Linear(cin, cin),
                                        nn.Tanh(), nn.Linear(cin, num_classes, bias=False))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def maxvit_t(num_classes=10, image=224, stem=64, channels=(64, 128, 256, 512), depths=(2, 2, 5, 2), head_dim=32,
             partition=7):
    return MaxVit(image, stem, channels, depths, head_dim, partition, num_classes)
