"""LoftOptimizer / LoftSimulator semantics: S = 1 is plain training, owned-rows-only stepping, reset vs keep,
communication accounting, bad input."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from loft_reference import MODELS, OPTIMIZERS, batch, loss_fn, one_thread  # noqa: F401 (fixture)
from torch import nn

import loft_kernels as lk
from loft_kernels.training.partition import owned_count

pytestmark = pytest.mark.usefixtures("one_thread")


def full_block_mask(shape, rows, cols):
    """True on the elements of the block rows x cols (None = all)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    r = rows if rows is not None else torch.arange(shape[0])
    if len(shape) == 1:
        mask[r] = True
    else:
        c = cols if cols is not None else torch.arange(shape[1])
        mask[r[:, None], c[None, :]] = True
    return mask


def slot_tensors(opt):
    """(slot, full-size value, rows, cols) of every partitioned tensor of a worker, for its current round."""
    t = opt.model.state_dict()  # full-size at any time, also mid-round
    owned = opt.owned()
    return [(s, t[s.name], *s.index(owned)) for s in opt._plan.slots]


# ------------------------------------------------------------- S = 1 ----
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_one_worker_is_plain_training(opt_name):
    factory = {"sgd": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True),
               "adam": OPTIMIZERS["adam"]}[opt_name]
    model, groups = MODELS["preact"]()
    plain = copy.deepcopy(model)
    plain_opt = factory(plain.parameters())
    loft = copy.deepcopy(model)
    opt = lk.LoftOptimizer(factory(loft.parameters()), loft, groups, sync_every=7)
    sim = lk.LoftSimulator(copy.deepcopy(model), groups, factory, workers=1, sync_every=7)
    assert opt.workers == 1 and opt.rank == 0 and sim.workers == 1
    for m in (plain, loft, sim.model):
        m.train()
    for t in range(20):  # rounds of 7: two boundaries where a reset would show
        x, y = batch(0, t)
        for m, o in ((plain, plain_opt), (loft, opt)):
            o.zero_grad()
            loss_fn(m(x), y).backward()
            o.step()
        sim.step([(x, y)], loss_fn)
    opt.finalize()
    sim.finalize()
    assert opt.round == 3 and opt.comm_stats()["syncs"] == 0 and opt.comm_stats()["bytes_sent"] == 0
    for other in (loft, sim.model):
        for (k, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k
    assert torch.equal(opt.partition(4)[groups[0].name][0], torch.arange(groups[0].n))
    # the base optimizer's state is untouched by the wrapper (same momentum / Adam moments)
    for p, q in zip(plain.parameters(), loft.parameters()):
        for key, v in plain_opt.state[p].items():
            assert torch.equal(v, opt.state[q][key])
    assert max((a - b).abs().max() for a, b in zip(plain.parameters(), model.parameters())) > 1e-3


# ------------------------------------------------- owned rows only ----
def test_non_owned_rows_and_their_state_are_unchanged_within_a_round():
    model, groups = MODELS["vgg"]()  # the middle conv is a chain: row and column owners differ
    workers, k = 3, 4
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["adam"], workers=workers, sync_every=k, state="keep")
    sim.model.train()
    t = 0
    for _ in range(k):  # round 0: every filter gets optimizer state
        sim.step([batch(s, t) for s in range(workers)], loss_fn)
        t += 1
    assert sim.round == 1
    start = [{s.name: full.clone() for s, full, _, _ in slot_tensors(o)} for o in sim.optimizers]
    shadows = [{n: {key: v.clone() for key, v in d.items()} for n, d in o._rs.shadow.items()} for o in sim.optimizers]
    assert any(shadows), "the chain conv's state outside the owned blocks lives in the shadow"
    for step in range(k - 1):
        sim.step([batch(s, t) for s in range(workers)], loss_fn)
        t += 1
        assert sim.round == 1
        for w, opt in enumerate(sim.optimizers):
            changed = 0
            for slot, full, rows, cols in slot_tensors(opt):
                owned = full_block_mask(full.shape, rows, cols)
                assert torch.equal(full[~owned], start[w][slot.name][~owned]), (w, slot.name)
                changed += int(not torch.equal(full[owned], start[w][slot.name][owned]))
            assert changed > 0, "the owned blocks did train"
            # the parameters, their gradients and the base optimizer's state exist only for the owned block ...
            full = dict(sim.model.named_parameters())
            for b in opt._rs.blocks:
                owned_shape = full_block_mask(full[b.slot.name].shape, *opt.worker.index(b.slot)).sum()
                assert b.param.numel() == owned_shape
                for v in opt.state[b.param].values():
                    assert v.dim() == 0 or v.shape == b.param.shape
            # ... and the rest of the state (kept full-size for chain convs) does not move
            for name, d in opt._rs.shadow.items():
                for key, v in d.items():
                    assert torch.equal(v, shadows[w][name][key])


