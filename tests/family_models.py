"""One structural model per torchvision family, at its real size or reduced for fast tests, and the per-family
table of what filter-group discovery makes of them.

FAMILIES: name -> constructor(num_classes=10, **size knobs); called with no
knobs it builds the torchvision-sized model (same parameter count as
torchvision's for 1000 classes). SMALL: name -> (knobs, input side) of the
reduced model the tests train in seconds on a CPU. `build(name, small)` gives
(model, example input).

    python tests/family_models.py            # table of the reduced models
    python tests/family_models.py --full     # the real sizes at 224x224, with discovery times

tests/test_families.py checks the reduced models (and, with LOFT_FULL_FAMILIES=1, discovery on the real ones).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import family_attention as A  # noqa: E402
import family_classic as C  # noqa: E402
import family_cnn as N  # noqa: E402

import loft_kernels as lk  # noqa: E402

FAMILIES = {
    "resnet18": N.resnet18, "resnet50": N.resnet50, "resnext50_32x4d": N.resnext50_32x4d,
    "wide_resnet50_2": N.wide_resnet50_2, "regnet_x_400mf": N.regnet_x_400mf, "regnet_y_400mf": N.regnet_y_400mf,
    "mobilenet_v2": N.mobilenet_v2, "mobilenet_v3_small": N.mobilenet_v3_small,
    "mobilenet_v3_large": N.mobilenet_v3_large, "efficientnet_b0": N.efficientnet_b0,
    "efficientnet_v2_s": N.efficientnet_v2_s, "mnasnet1_0": N.mnasnet1_0, "shufflenet_v2_x1_0": N.shufflenet_v2_x1_0,
    "densenet121": C.densenet121, "googlenet": C.googlenet, "inception_v3": C.inception_v3,
    "squeezenet1_0": C.squeezenet1_0, "convnext_tiny": A.convnext_tiny, "swin_t": A.swin_t, "vit_b_16": A.vit_b_16,
    "maxvit_t": A.maxvit_t, "vgg11_bn": C.vgg11_bn, "alexnet": C.alexnet,
}

_ONE = (1, 1, 1, 1)
SMALL = {
    "resnet18": (dict(layers=_ONE, base=8), 32),
    "resnet50": (dict(layers=_ONE, base=8), 32),
    "resnext50_32x4d": (dict(layers=_ONE, base=8, groups=4, width_per_group=16), 32),
    "wide_resnet50_2": (dict(layers=_ONE, base=8), 32),
    "regnet_x_400mf": (dict(stages=((8, 16, 32, 48), (1, 1, 2, 1), (4, 4, 4, 4))), 32),
    "regnet_y_400mf": (dict(stages=((8, 16, 24, 32), (1, 1, 2, 1), (4, 4, 4, 4))), 32),
    "mobilenet_v2": (dict(width_mult=0.25, max_blocks=2), 32),
    "mobilenet_v3_small": (dict(width_mult=0.25), 32),
    "mobilenet_v3_large": (dict(width_mult=0.25), 32),
    "efficientnet_b0": (dict(width_mult=0.25, max_blocks=2), 32),
    "efficientnet_v2_s": (dict(width_mult=0.25, max_blocks=2), 32),
    "mnasnet1_0": (dict(alpha=0.25), 32),
    "shufflenet_v2_x1_0": (dict(repeats=(1, 2, 1), channels=(8, 16, 32, 64, 64)), 32),
    "densenet121": (dict(growth=8, blocks=(2, 2, 2, 2), init=16), 32),
    "googlenet": (dict(width=0.125), 32),
    "inception_v3": (dict(width=0.125, stem_pools=False), 32),
    "squeezenet1_0": (dict(width=0.125), 32),
    "convnext_tiny": (dict(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), layer_scale=1.0), 32),
    "swin_t": (dict(embed=16, depths=(2, 2), heads=(2, 4), window=4), 32),
    "vit_b_16": (dict(image=32, patch=8, layers=2, heads=2, hidden=32, mlp_dim=64), 32),
    "maxvit_t": (dict(image=32, stem=8, channels=(16, 32), depths=(1, 1), head_dim=8, partition=2), 32),
    "vgg11_bn": (dict(width=0.125, hidden=64), 32),
    "alexnet": (dict(width=0.125, hidden=64), 64),
}
FULL_SIDE = 224


def build(name: str, small: bool = True, num_classes: int = 10, batch: int = 2, seed: int = 0):
    """(model, example input [batch, 3, side, side]) of family `name`, reduced (`small`) or at its real size."""
    knobs, side = SMALL[name] if small else ({}, FULL_SIDE)
    torch.manual_seed(seed)
    model = FAMILIES[name](num_classes=num_classes, **knobs)
    return model, torch.randn(batch, 3, side, side)


def layer_names(model: nn.Module) -> set:
    """Every nn.Conv2d / nn.Linear of the model (subclasses included): the layers discovery must account for."""
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def grouped_share(model: nn.Module, groups) -> float:
    """Share of the model's parameters held by the modules the groups touch (producers, members, consumers)."""
    touched = {name for g in groups for name in g.modules}
    inside = sum(p.numel() for name in touched for p in model.get_submodule(name).parameters(recurse=False))
    return inside / sum(p.numel() for p in model.parameters())


