"""Independent, deliberately naive references for the kernel ops (test-only).

Written from the ops' definitions (docstrings in loft_kernels/ops) with python loops and
F.conv2d, sharing no code with loft_kernels.
"""
import math

import torch
import torch.nn.functional as F


def partial_conv2d(x, w, b, stride, padding, dilation, groups, out_index, in_index):
    """F.conv2d on the explicitly sliced weight, differentiable w.r.t. x, w, b."""
    ws = w if out_index is None else w[out_index]
    ws = ws if in_index is None else ws[:, in_index]
    bs = None if b is None else (b if out_index is None else b[out_index])
    return F.conv2d(x, ws, bs, stride, padding, dilation, groups)


def ranks(scores_row):
    """1-based ranks: descending score, ties to the lower filter index."""
    order = sorted(range(len(scores_row)), key=lambda f: (-float(scores_row[f]), f))
    r = [0] * len(order)
    for pos, f in enumerate(order, 1):
        r[f] = pos
    return r


def footrule(a_scores, b_scores):
    ra, rb = ranks(a_scores), ranks(b_scores)
    order_a = sorted(range(len(ra)), key=lambda f: ra[f])
    total = 0.0
    for i, f in enumerate(order_a, 1):
        total += (1.0 / i) * abs(math.log(i) - math.log(rb[f]))
    return total


def footrule_matrix(scores):
    out = torch.zeros(len(scores), scores[0].shape[0], scores[0].shape[0], dtype=torch.float64)
    for l, s in enumerate(scores):
        for a in range(s.shape[0]):
            for b in range(s.shape[0]):
                out[l, a, b] = footrule(s[a].tolist(), s[b].tolist())
    return out


def mask_distance_matrix(scores, ratio):
    out = torch.zeros(len(scores), scores[0].shape[0], scores[0].shape[0], dtype=torch.float64)
    for l, s in enumerate(scores):
        n = s.shape[1]
        keep = n - math.floor(ratio * n + 1e-9)
        masks = [[r <= keep for r in ranks(s[t].tolist())] for t in range(s.shape[0])]
        for a in range(s.shape[0]):
            for b in range(s.shape[0]):
                out[l, a, b] = sum(x != y for x, y in zip(masks[a], masks[b])) / n
    return out


def filter_stats(a, b):
    out = []
    for ta, tb in zip(a, b):
        width = math.prod(ta.shape[1:])
        ra, rb = ta.double().reshape(ta.shape[0], width), tb.double().reshape(tb.shape[0], width)
        rows = [[float((ra[j] ** 2).sum()), float((rb[j] ** 2).sum()), float((ra[j] * rb[j]).sum()),
                 float(((ra[j] - rb[j]) ** 2).sum())] for j in range(ta.shape[0])]
        out.append(torch.tensor(rows, dtype=torch.float64).reshape(ta.shape[0], 4))
    return out
