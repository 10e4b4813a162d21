"""loft_kernels.engine: evaluation, trainers against plainly written loops, exact resume, model files."""
import copy
import csv
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loft_kernels as lk
from loft_kernels import engine
from loft_kernels.data import BatchLoader, get_dataset

torch.set_num_threads(1)  # small models: threads only add contention on the shared CI cores


@pytest.fixture(scope="module")
def data():
    return get_dataset("synthetic", seed=0, n_train=96, n_test=40, num_classes=4, image_size=8)


def tiny_spec(data, policy="all"):
    return {"model": "preact_resnet", "kwargs": {"depths": [1, 1, 1, 1], "width": 0.125,
                                                   "num_classes": data.num_classes, "in_channels": 1},
            "input_shape": [1, 8, 8], "policy": policy, "include": None, "exclude": None}


def fresh(data, seed=0):
    torch.manual_seed(seed)
    return engine.build_model(tiny_spec(data))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_evaluate_matches_plain_computation(data):
    model, groups = fresh(data)
    model.train()
    lk.nn.to_loft_layers(model, groups)
    lk.activate(model, groups, {g.name: torch.tensor([0]) for g in groups})
    got = engine.evaluate(model, data.test_x, data.test_y, batch_size=7)
    with torch.no_grad(), lk.dense(model):
        model.eval()
        out = model(data.test_x)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, data.test_y)), rel=1e-5)
    assert got["acc"] == pytest.approx(100.0 * float((out.argmax(1) == data.test_y).float().mean()))
    # the caller's mode and active filter sets are left as they were
    model.train()
    assert engine.evaluate(model, data.test_x, data.test_y)["acc"] == got["acc"]
    assert model.training
    assert torch.equal(model.get_submodule(groups[0].conv_a).active_out, torch.tensor([0]))


def test_evaluate_rejects_bad_input(data):
    model, _ = fresh(data)
    with pytest.raises(ValueError, match="same non-zero number"):
        engine.evaluate(model, data.test_x, data.test_y[:3])
    with pytest.raises(ValueError, match="x must be 4-D"):
        engine.evaluate(model, data.test_x[0], data.test_y)
    with pytest.raises(TypeError, match="memory_format must be None or a torch.memory_format"):
        engine.evaluate(model, data.test_x, data.test_y, memory_format="channels_last")


def test_evaluate_in_channels_last_matches_the_contiguous_model(data):
    model, _ = fresh(data)
    ref = engine.evaluate(model, data.test_x, data.test_y, batch_size=7)
    model.to(memory_format=torch.channels_last)
    got = engine.evaluate(model, data.test_x, data.test_y, batch_size=7, memory_format=torch.channels_last)
    assert got["acc"] == ref["acc"] and got["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_resolve_memory_format():
    assert engine.resolve_memory_format("auto", "cpu") == torch.channels_last
    assert engine.resolve_memory_format("auto", "meta") == torch.contiguous_format  # only a CPU was measured
    assert engine.resolve_memory_format("contiguous", "cpu") == torch.contiguous_format
    assert engine.resolve_memory_format("channels_last", "cuda") == torch.channels_last
    with pytest.raises(ValueError, match="memory_format must be one of"):
        engine.resolve_memory_format(torch.channels_last, "cpu")


@pytest.mark.parametrize("name, layout", [("contiguous", torch.contiguous_format),
                                          ("channels_last", torch.channels_last),
                                          ("auto", torch.channels_last)])  # auto: channels-last on a CPU
def test_dense_trainer_equals_plain_sgd_loop(data, name, layout):
    cfg = engine.TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                             memory_format=name)
    model, groups = fresh(data)
    trainer = engine.make_trainer(model, groups, data, cfg, seed=3, device="cpu")
    assert trainer.memory_format == layout
    for e in range(2):
        trainer.train_epoch(e)
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=layout)

    ref, _ = fresh(data)
    ref.to(memory_format=layout)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(data.train_x, data.train_y, 16, seed=3)
    total, step = 2 * len(loader), 0
    ref.train()
    for e in range(2):
        for x, y in loader.epoch(e):
            x = x.contiguous(memory_format=layout)
            for g in opt.param_groups:  # cosine annealing per step, written out
                g["lr"] = 0.5 * 0.05 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(ref(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    assert same_weights(trainer.model, ref)


def test_lr_schedules(data):
    model, groups = fresh(data)
    t = engine.make_trainer(model, groups, data, engine.TrainConfig(epochs=4, batch_size=32, lr=0.2), seed=0,
                            device="cpu")
    assert t.steps_per_epoch == 3 and t.lr_at(0) == t.lr_at(11) == 0.2
    c = engine.make_trainer(model, groups, data, engine.TrainConfig(epochs=4, batch_size=32, lr=0.2,
                                                                     schedule="cosine"), seed=0, device="cpu")
    assert c.lr_at(0) == pytest.approx(0.2)
    assert c.lr_at(6) == pytest.approx(0.1)  # half-way through 12 steps
    assert c.lr_at(12) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name, layout", [("contiguous", torch.contiguous_format),
                                          ("auto", torch.channels_last)])