def test_uneven_splits_give_compact_views_of_owned_size():
    model, groups = MODELS["preact"]()  # groups of 6, 13, 26, 51 filters over 4 workers
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=4, sync_every=2)
    sizes = {g.name: g.n for g in groups}
    for rnd in range(2):
        for r, opt in enumerate(sim.optimizers):
            for name, idx in opt.owned().items():
                assert idx.numel() == owned_count(sizes[name], 4, r)
            for b in opt._rs.blocks:
                group = b.slot.row_group or b.slot.col_group
                dim = 0 if b.slot.row_group else 1
                assert b.param.shape[dim] == owned_count(sizes[group], 4, r)
        for t in range(2):
            sim.step([batch(s, t) for s in range(4)], loss_fn)
    assert sim.round == 2


# ------------------------------------------------------ reset / keep ----
def test_reset_clears_the_state_at_every_sync():
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=2, sync_every=2, state="reset")
    for t in range(4):
        sim.step([batch(s, t) for s in range(2)], loss_fn)
        for opt in sim.optimizers:
            if sim.step_in_round == 0:
                assert len(opt.state) == 0
            else:
                trainable = sum(1 for g in opt.param_groups for p in g["params"])
                assert sum(1 for v in opt.state.values() if v.get("momentum_buffer") is not None) == trainable


def test_keep_moves_each_filters_state_to_its_next_owner_and_averages_shared_state():
    model, groups = MODELS["preact"]()
    workers, k = 3, 2
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["adam"], workers=workers, sync_every=k, state="keep")
    captured = {}
    sync = sim._sync

    def spy():  # the workers' state just before the sync ending round 0
        captured["state"] = []
        for opt in sim.optimizers:
            slots = {b.slot.name: ({key: v.clone() for key, v in opt.state[b.param].items()},
                                   *opt.worker.index(b.slot)) for b in opt._rs.blocks}
            shared = {n: {key: v.clone() for key, v in opt.state[p].items()}
                      for n, p in opt.model.named_parameters() if n in opt._plan.shared_params}
            captured["state"].append((slots, shared))
        sync()
    sim._sync = spy
    for t in range(k):
        sim.step([batch(s, t) for s in range(workers)], loss_fn)
    assert sim.round == 1 and len(captured["state"]) == workers
    params = dict(sim.model.named_parameters())
    for name in captured["state"][0][0]:
        for key in ("exp_avg", "exp_avg_sq"):
            full = torch.full_like(params[name], float("nan"))
            for slots, _ in captured["state"]:
                state, rows, cols = slots[name]
                full[full_block_mask(full.shape, rows, cols)] = state[key].reshape(-1)
            assert not full.isnan().any()
            for opt in sim.optimizers:  # new owner's compact state == previous owners' state of those filters
                b = next(b for b in opt._rs.blocks if b.slot.name == name)
                expected = full[full_block_mask(full.shape, *opt.worker.index(b.slot))].reshape(b.param.shape)
                assert torch.equal(opt.state[b.param][key], expected), (name, key)
                assert opt.state[b.param]["step"].item() == k
    for name, p in sim.optimizers[0].model.named_parameters():
        if name not in sim.optimizers[0]._plan.shared_params:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            mean = torch.stack([shared[name][key] for _, shared in captured["state"]]).mean(0)
            for opt in sim.optimizers:
                q = dict(opt.model.named_parameters())[name]
                torch.testing.assert_close(opt.state[q][key], mean, rtol=1e-6, atol=1e-12)


