"""LoFT workers as real sub-models: compact tensors and gradients, full-size state_dict, and the
torch.optim.Optimizer contract (GradScaler, clipping, hooks, schedulers, add_param_group) against
the physically sliced sub-model of the plain reference."""
import copy

import pytest
import torch
from loft_reference import MODELS, OPTIMIZERS, batch, loss_fn, one_thread, sub_model  # noqa: F401
from torch import nn

import loft_kernels as lk
from loft_kernels.training.exchange import InProcessExchange

pytestmark = pytest.mark.usefixtures("one_thread")
NEVER = 1 << 30


def worker(rank=1, workers=3, factory=OPTIMIZERS["sgd"], model_name="preact"):
    """(initial full model, worker model, its LoftOptimizer, groups) for simulated rank `rank` (no sync)."""
    full, groups = MODELS[model_name]()
    model = copy.deepcopy(full)
    opt = lk.LoftOptimizer(factory(model.parameters()), model, groups, sync_every=NEVER,
                           exchange=InProcessExchange(workers).rank(rank))
    return full, model.train(), opt, groups


def block_shapes(full, opt):
    shapes = dict((n, t.shape) for n, t in full.named_parameters())
    owned = opt.owned()
    out = {}
    for b in opt._rs.blocks:
        rows, cols = b.slot.index(owned)
        shape = list(shapes[b.slot.name])
        if rows is not None:
            shape[0] = len(rows)
        if cols is not None:
            shape[1] = len(cols)
        out[b.slot.name] = torch.Size(shape)
    return out


def test_a_worker_holds_only_compact_parameters_gradients_and_state():
    full, model, opt, _ = worker()
    expected = block_shapes(full, opt)
    assert expected and all(s != full.get_parameter(n).shape for n, s in expected.items())
    x, y = batch(0, 0)
    loss_fn(model(x), y).backward()
    named = dict(model.named_parameters())
    for name, shape in expected.items():  # no full-size gradient of a partitioned tensor exists
        assert named[name].shape == shape and named[name].grad.shape == shape, name
    opt.step()
    for name, shape in expected.items():
        assert all(v.shape == shape for v in opt.state[named[name]].values() if v.dim()), name
    # the base optimizer's param_groups hold exactly the tensors the backward filled
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_state_dict_is_full_size_mid_round_and_round_trips_through_the_plain_model():
    full, model, opt, groups = worker()
    for t in range(3):
        opt.zero_grad()
        loss_fn(model(batch(1, t)[0]), batch(1, t)[1]).backward()
        opt.step()
    sd = model.state_dict()
    plain = lk.preact_resnet((1, 1, 1, 1), num_classes=5, width=0.1)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(sd)
    owned = opt.owned()
    for b in opt._rs.blocks:  # owned block as trained so far, the rest as at the last sync (the start)
        rows, cols = b.slot.index(owned)
        mask = torch.zeros(sd[b.slot.name].shape, dtype=torch.bool)
        r = rows if rows is not None else torch.arange(mask.shape[0])
        if cols is None:
            mask[r] = True
        else:
            mask[r[:, None], cols[None, :]] = True
        assert torch.equal(sd[b.slot.name][mask].view(b.param.shape), b.param.detach())
        assert torch.equal(sd[b.slot.name][~mask], full.state_dict()[b.slot.name][~mask])
    # dense(model) evaluates the full model: the plain model with that state
    x = batch(5, 0)[0]
    model.eval()
    plain.eval()
    with lk.dense(model):
        assert torch.equal(model(x), plain(x))
    assert all(b.param.shape != sd[b.slot.name].shape for b in opt._rs.blocks)  # compact again after
    # ... and loads back: a second worker at the same round takes the full-size state
    _, other, other_opt, _ = worker()
    other.load_state_dict(sd)
    for b, c in zip(opt._rs.blocks, other_opt._rs.blocks):
        assert torch.equal(b.param, c.param)


@pytest.mark.parametrize("over", ["param_groups", "model"])
def test_clipping_equals_clipping_the_sliced_sub_model(over):
    full, model, opt, groups = worker(rank=0, workers=2)
    sub = sub_model(full, groups, opt.owned())
    x, y = batch(0, 0)
    for m in (model, sub):
        m.train()
        loss_fn(m(x), y).backward()
    params = [p for g in opt.param_groups for p in g["params"]] if over == "param_groups" else model.parameters()
    norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(sub.parameters(), 0.5)
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    subs = dict(sub.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, subs[name].grad, rtol=1e-6, atol=1e-9)