def test_simulated_loft_trainer_wires_shards_and_syncs_each_epoch(data, name, layout):
    cfg = engine.TrainConfig(method="loft", workers=2, epochs=2, batch_size=16, lr=0.05, sync_every=2,
                             memory_format=name)
    model, groups = fresh(data)
    trainer = engine.make_trainer(model, groups, data, cfg, seed=5, device="cpu")
    rows = [trainer.train_epoch(e) for e in range(2)]

    ref, ref_groups = fresh(data)
    ref.to(memory_format=layout)
    sim = lk.LoftSimulator(ref, ref_groups, functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9,
                                                              weight_decay=5e-4),
                           workers=2, sync_every=2, seed=5)
    loader = BatchLoader(data.train_x, data.train_y, 16, seed=5, workers=2)
    losses = []
    for e in range(2):
        sim.model.train()
        for b0, b1 in zip(loader.epoch(e, worker=0), loader.epoch(e, worker=1)):
            b0, b1 = ((x.contiguous(memory_format=layout), y) for x, y in (b0, b1))
            losses.append(sim.step([b0, b1], F.cross_entropy))
        sim.finalize()
    assert same_weights(trainer.model, sim.model)
    assert trainer.steps_per_epoch == 3  # 48 samples per worker in batches of 16
    assert trainer.comm_stats() == sim.comm_stats() and trainer.comm_stats()["syncs"] == 4  # 2 + 1 per epoch
    assert rows[1]["train_loss"] == pytest.approx(sum(sum(l) for l in losses[3:]) / 6, rel=1e-6)


@pytest.mark.parametrize("method, workers", [("dense", 1), ("loft", 2)])
def test_checkpoint_resume_is_exact(tmp_path, data, method, workers):
    cfg = engine.TrainConfig(method=method, workers=workers, epochs=3, batch_size=16, lr=0.05, sync_every=2,
                             state="keep" if workers > 1 else "reset")

    def trainer():
        model, groups = fresh(data)
        return engine.make_trainer(model, groups, data, cfg, seed=1, device="cpu"), groups

    full, _ = trainer()
    engine.fit(full, epochs=3)

    first, groups = trainer()
    tracker = lk.FilterTracker(first.model, groups)
    engine.fit(first, epochs=1, tracker=tracker)
    torch.manual_seed(123)  # the RNG state at the checkpoint is what a resumed run must see
    engine.save_run(tmp_path / "ck.pt", epoch=1, trainer=first, extra={"tracker": tracker.state_dict()})
    expected_rng = torch.get_rng_state()
    torch.manual_seed(999)

    resumed, groups = trainer()
    epoch, extra = engine.load_run(tmp_path / "ck.pt", resumed)
    assert epoch == 1 and torch.equal(torch.get_rng_state(), expected_rng)
    tracker2 = lk.FilterTracker(resumed.model, groups)
    tracker2.load_state_dict(extra["tracker"])
    hist = engine.fit(resumed, epochs=3, start_epoch=epoch, tracker=tracker2)
    assert [r["epoch"] for r in hist] == [2, 3] and tracker2.tags == [1, 2, 3]
    assert same_weights(resumed.model, full.model)
    if workers > 1:
        assert resumed.comm_stats() == full.comm_stats()


