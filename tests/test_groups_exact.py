"""Discovery accepts a group only where pruning it is exact: on models built to trip it (ops returning several
tensors, constants added on the channels' path, non-zero-preserving activations, a view that is not a pooled
squeeze), every group found, pruned, computes what the full model computes with the removed filters zeroed."""
import pytest
import torch
import torch.nn.functional as F
from loft_reference import masked_model
from torch import nn

import loft_kernels as lk
from loft_kernels.tickets import prune


class Chunked(nn.Module):
    """a's output is chunked; one half feeds c, the whole feeds b: a's channels meet two consumers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Conv2d(4, 6, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        p, _ = torch.chunk(y, 2, dim=1)
        return (self.b(y) + self.c(p)).mean((2, 3))


class Split(nn.Module):
    """A split whose halves go to a concat: channel j of a no longer reaches one consumer column j."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        p, q = F.relu(self.a(x)).chunk(2, dim=1)
        return self.c(torch.cat([p, F.relu(self.b(q))], 1)).mean((2, 3))


class Attention(nn.Module):
    """fc1's features feed fc2 and an attention module (which returns a tuple)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = F.relu(self.fc1(x))
        a, _ = self.attn(y, y, y)
        return self.head((self.fc2(y) + a).mean(1))


class Activation(nn.Module):
    """conv -> bn -> act -> 1x1 conv, for an activation that may not keep a zero channel zero."""

    def __init__(self, act, data_dependent=False):
        super().__init__()
        self.act, self.data_dependent = act, data_dependent
        self.a, self.bn, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.bn(self.a(x))
        if self.data_dependent and y.sum() > -1e9:  # torch.fx cannot trace this: the autograd tracer runs
            pass
        return self.b(self.act(y)).mean((2, 3))


class ReshapedGate(nn.Module):
    """A Linear 'gate' over y.reshape(-1, C) of an unpooled map: feature j of a row is not channel j."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.e, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2), nn.Linear(2, 8), \
            nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        n, c, h, w = y.shape
        g = torch.sigmoid(self.e(F.relu(self.r(y.reshape(-1, c))))).reshape(n, c, h, w)
        return self.b(y * g).mean((2, 3))


class PooledLinearGate(nn.Module):
    """The real thing: pool -> flatten -> Linear -> ReLU -> Linear -> sigmoid -> view -> scale."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.r, self.e, self.b = nn.Linear(8, 4), nn.Linear(4, 8), nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.bn(self.a(x)))
        s = torch.sigmoid(self.e(F.relu(self.r(F.adaptive_avg_pool2d(y, 1).flatten(1)))))
        return self.b(y * s.view(y.shape[0], -1, 1, 1)).mean((2, 3))


IMG = torch.randn(3, 3, 4, 4, dtype=torch.float64)
# case -> (model factory, input, producer that must not be a group (None: none), fragment of its reason)
CASES = {
    "chunk": (Chunked, IMG, "a", "used by 2 ops"),
    "split": (Split, IMG, "a", "split"),
    "attention": (Attention, torch.randn(2, 5, 8, dtype=torch.float64), "fc1", "used by 2 ops"),
    "sigmoid": (lambda: Activation(nn.Sigmoid()), IMG, "a", "sigmoid maps 0 to 0.5"),
    "hardsigmoid": (lambda: Activation(nn.Hardsigmoid()), IMG, "a", "hardsigmoid maps 0 to 0.5"),
    "add_scalar": (lambda: Activation(lambda y: y + 1.0), IMG, "a", "add of a constant"),
    "add_channel_constant_autograd": (
        lambda: Activation(lambda y: y + torch.linspace(0, 1, 6, dtype=y.dtype).view(1, 6, 1, 1), True), IMG, "a",
        "add of a constant"),
    "sub_scalar_autograd": (lambda: Activation(lambda y: 2.0 - y, True), IMG, "a", "sub of a constant"),
    "hardtanh_above_zero": (lambda: Activation(lambda y: F.hardtanh(y, 0.1, 1.0)), IMG, "a",
                            "hardtanh does not map 0 to 0"),
    "scalar_over_x": (lambda: Activation(lambda y: 2.0 / y), IMG, "a", "a -> "),  # fx: div; autograd: reciprocal
    "reshaped_gate": (ReshapedGate, torch.randn(2, 3, 2, 2, dtype=torch.float64), "a", "used by 2 ops"),
    "pooled_linear_gate": (PooledLinearGate, IMG, None, None),
    "zero_preserving": (lambda: Activation(lambda y: torch.tanh(F.silu(y) * 2.0) / 3.0), IMG, None, None),
}


def _model(factory):
    torch.manual_seed(0)
    model = factory().double().eval()
    with torch.no_grad():
        for p in model.parameters():  # large, varied weights: a wrongly cut filter shows, BN included
            p.copy_(torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("tracer", ["auto", "fx", "autograd"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_found_groups_prune_exactly(case, tracer):
    factory, x, refused, fragment = CASES[case]
    model = _model(factory)
    if tracer == "fx" and case.endswith("_autograd"):
        with pytest.raises(ValueError, match="torch.fx"):
            lk.explain_groups(model, x, tracer="fx")
        return
    report = lk.explain_groups(model, x, tracer=tracer)
    if refused is not None:
        assert refused not in {g.producer for g in report.groups}, report.groups
        assert fragment in report.reasons[refused], report.reasons[refused]
    if report.groups:
        pruned, kept = prune(model, report.groups, 0.5)
        with torch.no_grad():
            reference = masked_model(model, report.groups, kept)(x)
            torch.testing.assert_close(pruned(x), reference, rtol=1e-10, atol=1e-10)


def test_a_pooled_linear_gate_is_a_member_under_both_tracers():
    model = _model(PooledLinearGate)
    for tracer in ("fx", "autograd"):
        groups = {g.producer: g for g in lk.find_filter_groups(model, IMG, tracer=tracer)}
        assert [(m.name, m.kind) for m in groups["a"].members] == [("bn", "batchnorm"), ("r", "se_reduce"),
                                                                    ("e", "se_expand")], tracer