def test_reset_and_keep_train_differently():
    model, groups = MODELS["preact"]()
    out = {}
    for state in ("reset", "keep"):
        sim = lk.LoftSimulator(copy.deepcopy(model), groups, OPTIMIZERS["sgd"], workers=2, sync_every=2, state=state)
        for t in range(4):
            sim.step([batch(s, t) for s in range(2)], loss_fn)
        out[state] = sim.model.state_dict()
    key = f"{groups[0].conv_a}.weight"
    assert not torch.allclose(out["reset"][key], out["keep"][key])


# ----------------------------------------------------- accounting ----
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 3, 1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.b(F.relu(self.bn(self.a(x)))).mean((2, 3)))


def tiny_net():
    torch.manual_seed(0)
    return lk.convert(TinyNet(), torch.randn(2, 2, 3, 3))


# Hand count: shared fc 6 + 2 floats = 32 B; counter bn.num_batches_tracked 8 B; one filter =
# a row (2) + bn weight, bias, running mean, var (4) + b column (3) = 9 floats = 36 B; with state
# "keep" and one state tensor per parameter the shared part doubles and each filter gains 2+2+3 floats.
HAND = {  # (workers, state): (all_reduce buffer bytes, all_reduce sent, all_gather total, all_gather sent)
    (2, "reset"): (40, 32 + 8, 2 * 72, 72),
    (3, "reset"): (40, 2 * 2 * 32 // 3 + 2 * 2 * 8 // 3, 3 * 72, 2 * 72),  # ranks own 2, 1, 1: padded to 2
    (2, "keep"): (72, 64 + 8, 2 * 2 * 16 * 4, 2 * 16 * 4),
}


@pytest.mark.parametrize("workers,state", list(HAND))
def test_comm_accounting_hand_counted(workers, state):
    model, groups = tiny_net()
    assert [(g.conv_a, g.norms, g.conv_b, g.n) for g in groups] == [("a", ("bn",), "b", 4)]
    ar_buf, ar_sent, ag_total, ag_sent = HAND[(workers, state)]
    one = lk.loft_sync_bytes(model, groups, workers, state, state_per_param=1)
    assert one["all_reduce"] == {"collectives": 2, "buffer_bytes": ar_buf, "bytes_sent": ar_sent,
                                 "bytes_received": ar_sent}
    assert one["all_gather"] == {"collectives": 1, "buffer_bytes": ag_total, "bytes_sent": ag_sent,
                                 "bytes_received": ag_sent}
    assert one["bytes_sent"] == ar_sent + ag_sent and one["collectives"] == 3
    # a real (simulated) run sends exactly that per sync
    sim = lk.LoftSimulator(model, groups, functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                           workers=workers, sync_every=2, state=state)
    for t in range(4):
        sim.step([(torch.randn(3, 2, 3, 3), torch.randint(0, 2, (3,))) for _ in range(workers)], loss_fn)
    stats = sim.comm_stats()
    assert stats["syncs"] == 2 and stats["workers"] == workers
    for kind in ("all_reduce", "all_gather"):
        assert stats[kind] == {key: 2 * v for key, v in one[kind].items()}
    assert stats["bytes_sent"] == 2 * one["bytes_sent"] == stats["bytes_received"]


@pytest.mark.parametrize("model_name,opt_name,state,per_param", [
    ("preact", "adam", "keep", 2), ("vgg", "sgd", "keep", 1), ("vgg", "adam", "reset", 0)])
def test_comm_stats_equal_loft_sync_bytes(model_name, opt_name, state, per_param):
    model, groups = MODELS[model_name]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS[opt_name], workers=3, sync_every=2, state=state)
    for t in range(3):
        sim.step([batch(s, t) for s in range(3)], loss_fn)
    sim.finalize()
    one = lk.loft_sync_bytes(model, groups, 3, state, state_per_param=per_param)
    stats = sim.comm_stats()
    assert stats["syncs"] == 2
    for key in ("collectives", "bytes_sent", "bytes_received"):
        assert stats[key] == 2 * one[key]
    assert lk.loft_sync_bytes(model, groups, 1, state)["bytes_sent"] == 0