def test_every_optimizer_hook_fires_and_schedulers_follow_their_schedule():
    _, model, opt, _ = worker()
    fired = []
    opt.register_step_pre_hook(lambda o, a, k: fired.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: fired.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: fired.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: fired.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: fired.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: fired.append("load_post"))
    plain = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=12) for o in (opt, plain)]
    lrs = ([], [])
    for t in range(12):
        opt.zero_grad()
        loss_fn(model(batch(1, t)[0]), batch(1, t)[1]).backward()
        opt.step()
        plain.step()
        for s, out in zip(scheds, lrs):
            s.step()
            out.append(s.get_last_lr()[0])
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 5
    opt.load_state_dict(opt.state_dict())
    assert fired.count("step_pre") == fired.count("step_post") == 12
    assert [f for f in fired if not f.startswith("step")] == ["sd_pre", "sd_post", "load_pre", "load_post"]
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    before = opt.param_groups[0]["lr"]
    for _ in range(4):
        opt.step()
        step_lr.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(before / 4)
    assert opt.param_groups is opt.base.param_groups


def test_state_dict_is_the_base_layout_plus_a_loft_entry():
    _, _, opt, _ = worker()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "loft"}
    assert {"round", "step_in_round", "fingerprint", "owned", "comm"} <= set(sd["loft"])


def test_add_param_group_behaves_as_on_the_base_optimizer():
    full, groups = MODELS["preact"]()
    head = [full.linear.weight, full.linear.bias]
    base = torch.optim.SGD([p for p in full.parameters() if all(p is not h for h in head)], lr=0.1)
    opt = lk.LoftOptimizer(base, full, groups, sync_every=NEVER, exchange=InProcessExchange(2).rank(0))
    opt.add_param_group({"params": head, "lr": 0.01})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.01 and base.param_groups is opt.param_groups
    x, y = batch(0, 0)
    loss_fn(full(x), y).backward()
    before = full.linear.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, full.linear.weight)
    with pytest.raises(ValueError, match="param_group.*not one of model's"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(TypeError, match="param_group"):
        opt.add_param_group([full.linear.bias])


def _run_sim(steps, workers=2, scalers=None, autocast=False):
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=workers, sync_every=3)
    sim.model.train()
    losses = []
    for t in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses.append(sim.step([batch(s, t % 4) for s in range(workers)], loss_fn, scalers=scalers))
    sim.finalize()
    return sim, losses


def test_grad_scaler_steps_equal_unscaled_steps():
    scaled, _ = _run_sim(7, scalers=[torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) for _ in range(2)])
    plain, _ = _run_sim(7)
    for (k, a), b in zip(plain.model.state_dict().items(), scaled.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("which", ["shared", "partitioned"])
def test_an_inf_gradient_skips_that_workers_update_and_halves_its_scale(which):
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) for _ in range(2)]
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=2, sync_every=3)
    sim.model.train()
    sim.step([batch(s, 0) for s in range(2)], loss_fn, scalers=scalers)
    before = [m.state_dict() for m in sim.worker_models]
    name = "linear.weight" if which == "shared" else f"{groups[0].conv_a}.weight"
    handle = sim.worker_models[1].get_parameter(name).register_hook(
        lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    sim.step([batch(s, 1) for s in range(2)], loss_fn, scalers=scalers)
    handle.remove()
    after = [m.state_dict() for m in sim.worker_models]
    params = {n for n, _ in sim.model.named_parameters()}
    assert all(torch.equal(before[1][k], after[1][k]) for k in params)  # worker 1 skipped its update
    assert any(not torch.equal(before[0][k], after[0][k]) for k in params)  # worker 0 did not
    assert [s.get_scale() for s in scalers] == [2.0 ** 16, 2.0 ** 15]
    assert sim.step_in_round == 2
    sim.step([batch(s, 2) for s in range(2)], loss_fn, scalers=scalers)
    assert sim.round == 1 and sim.step_in_round == 0  # the sync came on schedule
    assert all(torch.isfinite(v).all() for v in sim.model.state_dict().values() if v.is_floating_point())


def test_autocast_bfloat16_trains_like_float32():
    runs = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        _, losses = _run_sim(24, autocast=autocast)
        runs[name] = [sum(step) / len(step) for step in losses]
    for name, curve in runs.items():
        assert sum(curve[-4:]) / 4 < 0.8 * sum(curve[:4]) / 4, name  # the loss falls
    assert abs(sum(runs["bf16"][-4:]) - sum(runs["fp32"][-4:])) / 4 < 0.15 * runs["fp32"][0]
    # dense training of the converted model under autocast, for comparison with the same data
    model, _ = MODELS["preact"]()
    opt = OPTIMIZERS["sgd"](model.parameters())
    model.train()
    dense = []
    for t in range(24):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(batch(0, t % 4)[0]), batch(0, t % 4)[1])
        loss.backward()
        opt.step()
        dense.append(float(loss.detach()))
    assert sum(dense[-4:]) < 0.8 * sum(dense[:4])


