"""The worker model's one owner (WorkerModel), the full-model view, and ordinary nn.Module operations mid-round:
dtype/device moves, copies, pickling, assign-loading, repr; the group list validated once at the boundary."""
import copy
import functools
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from loft_reference import MODELS, batch, one_thread  # noqa: F401
from torch import nn

import loft_kernels as lk
from loft_kernels.training import optimizer_checks
from loft_kernels.training.exchange import InProcessExchange

pytestmark = pytest.mark.usefixtures("one_thread")
NEVER = 1 << 30
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
PLAIN_SGD = functools.partial(torch.optim.SGD, lr=0.05)


def loss_fn(out, y):
    return F.cross_entropy(out, y)


def rank(model, groups, r=1, workers=2, factory=SGD, **kw):
    """A LoftOptimizer for simulated rank r of `workers` (its round never syncs)."""
    return lk.LoftOptimizer(factory(model.parameters()), model, groups, sync_every=NEVER,
                            exchange=InProcessExchange(workers).rank(r), **kw)


def train(model, opt, steps, worker=1, dtype=torch.float32, start=0):
    model.train()
    for t in range(start, start + steps):
        x, y = batch(worker, t)
        opt.zero_grad()
        loss_fn(model(x.to(dtype)), y).backward()
        opt.step()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------ the owner ----
def test_the_rounds_block_lives_in_the_worker_model_only():
    full, groups = MODELS["vgg"]()
    model = copy.deepcopy(full)
    opt = rank(model, groups)
    w = opt.worker
    assert w.state == "compact" and opt.owned().keys() == w.owned.keys()
    assert all(torch.equal(opt.owned()[k], w.owned[k]) for k in w.owned)
    for e in w.entries:  # every slot's block is derived from `owned`, nothing else records it
        rows, cols = w.index(e.slot)
        expected = full.state_dict()[e.slot.name]
        expected = expected if rows is None else expected[rows]
        expected = expected if cols is None else expected[:, cols]
        assert torch.equal(e.tensor(), expected), e.slot.name
    # no per-module record of the block is left on the modules beyond the owner itself
    hidden = {k for m in model.modules() for k in m.__dict__ if k.startswith("_loft")}
    assert hidden == {"_loft_owner"}
    sd, owned = model.state_dict(), dict(w.owned)
    w.expand(write_back=True)
    assert w.state == "full" and same(sd, model.state_dict())
    assert all(p.shape == q.shape for p, q in zip(model.parameters(), full.parameters()))
    w.shrink(owned)
    assert w.state == "compact" and same(sd, model.state_dict())


def test_the_simulator_syncs_through_the_public_sync_only(monkeypatch):
    model, groups = MODELS["preact"]()
    calls = []
    real = lk.LoftOptimizer.sync
    monkeypatch.setattr(lk.LoftOptimizer, "sync", lambda self: (calls.append(self.rank), real(self))[1])
    sim = lk.LoftSimulator(model, groups, SGD, workers=3, sync_every=2)
    for t in range(4):
        sim.step([batch(s, t) for s in range(3)], loss_fn)
    assert sim.round == 2 and sorted(calls) == [0, 0, 1, 1, 2, 2]
    for name in ("_pack", "_finish_sync", "_auto_sync", "_sync", "_collect"):
        assert not hasattr(sim.optimizers[0], name)


def test_a_simulated_rank_refuses_to_sync_on_its_own():
    full, groups = MODELS["preact"]()
    opt = rank(copy.deepcopy(full), groups)
    train(opt.model, opt, 1)
    with pytest.raises(RuntimeError, match="sync runs with every other worker's, from LoftSimulator"):
        opt.finalize()


def test_exchange_arguments_are_checked():
    full, groups = MODELS["preact"]()
    base = SGD(full.parameters())
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        lk.LoftOptimizer(base, full, groups, process_group=object())
    with pytest.raises(ValueError, match="process_group or exchange, not both"):
        lk.LoftOptimizer(base, full, groups, process_group=object(), exchange=InProcessExchange(2).rank(0))
    with pytest.raises(TypeError, match="exchange must be"):
        lk.LoftOptimizer(base, full, groups, exchange=(0, 2))
    with pytest.raises(ValueError, match="masters is given with an exchange only"):
        lk.LoftOptimizer(base, full, groups, masters={})
    import loft_kernels.training.sync as sync
    assert not hasattr(sync, "LocalGroup")


