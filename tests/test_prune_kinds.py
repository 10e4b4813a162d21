"""prune / rewind / the tracker on groups with depthwise members and Linear producers/consumers.

Reference: the full model with the removed filters zeroed by plain indexing (producer rows and bias, BatchNorm
affine parameters, depthwise bias), which computes exactly what the physically pruned model does.
"""
import copy

import pytest
import torch
from loft_reference import masked_model
from test_groups_patterns import MobileNetV1
from torch import nn

import loft_kernels as lk
from loft_kernels.tickets import FilterTracker, prune, rewind


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # ConvNeXt layer scale: make the MLP branch count
                p.fill_(1.0)
    return model.eval()




MODELS = {
    "mobilenet_v2": (lambda: lk.get_model("mobilenet_v2", width=0.25), torch.randn(2, 3, 16, 16)),
    "convnext_cifar": (lambda: lk.get_model("convnext_cifar", width=0.125), torch.randn(2, 3, 16, 16)),
    "mobilenet_v1": (MobileNetV1, torch.randn(2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_pruned_equals_masked_full_model(name, ratio):
    factory, x = MODELS[name]
    model = _randomise(factory())
    model, groups = lk.convert(model, x, loft_layers=True)  # Loft layers: pruning makes them plain
    before = copy.deepcopy(model.state_dict())
    pruned, kept = prune(model, groups, ratio)
    assert not any(isinstance(m, (lk.LoftConv2d, lk.LoftBatchNorm2d, lk.LoftLinear)) for m in pruned.modules())
    for g in groups:
        k = len(kept[g.name])
        assert k == g.n - int(ratio * g.n + 1e-9)
        assert pruned.get_submodule(g.producer).weight.shape[0] == k
        for member in g.members:
            layer = pruned.get_submodule(member.name)
            if member.kind == "depthwise":
                assert layer.in_channels == layer.out_channels == layer.groups == k
                full = model.get_submodule(member.name).weight
                assert torch.equal(layer.weight, full[kept[g.name]])
            else:
                assert layer.num_features == k
        consumer = pruned.get_submodule(g.consumer)
        full = model.get_submodule(g.consumer).weight[:, kept[g.name]]
        rows = [h for h in groups if h.producer == g.consumer]  # a chain: also the next group's producer
        assert torch.equal(consumer.weight, full[kept[rows[0].name]] if rows else full)
    with torch.no_grad():
        want = masked_model(model, groups, {k: v.tolist() for k, v in kept.items()})(x)
        torch.testing.assert_close(pruned(x), want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The pruned model has groups of its own again, with the kept sizes.
    again = lk.find_filter_groups(pruned, x)
    assert [(g.name, g.n) for g in again] == [(g.name, len(kept[g.name])) for g in groups]


def test_rewind_cuts_depthwise_and_linear_tensors():
    x = torch.randn(2, 3, 16, 16)
    initial = _randomise(lk.get_model("mobilenet_v2", width=0.25))
    trained = copy.deepcopy(initial)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5).add_(0.1)
    groups = lk.find_filter_groups(trained, x)
    pruned, kept = prune(trained, groups, 0.5)
    back = rewind(pruned, kept, groups, initial)
    g = groups[3]
    assert torch.equal(back.get_submodule(g.depthwise[0]).weight,
                       initial.get_submodule(g.depthwise[0]).weight[kept[g.name]])
    with torch.no_grad():
        torch.testing.assert_close(back(x), masked_model(initial, groups, {k: v.tolist() for k, v in kept.items()})(x),
                                   rtol=1e-4, atol=1e-5)


def test_tracker_scores_linear_producers():
    model = lk.get_model("convnext_cifar", width=0.125)
    groups = lk.find_filter_groups(model, torch.randn(1, 3, 16, 16))
    tracker = FilterTracker(model, groups)
    tracker.snapshot(0)
    for g in groups:
        w = model.get_submodule(g.producer).weight.detach().double()
        plain = [sum(v * v for v in w[j].tolist()) ** 0.5 for j in range(g.n)]
        torch.testing.assert_close(tracker.scores(0)[g.name].double(), torch.tensor(plain, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_tracker_and_prune_read_a_worker_mid_round_at_full_size():
    """A LoFT worker mid-round holds compact blocks; scores and tickets are of the full model (owned blocks as
    trained so far, the rest as at the last sync), i.e. of the model its state_dict describes."""
    from loft_reference import MODELS, OPTIMIZERS, batch, loss_fn

    from loft_kernels.training.exchange import InProcessExchange

    full, groups = MODELS["mobilenet"]()
    model = copy.deepcopy(full).train()
    opt = lk.LoftOptimizer(OPTIMIZERS["sgd"](model.parameters()), model, groups, sync_every=1 << 30,
                           exchange=InProcessExchange(2).rank(1))
    x, y = batch(1, 0)
    loss_fn(model(x), y).backward()
    opt.step()
    assert model.get_submodule(groups[0].producer).weight.shape[0] < groups[0].n  # compact now
    plain = copy.deepcopy(full)
    plain.load_state_dict(model.state_dict())  # the full-size view, in a plain model
    tracker, reference = FilterTracker(model, groups), FilterTracker(plain, groups)
    tracker.snapshot(1)
    reference.snapshot(1)
    for g in groups:
        assert torch.equal(tracker.scores(1)[g.name], reference.scores(1)[g.name])
    pruned, kept = prune(model, groups, 0.5)
    want, want_kept = prune(plain, groups, 0.5)
    assert all(torch.equal(kept[k], want_kept[k]) for k in kept)
    for key, value in want.state_dict().items():
        assert torch.equal(pruned.state_dict()[key], value), key
    assert model.get_submodule(groups[0].producer).weight.shape[0] < groups[0].n  # still compact after
    _assert_plain(pruned, want)


def _assert_plain(ticket, want):
    """A ticket is a plain model: nothing a LoFT run attached to the source (owner marks, conversion hooks,
    state-dict hooks) came along, so it converts and reports its state like the reference ticket `want`."""
    for name, m in ticket.named_modules():
        assert "_apply" not in m.__dict__ and not [k for k in m.__dict__ if k.startswith("_loft")], name
    ticket.double()
    assert all(t.dtype == torch.float64 for t in ticket.state_dict().values() if t.is_floating_point())
    want.double()
    for key, value in want.state_dict().items():
        assert torch.equal(ticket.state_dict()[key], value), key


def test_a_ticket_from_a_simulators_model_is_plain():
    """Pruning `sim.model` (whose `.to()` converts every worker with it) gives a ticket that neither carries
    a copy of the simulator nor converts its workers."""
    from loft_reference import MODELS, OPTIMIZERS, batch, loss_fn
    full, groups = MODELS["mobilenet"]()
    sim = lk.LoftSimulator(copy.deepcopy(full), groups, OPTIMIZERS["sgd"], 2, 3, execution="loop")
    sim.model.train()
    sim.step([batch(s, 0) for s in range(2)], loss_fn)  # mid-round: the workers hold compact blocks
    plain = copy.deepcopy(full)
    plain.load_state_dict(sim.model.state_dict())
    pruned, _ = prune(sim.model, groups, 0.5)
    _assert_plain(pruned, prune(plain, groups, 0.5)[0])
    worker_dtype = sim.worker_models[0].get_submodule(groups[0].producer).weight.dtype
    assert worker_dtype == torch.float32  # converting the ticket left the workers alone