def test_the_simulator_holds_one_full_model_and_s_sub_models():
    model, groups = MODELS["vgg"]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=3, sync_every=2)
    masters = dict(sim.model.named_parameters())
    for opt in sim.optimizers:
        for b in opt._rs.blocks:
            rec = next(e for e in opt.worker.entries if e.slot is b.slot)
            assert rec.master is masters[b.slot.name]  # cut from the one full model, not a copy
    for name, p in masters.items():
        blocks = [dict(m.named_parameters())[name] for m in sim.worker_models]
        if any(b.shape != p.shape for b in blocks):
            assert sum(b.numel() for b in blocks) <= p.numel()


def test_simulator_step_is_all_or_nothing():
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=2, sync_every=3)
    sim.model.train()
    sim.step([batch(s, 0) for s in range(2)], loss_fn)
    before = [m.state_dict() for m in sim.worker_models]
    bad = (torch.randn(4, 5, 8, 8), torch.randint(0, 5, (4,)))  # five channels: the stem expects three
    with pytest.raises(ValueError, match=r"batches\[1\].*no worker has stepped"):
        sim.step([batch(0, 1), bad], loss_fn)
    assert sim.step_in_round == 1
    for b, m in zip(before, sim.worker_models):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in b.items())


def test_set_active_keeps_its_own_copy_of_the_index():
    conv = lk.LoftConv2d(4, 6, 3)
    idx = torch.tensor([0, 1, 2])
    conv.set_active(out_index=idx)
    idx[2] = 0  # a duplicate, had the layer kept the caller's tensor
    assert torch.equal(conv.active_out, torch.tensor([0, 1, 2]))


def test_loading_a_state_saved_with_other_groups_names_what_differs():
    _, _, opt, groups = worker()
    sd = opt.state_dict()
    renamed = copy.deepcopy(sd)
    renamed["loft"]["fingerprint"]["groups"] = [("other" + n, k) for n, k in sd["loft"]["fingerprint"]["groups"]]
    with pytest.raises(ValueError, match="state_dict was saved with other groups"):
        opt.load_state_dict(renamed)
    with pytest.raises(ValueError, match="seed=5"):
        other = copy.deepcopy(sd)
        other["loft"]["fingerprint"]["seed"] = 5
        opt.load_state_dict(other)


def test_a_state_saved_in_another_dtype_loads_and_another_shape_is_named():
    _, model, opt, groups = worker()
    sd = opt.state_dict()
    model.double()  # converted after the optimizer was built: the state still fits, as torch's optimizers load it
    opt.load_state_dict(copy.deepcopy(sd))
    old_format = copy.deepcopy(sd)  # fingerprints saved with each entry's dtype beside its shape
    for field in ("parameters", "buffers"):
        old_format["loft"]["fingerprint"][field] = [(n, s, "torch.float32")
                                                    for n, s in sd["loft"]["fingerprint"][field]]
    del old_format["loft"]["fingerprint"]["dtypes"]
    opt.load_state_dict(old_format)
    reshaped = copy.deepcopy(sd)
    name, shape = reshaped["loft"]["fingerprint"]["parameters"][0]
    reshaped["loft"]["fingerprint"]["parameters"][0] = (name, (shape[0] + 1,) + tuple(shape[1:]))
    with pytest.raises(ValueError, match=rf"other parameters \('{name}' has shape \({shape[0] + 1}, "):
        opt.load_state_dict(reshaped)


def test_set_active_is_refused_on_a_compact_layer():
    _, model, opt, groups = worker()
    lk.nn.to_loft_layers(model, groups)  # active sets need Loft layers; training does not
    conv = model.get_submodule(groups[0].conv_a)
    with pytest.raises(RuntimeError, match="compact sub-model"):
        conv.set_active(out_index=torch.tensor([0]))
    lk.activate(model, groups, None)  # clearing is always allowed


def test_state_dict_and_nested_dense_inside_dense():
    full, model, opt, _ = worker()
    x, y = batch(1, 0)
    loss_fn(model(x), y).backward()
    opt.step()
    outside = model.state_dict()
    with lk.dense(model):
        inside = model.state_dict()
        with lk.dense(model):
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in inside.items())
        model.load_state_dict(inside)
    assert all(torch.equal(v, inside[k]) for k, v in outside.items())
    assert all(b.param.shape != full.get_parameter(b.slot.name).shape for b in opt._rs.blocks)