# ------------------------------------------------------------ full view ----
def test_full_view_is_the_one_full_model_context():
    assert lk.dense is lk.full_view
    full, groups = MODELS["mobilenet"]()
    model = copy.deepcopy(full)
    opt = rank(model, groups)
    train(model, opt, 2)
    plain = copy.deepcopy(full)
    plain.load_state_dict(model.state_dict())
    x = batch(0, 9)[0]
    with torch.no_grad(), lk.full_view(model.eval()):
        with lk.full_view(model):  # nested: the outer view holds
            got = model(x)
    assert torch.equal(got, plain.eval()(x))
    assert model.get_submodule(groups[0].producer).weight.shape[0] < groups[0].n  # compact again after


# ------------------------------------------------ dtype and device moves ----
def converted_mid_round(convert, value_of=lambda v: v, dtype=torch.float32):
    """A rank trained 2 steps, converted mid-round, and one converted before its optimizer was built from the same
    state; both trained 2 more steps. The state must survive the conversion and both must train on equal."""
    full, groups = MODELS["preact"]()
    a = copy.deepcopy(full)
    opt_a = rank(a, groups, factory=PLAIN_SGD)
    train(a, opt_a, 2)
    saved = a.state_dict()
    convert(a)
    assert same({k: value_of(v) if v.is_floating_point() else v for k, v in saved.items()}, a.state_dict())
    b = convert(copy.deepcopy(full))
    b.load_state_dict(a.state_dict())
    opt_b = rank(b, groups, factory=PLAIN_SGD)
    train(a, opt_a, 2, dtype=dtype, start=2)
    train(b, opt_b, 2, dtype=dtype, start=2)
    assert same(a.state_dict(), b.state_dict())
    return a, b


def test_double_mid_round_moves_the_masters_and_trains_on_as_a_double_model():
    a, _ = converted_mid_round(lambda m: m.double(), lambda v: v.double(), torch.float64)
    assert all(p.dtype == torch.float64 for p in a.parameters())


def test_channels_last_blocks_follow_the_masters_layout_also_when_converted_mid_round():
    for m in converted_mid_round(lambda m: m.to(memory_format=torch.channels_last)):
        # every 4-D block (rows and columns cut from a channels-last master) is channels-last
        blocks = [p for p in m.parameters() if p.dim() == 4 and p.shape[1] > 1]
        assert blocks and all(p.is_contiguous(memory_format=torch.channels_last) for p in blocks)


def test_half_and_float_mid_round_round_trip_the_state_dict():
    full, groups = MODELS["vgg"]()
    model = copy.deepcopy(full)
    rank(model, groups)
    sd = model.state_dict()
    model.half()
    assert all(v.dtype == torch.float16 for v in model.state_dict().values() if v.is_floating_point())
    model.float()
    assert same({k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()}, model.state_dict())


def test_device_move_mid_round_moves_the_masters_too():
    full, groups = MODELS["vgg"]()
    model = copy.deepcopy(full)
    opt = rank(model, groups)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    model.to("meta")
    assert all(p.device.type == "meta" and p.shape == shapes[n] for n, p in model.named_parameters())
    sd = model.state_dict()  # full-size, on the new device
    assert all(v.device.type == "meta" and v.shape == full.state_dict()[k].shape for k, v in sd.items())
    assert opt.worker.state == "compact"


def test_simulator_model_conversion_converts_every_worker():
    model, groups = MODELS["preact"]()
    a = lk.LoftSimulator(copy.deepcopy(model), groups, SGD, workers=2, sync_every=2)
    a.model.double()  # mid-round: the workers are compact already
    b = lk.LoftSimulator(copy.deepcopy(model).double(), groups, SGD, workers=2, sync_every=2)
    for sim in (a, b):
        sim.model.train()
        for t in range(3):
            sim.step([(x.double(), y) for x, y in (batch(s, t) for s in range(2))], loss_fn)
    assert same(a.state_dict()["model"], b.state_dict()["model"])
    for opt in a.optimizers:
        with pytest.raises(RuntimeError, match="convert that model"):
            opt.model.float()


# -------------------------------------------------- copies and pickling ----
def test_deepcopy_and_pickle_of_an_optimizer_mid_round_train_on_equal():
    full, groups = MODELS["vgg"]()
    model = copy.deepcopy(full)
    opt = rank(model, groups)
    train(model, opt, 2)
    twin = copy.deepcopy(opt)
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    third = torch.load(buf, weights_only=False)
    assert twin.model is not model and twin.worker.model is twin.model
    for o in (opt, twin, third):
        train(o.model, o, 2, start=2)
    assert same(model.state_dict(), twin.model.state_dict())
    assert same(model.state_dict(), third.model.state_dict())
    assert same(pickle.loads(pickle.dumps(model)).state_dict(), model.state_dict())