def test_load_run_errors(tmp_path, data):
    model, groups = fresh(data)
    t = engine.make_trainer(model, groups, data, engine.TrainConfig(epochs=1), seed=0, device="cpu")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        engine.load_run(tmp_path / "missing.pt", t)
    lk.atomic_save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a loft_kernels run checkpoint"):
        engine.load_run(tmp_path / "other.pt", t)


def test_fit_snapshots_and_stops_early(data):
    model, groups = fresh(data)
    t = engine.make_trainer(model, groups, data, engine.TrainConfig(epochs=5, batch_size=32), seed=0, device="cpu")
    tracker = lk.FilterTracker(t.model, groups)
    seen = []
    hist = engine.fit(t, epochs=5, tracker=tracker, on_epoch=lambda e, h: seen.append((e, len(h))) or e == 2)
    assert seen == [(1, 1), (2, 2)] and tracker.tags == [1, 2]
    assert [set(r) >= {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
            for r in hist] == [True, True]


def test_max_steps_limits_each_epoch(data):
    model, groups = fresh(data)
    t = engine.make_trainer(model, groups, data, engine.TrainConfig(epochs=1, batch_size=8, max_steps=2), seed=0,
                            device="cpu")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    counted = []
    orig = t._step
    t._step = lambda batch: counted.append(1) or orig(batch)
    t.train_epoch(0)
    assert len(counted) == 2 and t.samples_per_epoch == 16
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_recalibrate_bn_is_the_mean_of_batch_statistics(data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=0.3))
    loader = BatchLoader(data.train_x, data.train_y, 32, seed=0, shuffle=False)
    engine.recalibrate_bn(model, loader)
    with torch.no_grad():
        acts = [model[0](x) for x, _ in loader.epoch(0)]
    means = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    vars_ = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    assert torch.allclose(model[1].running_mean, means, atol=1e-6)
    assert torch.allclose(model[1].running_var, vars_, atol=1e-5)
    assert model[1].momentum == 0.3 and model.training


def test_recalibrating_and_evaluating_keep_every_modules_own_mode(data):
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(10))
    model(data.train_x[:2])
    model.train()
    model[1].eval()  # a BatchNorm the user froze inside a training model
    engine.recalibrate_bn(model, [data.train_x[:16]])
    assert model.training and not model[1].training
    engine.evaluate(model, data.test_x[:16], data.test_y[:16])
    assert model.training and not model[1].training


def test_public_recalibrate_bn_takes_any_iterable_of_batches_and_checks_input(data):
    import loft_kernels as lk
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1),
                          nn.BatchNorm2d(2))
    loader = BatchLoader(data.train_x, data.train_y, 32, seed=0, shuffle=False)
    want = copy.deepcopy(model)
    engine.recalibrate_bn(want, loader)
    # plain PyTorch reference: the mean of the per-batch statistics of the first BatchNorm's input
    with torch.no_grad():
        acts = [model[0](x) for x, _ in loader.epoch(0)]
    assert torch.allclose(want[1].running_mean, torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0), atol=1e-6)
    for batches in ([(x, y) for x, y in loader.epoch(0)], [x for x, _ in loader.epoch(0)],
                    ([x, y] for x, y in loader.epoch(0))):
        got = lk.recalibrate_bn(copy.deepcopy(model), batches)
        for k, v in want.state_dict().items():
            assert torch.allclose(got.state_dict()[k].float(), v.float(), atol=1e-6), k
    before = copy.deepcopy(model.state_dict())
    for bad, err, match in [(5, TypeError, "batches must be a BatchLoader or an iterable"),
                            (data.train_x, TypeError, "batches must be a BatchLoader"),
                            ([], ValueError, "yielded no batch"),
                            ([(data.train_x[:4].long(), None)], TypeError, r"batch 0 of batches \(its first item\)"),
                            ([data.train_x[:4], "x"], TypeError, "batch 1 of batches must be a torch.Tensor")]:
        with pytest.raises(err, match=match):
            lk.recalibrate_bn(model, bad)
        for k, v in model.state_dict().items():  # a failed pass leaves the statistics as they were
            assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lk.recalibrate_bn("model", loader)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    assert lk.recalibrate_bn(plain, loader) is plain  # nothing to re-estimate


