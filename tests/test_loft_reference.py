"""LoftSimulator against the plainly written reference (tests/loft_reference.py): same full model after every sync.

The reference slices physical sub-models and keeps one optimizer per worker;
the simulator runs LoftOptimizer's compact views on Loft layers. Same partition,
same data, same arithmetic per filter, so they agree to float rounding (in
practice bit for bit in one process).
"""

import pytest
import torch
from loft_reference import (  # noqa: F401 (fixture)
    MODELS,
    OPTIMIZERS,
    assert_simulator_matches_reference,
    batch,
    loss_fn,
    masked_model,
    max_diff,
    one_thread,
    run_plain,
    run_reference,
    run_simulator,
    sub_model,
)

import loft_kernels as lk
from loft_kernels.training.partition import partition

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [  # model, optimizer, workers, state: uneven splits (groups of 6, 13, 26, 51), a VGG chain, both states
    ("preact", "sgd", 4, "reset"),
    ("preact", "adam", 2, "keep"),
    ("vgg", "sgd", 3, "keep"),
    ("vgg", "sgd", 4, "reset"),
]


@pytest.mark.parametrize("model_name,opt_name,workers,state", CASES)
def test_simulator_matches_reference(model_name, opt_name, workers, state):
    model, groups = MODELS[model_name]()
    steps, k, seed = 8, 3, 7  # rounds of 3, 3 and a partial 2 closed by finalize()
    sim = assert_simulator_matches_reference(model, groups, OPTIMIZERS[opt_name], workers, k, seed, state, steps)
    # after the final sync every worker holds the full synced model (non-owned rows included)
    for m in sim.worker_models:
        assert max_diff(m.state_dict(), sim.model.state_dict())[0] == 0.0
    # simulated worker r owns partition[...][r] of the current round
    parts = sim.partition(sim.round)
    for r, opt in enumerate(sim.optimizers):
        assert opt.rank == r and opt.workers == workers
        for name, idx in opt.owned().items():
            assert torch.equal(idx, parts[name][r])


def _decay_matrices_only(params):
    """The usual recipe: weight decay on weight matrices and kernels (ndim > 1), none on biases and norms."""
    params = list(params)
    return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.5},
                            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=0.05)


@pytest.mark.parametrize("factory, state", [(_decay_matrices_only, "reset"),
                                            (lambda ps: torch.optim.Adagrad(ps, lr=0.05), "keep"),
                                            (lambda ps: torch.optim.Adagrad(ps, lr=0.05), "reset")],
                         ids=["groups-by-ndim", "adagrad-keep", "adagrad-reset"])
def test_the_optimizer_factory_sees_every_parameter_with_its_shape(factory, state):
    """The simulator builds each worker's optimizer on parameters of their real shapes: a factory that groups by
    ndim decays the partitioned weights too (they were empty placeholders, so it did not), and Adagrad, which sizes
    its state in __init__, trains (it failed with an IndexError)."""
    model, groups = MODELS["vgg"]()
    assert_simulator_matches_reference(model, groups, factory, 2, 3, 7, state, 6)


class _Scaled(torch.nn.Module):
    """A VGG whose logits a scalar parameter scales (a temperature)."""

    def __init__(self):
        super().__init__()
        self.vgg, self.scale = lk.vgg(width=0.1, num_classes=5), torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.vgg(x) * self.scale


def test_state_keep_with_a_scalar_parameter():
    """Adam's step counter of a 0-dim parameter has the parameter's shape: it was taken for per-element state and
    the keep policy refused the group at the first sync."""
    torch.manual_seed(0)
    model, groups = lk.convert(_Scaled(), torch.randn(2, 3, 8, 8))
    assert_simulator_matches_reference(model, groups, OPTIMIZERS["adam"], 2, 3, 7, "keep", 6)


def test_simulator_model_is_dense_and_evaluates_as_full_model():
    model, groups = MODELS["preact"]()
    lk.nn.to_loft_layers(model, groups)  # Loft layers, whose active sets the simulator leaves clear
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=2, sync_every=2)
    assert sim.model is model
    for t in range(2):
        sim.step([batch(s, t) for s in range(2)], loss_fn)
    conv = sim.model.get_submodule(groups[0].conv_a)
    assert conv.active_out is None and conv.active_in is None
    sim.model.eval()
    x = batch(0, 99)[0]
    with torch.no_grad():
        out = sim.model(x)
    assert out.shape == (4, 5)
    # a worker model evaluated dense equals the synced model right after the sync
    w = sim.worker_models[1]
    w.eval()
    with torch.no_grad(), lk.dense(w):
        assert torch.equal(w(x), out)


# ------------------------------------------- the reference on the new kinds ----


@pytest.mark.parametrize("model_name", ["mobilenet", "convnext", "preact"])
def test_reference_sub_model_computes_the_masked_full_model(model_name):
    """A worker's physically sliced sub-model == the full model with the other workers' filters zeroed (eval)."""
    model, groups = MODELS[model_name]()
    for m in model.modules():  # non-trivial statistics so every channel matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            torch.nn.init.uniform_(m.weight, -1, 1)
    model.eval()
    parts = partition(groups, 3, seed=1, round=0)
    x = batch(0, 0)[0]
    for s in range(3):
        owned = {name: parts[name][s] for name in parts}
        sub = sub_model(model, groups, owned).eval()
        with torch.no_grad():
            torch.testing.assert_close(sub(x), masked_model(model, groups, owned)(x), rtol=1e-4, atol=1e-5)
        for g in groups:
            for member in g.members:
                if member.kind == "depthwise":
                    dwc = sub.get_submodule(member.name)
                    assert dwc.groups == dwc.in_channels == dwc.out_channels == len(owned[g.name])


@pytest.mark.parametrize("model_name", ["mobilenet", "convnext"])
def test_reference_with_one_worker_is_plain_training(model_name):
    model, groups = MODELS[model_name]()
    steps = 4
    ref = run_reference(model, groups, OPTIMIZERS["sgd"], 1, 2, 0, "keep", steps)
    diff, where = max_diff(ref[-1], run_plain(model, groups, OPTIMIZERS["sgd"], steps))
    assert diff <= 1e-5, f"{where} differs by {diff}"
    assert max_diff(ref[-1], model.state_dict())[0] > 1e-3