def test_deepcopy_of_a_simulator_mid_round_trains_on_equal():
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, SGD, workers=2, sync_every=3)
    sim.model.train()
    sim.step([batch(s, 0) for s in range(2)], loss_fn)
    twin = copy.deepcopy(sim)
    for s in (sim, twin):
        for t in range(1, 5):
            s.step([batch(w, t) for w in range(2)], loss_fn)
    assert same(sim.state_dict()["model"], twin.state_dict()["model"])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_loading_the_simulator_model_restarts_every_worker_from_it(workers):
    model, groups = MODELS["preact"]()
    other, _ = MODELS["preact"]()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    loaded = other.state_dict()

    def run(sim, start, steps):
        sim.model.train()
        for t in range(start, start + steps):
            sim.step([batch(s, t) for s in range(workers)], loss_fn)

    ref = lk.LoftSimulator(copy.deepcopy(other), groups, SGD, workers=workers, sync_every=2)
    sim = lk.LoftSimulator(copy.deepcopy(model), groups, SGD, workers=workers, sync_every=2)
    sim.model.load_state_dict(loaded)  # before the first step: the same run as one built on the loaded model
    run(ref, 0, 4)
    run(sim, 0, 4)
    assert same(ref.state_dict()["model"], sim.state_dict()["model"])
    run(sim, 4, 1)  # mid-round: every worker's blocks and shared copies are cut again from what was loaded
    sim.model.load_state_dict(loaded)
    for m in sim.worker_models:
        assert same(m.state_dict(), loaded)
    with pytest.raises(RuntimeError, match=r"assign=True.*load without assign"):
        sim.model.load_state_dict(loaded, assign=True)


def test_a_copy_of_the_simulator_model_is_a_plain_model_and_a_copy_of_the_simulator_is_whole():
    model, groups = MODELS["preact"]()
    plain = len(pickle.dumps(model))
    sim = lk.LoftSimulator(model, groups, SGD, workers=3, sync_every=3)
    sim.model.train()
    sim.step([batch(s, 0) for s in range(3)], loss_fn)
    assert len(pickle.dumps(sim.model)) < 1.1 * plain  # not the workers, their optimizers and the exchange
    for copied in (copy.deepcopy(sim.model), pickle.loads(pickle.dumps(sim.model))):
        assert same(copied.state_dict(), sim.model.state_dict())
        copied.double()
        assert next(copied.parameters()).dtype == torch.float64
        assert all(p.dtype == torch.float32 for m in sim.worker_models for p in m.parameters())
    twin = copy.deepcopy(sim)
    twin.model.double()  # the twin's model converts the twin's workers, not the original's
    assert all(p.dtype == torch.float64 for m in twin.worker_models for p in m.parameters())
    assert all(p.dtype == torch.float32 for m in sim.worker_models for p in m.parameters())


def test_load_state_dict_assign_is_refused_mid_round_and_works_without():
    full, groups = MODELS["preact"]()
    model = copy.deepcopy(full)
    opt = rank(model, groups)
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match=r"assign=True.*load without assign"):
        model.load_state_dict(sd, assign=True)
    assert all(p is q for p, q in zip(params, model.parameters()))
    model.load_state_dict(sd)
    assert same(sd, model.state_dict()) and opt.worker.state == "compact"


def test_repr_of_a_compact_layer_says_it_is_a_block():
    full, groups = MODELS["preact"]()
    model = copy.deepcopy(full)
    rank(model, groups)
    text = repr(model.get_submodule(groups[0].producer))
    n = groups[0].n
    assert "LoFT worker's block of the full layer" in text and f"of ({n}," in text
    assert "block" not in repr(full.get_submodule(groups[0].producer))


def test_a_second_optimizer_on_a_compact_model_says_how_to_get_a_full_one():
    full, groups = MODELS["preact"]()
    model = copy.deepcopy(full)
    rank(model, groups)
    with pytest.raises(RuntimeError, match=r"already compact.*loaded with model.state_dict\(\)"):
        rank(model, groups)
    fresh = copy.deepcopy(full)
    fresh.load_state_dict(model.state_dict())
    rank(fresh, groups)  # the documented way works