def test_model_and_ticket_files_round_trip(tmp_path, data):
    model, groups = fresh(data)
    spec = tiny_spec(data)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    engine.save_model(tmp_path / "m.pt", model, spec, groups, epoch=4)
    obj = engine.load_model_file(tmp_path / "m.pt")
    assert obj["epoch"] == 4
    again, groups2 = engine.full_model(obj)
    assert same_weights(again, model) and groups2 == groups

    pruned, kept = lk.prune(model, groups, 0.5)
    engine.save_model(tmp_path / "t.pt", pruned, spec, groups, kept=kept, ratio=0.5)
    ticket = engine.ticket_model(engine.load_model_file(tmp_path / "t.pt"))
    x = torch.randn(5, 1, 8, 8)
    pruned.eval(), ticket.eval()
    assert torch.equal(ticket(x), pruned(x))
    with pytest.raises(ValueError, match="not a ticket"):
        engine.ticket_model(obj)
    with pytest.raises(ValueError, match="not what ratio"):
        engine.pruned_skeleton(spec, groups, kept, 0.25)


def test_model_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.load_model_file(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loft_kernels model file"):
        engine.load_model_file(tmp_path / "junk.pt")
    lk.atomic_save({"state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="needs spec, groups, state_dict"):
        engine.load_model_file(tmp_path / "partial.pt")


@pytest.mark.parametrize("kw, match", [
    ({"method": "sgd"}, "method"), ({"schedule": "step"}, "schedule"), ({"epochs": 0}, "epochs"),
    ({"lr": 0.0}, "lr"), ({"momentum": -1.0}, "momentum"), ({"state": "x"}, "state"),
    ({"workers": 2}, "workers/distributed apply to method='loft'"), ({"max_steps": 0}, "max_steps"),
    ({"batch_size": 1.5}, "batch_size"), ({"memory_format": "nhwc"}, "memory_format must be one of"),
])
def test_train_config_validation(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        engine.TrainConfig(**kw)


def test_write_metrics(tmp_path):
    rows = [{"epoch": 1, "loss": 0.5, "emerged": None}, {"epoch": 2, "loss": 0.25, "emerged": 2, "extra": "x"}]
    engine.write_metrics(tmp_path, rows)
    assert json.loads((tmp_path / "metrics.json").read_text()) == rows
    with open(tmp_path / "metrics.csv") as f:
        got = list(csv.DictReader(f))
    assert got == [{"epoch": "1", "loss": "0.5", "emerged": "", "extra": ""},
                   {"epoch": "2", "loss": "0.25", "emerged": "2", "extra": "x"}]


def test_emergence_epochs_uses_the_options(data):
    model, groups = fresh(data)
    tracker = lk.FilterTracker(model, groups)
    assert engine.emergence_epochs(tracker, engine.DEFAULT_EMERGENCE) == {"footrule": None, "mask": None}
    for e in range(1, 4):  # identical snapshots: no distance at all, both criteria fire as early as they can
        tracker.snapshot(e)
    got = engine.emergence_epochs(tracker, {"mask_ratio": 0.5, "footrule_threshold": 0.0, "footrule_window": 1})
    assert got["footrule"] == lk.detect_emergence(tracker, "footrule", threshold=0.0, window=1)
    assert got["mask"] is None  # needs 4 previous snapshots