def test_comm_accounting_refuses_groups_of_another_model():
    x = torch.randn(2, 3, 32, 32)
    small, big = lk.vgg11(width=0.125), lk.vgg11(width=0.25)
    groups = lk.find_filter_groups(small, x)
    with pytest.raises(ValueError, match="were the groups found on another model"):
        lk.loft_sync_bytes(big, groups, 4)
    with pytest.raises(ValueError, match="were the groups found on another model"):
        lk.parameter_share(lk.resnet18(width=0.125), groups)
    with pytest.raises(TypeError, match="groups must be a list of FilterGroup"):
        lk.parameter_share(small, None)


def test_ring_model():
    assert lk.ring_all_reduce_bytes(1000, 4) == 1500
    assert lk.ring_all_reduce_bytes(1000, 1) == 0
    assert lk.ring_all_gather_bytes(1000, 4) == 750
    assert lk.ring_all_gather_bytes(999, 2) == 499


# ------------------------------------------------ optimizer protocol ----
def test_closure_lr_scheduler_and_param_groups():
    model, groups = MODELS["preact"]()
    model.train()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = lk.LoftOptimizer(base, model, groups, sync_every=3)
    assert opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0, 0)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)
    sched.step()
    assert isinstance(loss, torch.Tensor) and base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_state_dict_round_trip_mid_round_in_process():
    model, groups = MODELS["vgg"]()
    factory = OPTIMIZERS["adam"]
    a = lk.LoftSimulator(copy.deepcopy(model), groups, factory, workers=3, sync_every=3, state="keep")
    for t in range(4):  # one sync, then one step into round 1
        a.step([batch(s, t) for s in range(3)], loss_fn)
    b = lk.LoftSimulator(copy.deepcopy(model), groups, factory, workers=3, sync_every=3, state="keep")
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.round == 1 and b.step_in_round == 1
    for t in range(4, 7):
        for sim in (a, b):
            sim.step([batch(s, t) for s in range(3)], loss_fn)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    assert a.comm_stats() == b.comm_stats()