# ------------------------------------------------- the group boundary ----
def test_groups_are_validated_once_per_optimizer_and_once_per_simulator(monkeypatch):
    calls = []
    real = optimizer_checks.resolve_groups
    monkeypatch.setattr(optimizer_checks, "resolve_groups", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    full, groups = MODELS["preact"]()
    opt = rank(copy.deepcopy(full), groups)
    train(opt.model, opt, 3)
    assert len(calls) == 1
    calls.clear()
    sim = lk.LoftSimulator(full, groups, SGD, workers=3, sync_every=1)
    for t in range(2):
        sim.step([batch(s, t) for s in range(3)], loss_fn)
    assert len(calls) == 1 and sim.round == 2


def test_a_frozen_tensor_in_a_group_is_refused_naming_the_group():
    full, groups = MODELS["preact"]()
    g = groups[1]
    full.get_submodule(g.producer).weight.requires_grad_(False)
    with pytest.raises(ValueError, match=rf"group {g.name!r}: producer tensor '{g.producer}.weight' is frozen"):
        rank(full, groups)
    with pytest.raises(ValueError, match="is frozen"):
        lk.LoftSimulator(full, groups, SGD, workers=2)
    assert all(p.shape == q.shape for p, q in zip(full.parameters(), MODELS["preact"]()[0].parameters()))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.other = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.other.weight = self.a.weight  # tied producer weight

    def forward(self, x):
        return self.b(F.relu(self.a(x))).mean((2, 3)) + self.other(x).mean((1, 2, 3))[:, None]


def test_a_hand_written_group_with_a_tied_producer_weight_is_refused():
    model = _Tied()
    group = lk.FilterGroup("a", "a", (), "b", 8)
    with pytest.raises(ValueError, match=r"group 'a': producer tensor 'a.weight' is tied to \['other.weight'\]"):
        lk.LoftOptimizer(SGD(model.parameters()), model, [group], exchange=InProcessExchange(2).rank(0))
    assert model.a.weight.shape == (8, 3, 3, 3)  # nothing cut
    assert "a" not in {g.name for g in lk.find_filter_groups(model, torch.randn(2, 3, 4, 4))}  # as discovery


def test_loss_fn_raising_on_a_later_worker_steps_no_worker():
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, SGD, workers=3, sync_every=4)
    sim.model.train()
    sim.step([batch(s, 0) for s in range(3)], loss_fn)
    before = [copy.deepcopy(m.state_dict()) for m in sim.worker_models]
    opt_before = [copy.deepcopy(o.state_dict()) for o in sim.optimizers]
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("loss failed")
        return loss_fn(out, y)
    with pytest.raises(RuntimeError, match="loss failed") as info:
        sim.step([batch(s, 1) for s in range(3)], flaky)
    assert any("no worker has stepped" in note for note in info.value.__notes__)
    assert sim.step_in_round == 1
    for b, m in zip(before, sim.worker_models):
        assert same(b, m.state_dict())  # parameters and BatchNorm statistics
    for b, o in zip(opt_before, sim.optimizers):
        assert same({k: v for st in b["state"].values() for k, v in st.items()},
                    {k: v for st in o.state_dict()["state"].values() for k, v in st.items()})
    assert all(p.grad is None for m in sim.worker_models for p in m.parameters())
    sim.step([batch(s, 1) for s in range(3)], loss_fn)  # and the run goes on
    assert sim.step_in_round == 2


# ------------------------------------------------------ the Loft layers ----
class _Declared(nn.Module):
    """Two conv -> bn -> relu -> conv groups; the model definition declares only the second partitionable."""

    def __init__(self):
        super().__init__()
        self.a1, self.bn1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1)
        self.a2, self.bn2, self.b2 = lk.LoftConv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.b1(F.relu(self.bn1(self.a1(x))))
        return self.b2(F.relu(self.bn2(self.a2(x)))).mean((2, 3))


def test_convert_keeps_the_layer_classes_unless_asked():
    model = _Declared()
    types = [type(m) for m in model.modules()]
    _, groups = lk.convert(model, torch.randn(2, 3, 6, 6))
    assert [g.name for g in groups] == ["a1", "b1", "a2"] and [type(m) for m in model.modules()] == types
    lk.convert(model, torch.randn(2, 3, 6, 6), loft_layers=True)
    assert type(model.a1) is lk.LoftConv2d and type(model.bn1) is lk.LoftBatchNorm2d
    assert type(model.b1) is lk.LoftConv2d
    assert lk.training.LoftConv2d is lk.nn.LoftConv2d is lk.LoftConv2d  # the older import paths stay


def test_a_loft_layer_in_a_model_definition_declares_its_group():
    model = _Declared()
    _, groups = lk.convert(model, torch.randn(2, 3, 6, 6), policy="declared")
    assert [g.name for g in groups] == ["a2"]
    with pytest.raises(TypeError, match="policy='declared' needs model="):
        lk.select_groups(groups, "declared")
    with pytest.raises(ValueError, match="no group whose producer is a LoftConv2d"):
        lk.convert(MODELS["preact"]()[0], torch.randn(2, 3, 8, 8), policy="declared")
    # and it trains like any other layer: the worker cuts its block, whatever the class
    opt = rank(model, groups, workers=2)
    train_x = torch.randn(4, 3, 6, 6)
    opt.zero_grad()
    model(train_x).sum().backward()
    opt.step()
    assert model.a2.weight.shape[0] == 4 and model.a1.weight.shape[0] == 8
