"""Drawing a ticket: prune a trained model and measure what pruning bought (parameters, FLOPs, speed)."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks as C
from .flops import count_params_flops, inference_speedup
from .prune import prune


def draw(model: nn.Module, groups, ratio: float, example: torch.Tensor, *, speed_repeats: int = 0) -> tuple:
    """The ticket of `model` at `ratio` (top filters of each group by L2 norm) with its costs.

    Returns (pruned model, kept indices per group, metrics): metrics holds the
    ratio, parameters and FLOPs before and after (counted on `example`), the
    kept count of every group as "kept:<group>" = "k/n" and, when
    speed_repeats > 0, the measured inference speedup and forward times.
    """
    speed_repeats = C.non_negative_int(speed_repeats, "speed_repeats")
    C.tensor(example, "example", floating=True)
    pruned, kept = prune(model, groups, ratio)
    before, after = count_params_flops(model, example), count_params_flops(pruned, example)
    metrics = {"ratio": ratio, "params_before": before["params"], "params_after": after["params"],
               "flops_before": before["flops"], "flops_after": after["flops"],
               **{f"kept:{g.name}": f"{len(kept[g.name])}/{g.n}" for g in groups}}
    if speed_repeats:
        sp = inference_speedup(model, pruned, example, repeats=speed_repeats)
        metrics.update(inference_speedup=sp["speedup"], dense_forward_s=sp["baseline_s"],
                       pruned_forward_s=sp["candidate_s"])
    return pruned, kept, metrics