# What stopped the walk, by the words discovery uses; the first match names the reason.
_KINDS = (("grouped conv", "grouped conv"), ("SE) scale", "SE scale (input of the SE branch)"),
          ("SE scale or a gate", "multiplied by an SE scale"), ("residual add", "residual add"),
          ("concat", "concat"), ("it can only be a per-channel member", "depthwise (member only)"),
          ("layer scale", "layer scale"), ("subclass", "nn.Linear subclass"), ("split/chunk", "split"),
          ("reshape", "reshape/flatten"), ("LayerNorm", "LayerNorm over channels"), ("global pooling", "head"),
          ("the model output", "head"), ("used by", "branches (output used by several ops)"))


def reason_kind(reason: str) -> str:
    """A short name for a refusal reason (for the table), or the reason itself when none fits."""
    return next((kind for words, kind in _KINDS if words in reason), reason)


def summary(name: str, small: bool = True) -> dict:
    """Discovery on one family: groups, grouped parameter share, seconds, and the refusal reasons counted."""
    model, x = build(name, small, batch=1)
    start, cpu = time.perf_counter(), time.process_time()
    report = lk.explain_groups(model, x)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    counts: dict = {}
    for why in report.reasons.values():
        counts[reason_kind(why)] = counts.get(reason_kind(why), 0) + 1
    return dict(family=name, groups=len(report.groups), share=grouped_share(model, report.groups),
                layers=len(layer_names(model)), params=sum(p.numel() for p in model.parameters()),
                seconds=seconds, cpu_seconds=cpu, tracer=report.tracer, reasons=counts)


def table(small: bool = True, names=None) -> str:
    """A markdown table, one row per family."""
    rows = ["| family | params | conv/linear | groups | share in grouped modules | discovery s (CPU s) | tracer | "
            "why the other layers are not producers (count) |", "|---|---|---|---|---|---|---|---|"]
    for name in names or FAMILIES:
        s = summary(name, small)
        why = "; ".join(f"{r} ({k})" for r, k in sorted(s["reasons"].items(), key=lambda kv: -kv[1]))
        rows.append(f"| {name} | {s['params'] / 1e6:.2f}M | {s['layers']} | {s['groups']} | {100 * s['share']:.0f} % "
                    f"| {s['seconds']:.1f} ({s['cpu_seconds']:.1f}) | {s['tracer']} | {why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the real sizes at 224x224 (slower)")
    parser.add_argument("families", nargs="*", help=f"default: all of {', '.join(FAMILIES)}")
    args = parser.parse_args()
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(table(small=not args.full, names=args.families or None))
