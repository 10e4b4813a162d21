"""The realistic shapes the benchmarks use: PreActResNet-18 on 32x32 inputs, batch 32.

Written out here (not read from the model zoo) so the kernel microbenchmarks
need nothing but the ops; `conv_snapshot` is the synthetic "model" the
statistics benchmarks run on (the conv weights of PreActResNet-18, shapes exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BATCH = 32
RESOLUTION = 32
# (channels, spatial size of the stage's feature maps) for a 32x32 input
STAGES = ((64, 32), (128, 16), (256, 8), (512, 4))
BLOCKS_PER_STAGE = 2


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    size: int  # input spatial size

    @property
    def padding(self) -> int:
        return self.kernel // 2

    def flops(self, batch: int = BATCH) -> int:
        """Multiply-adds x 2 of the forward pass."""
        out = (self.size + 2 * self.padding - self.kernel) // self.stride + 1
        return 2 * batch * self.c_out * out * out * self.c_in * self.kernel * self.kernel


def preact_resnet18_convs() -> list[ConvShape]:
    """Every conv of PreActResNet-18 (CIFAR stem), in forward order."""
    convs = [ConvShape("conv1", 3, 64, 3, 1, RESOLUTION)]
    c_prev, size_prev = 64, RESOLUTION
    for s, (c, size) in enumerate(STAGES, 1):
        for b in range(BLOCKS_PER_STAGE):
            stride = 2 if (b == 0 and s > 1) else 1
            c_in, size_in = (c_prev, size_prev) if b == 0 else (c, size)
            convs.append(ConvShape(f"layer{s}.{b}.conv1", c_in, c, 3, stride, size_in))
            convs.append(ConvShape(f"layer{s}.{b}.conv2", c, c, 3, 1, size))
            if stride != 1 or c_in != c:
                convs.append(ConvShape(f"layer{s}.{b}.shortcut", c_in, c, 1, stride, size_in))
        c_prev, size_prev = c, size
    return convs


def block_convs() -> list[ConvShape]:
    """One stride-1 3x3 block conv per stage: the shapes LoFT partitions (conv_a and conv_b)."""
    return [ConvShape(f"layer{s}.1.conv1", c, c, 3, 1, size) for s, (c, size) in enumerate(STAGES, 1)]


def group_sizes() -> list[int]:
    """Filter counts of PreActResNet-18's filter groups (conv1 -> bn2 -> conv2 of every block)."""
    return [c for c, _ in STAGES for _ in range(BLOCKS_PER_STAGE)]


def conv_snapshot(device="cpu", dtype=torch.float32,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(flat, views): random weights with the shapes of all PreActResNet-18 convs, as views into one buffer.

    One buffer per snapshot, like a flat parameter store, so "one read of the
    snapshot" is a single pass over one tensor.
    """
    shapes = [(s.c_out, s.c_in, s.kernel, s.kernel) for s in preact_resnet18_convs()]
    total = sum(a * b * c * d for a, b, c, d in shapes)
    flat = torch.randn(total, device=device, dtype=dtype, generator=generator)
    out, offset = [], 0
    for shape in shapes:
        n = shape[0] * shape[1] * shape[2] * shape[3]
        out.append(flat[offset:offset + n].view(shape))
        offset += n
    return flat, out