# ------------------------------------------------------- bad input ----
def test_bad_input():
    model, groups = MODELS["preact"]()
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    ok = lambda **kw: lk.LoftOptimizer(**{"base_optimizer": sgd(model.parameters()), "model": model,  # noqa: E731
                                           "groups": groups, **kw})
    with pytest.raises(TypeError, match="base_optimizer"):
        ok(base_optimizer=list(model.parameters()))
    with pytest.raises(TypeError, match="base_optimizer.*LBFGS"):
        ok(base_optimizer=torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="base_optimizer holds parameters"):
        ok(base_optimizer=sgd(list(model.parameters()) + [nn.Parameter(torch.zeros(2))]))
    with pytest.raises(TypeError, match="model"):
        ok(model="model")
    with pytest.raises(ValueError, match="sync_every"):
        ok(sync_every=0)
    with pytest.raises(TypeError, match="sync_every"):
        ok(sync_every=2.5)
    with pytest.raises(TypeError, match="seed"):
        ok(seed=None)
    with pytest.raises(ValueError, match="state"):
        ok(state="average")
    with pytest.raises(ValueError, match="process_group"):
        ok(process_group=object())
    with pytest.raises(TypeError, match="groups"):
        ok(groups=groups[0])
    with pytest.raises(ValueError, match="groups"):
        ok(groups=[])
    plain = lk.preact_resnet((1, 1, 1, 1), num_classes=5, width=0.1)  # unconverted layers train as sub-models too
    lk.LoftOptimizer(sgd(plain.parameters()), plain, groups)
    with pytest.raises(ValueError, match="groups.*does not have"):
        lk.LoftOptimizer(sgd(plain.parameters()), plain, [lk.FilterGroup("x", "nope", (), "conv1", 6)])
    wrong_n = [lk.FilterGroup(g.name, g.conv_a, g.norms, g.conv_b, g.n - 1) for g in groups]
    with pytest.raises(ValueError, match="groups"):
        ok(groups=wrong_n)
    opt = ok()
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure=3)
    with pytest.raises(ValueError, match="param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"base": {}})
    other = lk.LoftOptimizer(sgd(model.parameters()), model, groups, seed=1)
    with pytest.raises(ValueError, match="state_dict was saved with seed"):
        other.load_state_dict(opt.state_dict())

    with pytest.raises(ValueError, match="fewer filters than workers"):
        lk.LoftSimulator(model, groups, sgd, workers=7)  # the first group has 6 filters
    with pytest.raises(ValueError, match="workers"):
        lk.LoftSimulator(model, groups, sgd, workers=0)
    with pytest.raises(ValueError, match="sync_every"):
        lk.LoftSimulator(model, groups, sgd, workers=2, sync_every=-1)
    with pytest.raises(ValueError, match="state"):
        lk.LoftSimulator(model, groups, sgd, workers=2, state="nope")
    with pytest.raises(TypeError, match="optimizer_factory"):
        lk.LoftSimulator(model, groups, "sgd", workers=2)
    with pytest.raises(TypeError, match="optimizer_factory"):
        lk.LoftSimulator(model, groups, lambda ps: None, workers=2)
    with pytest.raises(TypeError, match="base_optimizer.*Adafactor"):
        lk.LoftSimulator(model, groups, torch.optim.Adafactor, workers=2)
    with pytest.raises(TypeError, match="model"):
        lk.LoftSimulator(None, groups, sgd, workers=2)
    sim = lk.LoftSimulator(model, groups, sgd, workers=2)
    with pytest.raises(ValueError, match="batches"):
        sim.step([batch(0, 0)], loss_fn)
    with pytest.raises(TypeError, match="batches"):
        sim.step(batch(0, 0)[0], loss_fn)
    with pytest.raises(TypeError, match=r"batches\[1\]"):
        sim.step([batch(0, 0), batch(1, 0)[0]], loss_fn)
    with pytest.raises(TypeError, match="loss_fn"):
        sim.step([batch(0, 0), batch(1, 0)], "ce")
    with pytest.raises(ValueError, match="loss_fn"):
        sim.step([batch(0, 0), batch(1, 0)], lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="state_dict"):
        sim.load_state_dict({"model": {}})

    with pytest.raises(ValueError, match="state"):
        lk.loft_sync_bytes(model, groups, 2, "both")
    with pytest.raises(ValueError, match="state_per_param"):
        lk.loft_sync_bytes(model, groups, 2, "keep", state_per_param=-1)
    with pytest.raises(TypeError, match="model"):
        lk.loft_sync_bytes(groups, groups, 2)
    with pytest.raises(ValueError, match="workers"):
        lk.loft_sync_bytes(model, groups, 0)
    with pytest.raises(ValueError, match="groups"):
        lk.loft_sync_bytes(tiny_net()[0], groups, 2)
    with pytest.raises(ValueError, match="nbytes"):
        lk.ring_all_reduce_bytes(-1, 2)
    with pytest.raises(TypeError, match="total_bytes"):
        lk.ring_all_gather_bytes(1.5, 2)
