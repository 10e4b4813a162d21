"""LoftSimulator(execution="batched" / "auto"): every worker through one network equals the loop, step by step."""
import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from loft_reference import OPTIMIZERS, batch, max_diff, one_thread  # noqa: F401

import loft_kernels as lk


def _model(kind: str, seed: int = 0):
    """Width 0.2: groups of 13, 26, 51 (102) filters, uneven for every S tested but 13 % 13."""
    torch.manual_seed(seed)
    if kind == "preact":
        model = lk.preact_resnet((1, 1, 1, 1), num_classes=5, width=0.2)
    elif kind == "resnet":
        model = lk.models.resnet((1, 1), "basic", num_classes=5, width=0.2)
    else:
        model = lk.vgg(width=0.2, num_classes=5)
    return lk.convert(model, torch.randn(2, 3, 8, 8))


def _pair(kind, workers, state, opt="sgd", sync_every=2, dtype=torch.float32):
    model, groups = _model(kind)
    model = model.to(dtype)
    sims = [lk.LoftSimulator(copy.deepcopy(model), groups, OPTIMIZERS[opt], workers, sync_every, 0, state,
                             execution=e) for e in ("loop", "batched")]
    for sim in sims:
        sim.model.train()
    return sims


def _assert_same(loop, batched, tol):
    for a, b in zip(loop.worker_models + [loop.model], batched.worker_models + [batched.model]):
        diff, where = max_diff(a.state_dict(), b.state_dict())
        assert diff <= tol, f"{where} differs by {diff}"


@pytest.mark.parametrize("kind,workers,state", [("preact", 2, "reset"), ("preact", 3, "keep"),
                                                ("preact", 4, "reset"), ("preact", 8, "keep"),
                                                ("resnet", 3, "reset"), ("vgg", 4, "keep"), ("vgg", 8, "reset")])
def test_batched_equals_loop(one_thread, kind, workers, state):  # noqa: F811
    """In float64, where only the summation order differs (Adam amplifies rounding, e.g. on a conv bias before
    a BatchNorm, whose gradient is zero but for rounding: hence 1e-8, not 1e-12)."""
    loop, batched = _pair(kind, workers, state, opt="sgd" if state == "reset" else "adam", dtype=torch.float64)
    for t in range(5):  # across two syncs and into a third round
        batches = [(x.double(), y) for x, y in (batch(s, t) for s in range(workers))]
        la, lb = loop.step(batches, F.cross_entropy), batched.step(batches, F.cross_entropy)
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-12, atol=1e-12)
        _assert_same(loop, batched, 1e-8)
    loop.finalize()
    batched.finalize()
    _assert_same(loop, batched, 1e-8)
    assert max_diff(loop.model.state_dict(), _model(kind)[0].double().state_dict())[0] > 1e-3  # it trained


def test_batched_equals_loop_in_float32(one_thread):  # noqa: F811
    loop, batched = _pair("preact", 4, "reset")
    for t in range(3):
        batches = [batch(s, t) for s in range(4)]
        la, lb = loop.step(batches, F.cross_entropy), batched.step(batches, F.cross_entropy)
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    _assert_same(loop, batched, 1e-4)


def test_batched_with_grad_scalers(one_thread):  # noqa: F811
    """One GradScaler per worker, different scales: each worker's gradients get its own scale."""
    loop, batched = _pair("preact", 3, "reset")
    scalers = [[torch.amp.GradScaler("cpu", init_scale=2.0 ** (8 + s)) for s in range(3)] for _ in range(2)]
    for t in range(3):
        batches = [batch(s, t) for s in range(3)]
        la = loop.step(batches, F.cross_entropy, scalers[0])
        lb = batched.step(batches, F.cross_entropy, scalers[1])
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    assert [s.get_scale() for s in scalers[0]] == [s.get_scale() for s in scalers[1]]
    _assert_same(loop, batched, 1e-4)


def test_one_autocast_block_around_many_steps_trains_as_one_block_per_step(one_thread):  # noqa: F811
    """Autocast caches its casts of the weights until its block ends; the workers step those weights in place, so
    a block around several steps must not reuse the first step's casts. Logits come in one dtype in both forms."""
    runs = {}
    for form in ("one block", "a block per step"):
        loop, batched = _pair("preact", 2, "reset")
        seen = []

        def loss_fn(out, y):
            seen.append(out.dtype)
            return F.cross_entropy(out.float(), y)
        losses = []
        with contextlib.ExitStack() as outer:
            if form == "one block":
                outer.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            for t in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16) if form != "one block" else contextlib.nullcontext():
                    batches = [batch(s, t) for s in range(2)]
                    losses.append(loop.step(batches, loss_fn) + batched.step(batches, loss_fn))
        runs[form] = losses
        assert set(seen) == {torch.bfloat16}, seen  # the loop's and the batched network's logits alike
    assert runs["one block"] == runs["a block per step"]
    assert runs["one block"][2] != runs["one block"][0]  # it trains


def test_batched_under_autocast_is_as_close_to_float32_as_the_loop(one_thread):  # noqa: F811
    """bfloat16 convolutions round differently in one stacked launch than in S launches: the batched step's
    error against the float32 step is within twice the loop's (and a small floor)."""
    loop, batched = _pair("preact", 3, "reset")
    exact = _pair("preact", 3, "reset")[0]
    batches = [batch(s, 0) for s in range(3)]
    exact.step(batches, F.cross_entropy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, lb = loop.step(batches, F.cross_entropy), batched.step(batches, F.cross_entropy)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=2e-2, atol=2e-2)
    for e, a, b in zip(exact.worker_models, loop.worker_models, batched.worker_models):
        err_loop = max_diff(e.state_dict(), a.state_dict())[0]
        err_batched = max_diff(e.state_dict(), b.state_dict())[0]
        assert 0 < err_loop and err_batched <= 2 * err_loop + 1e-3, (err_batched, err_loop)


def test_batched_refuses_what_it_cannot_run():
    model, groups = _model("preact")
    model.layer1[0].bn1 = torch.nn.GroupNorm(1, model.layer1[0].bn1.num_features)
    with pytest.raises(ValueError, match="execution='batched' cannot run this model: module layer1.0.bn1 "
                                         r"\(GroupNorm\) is not a layer"):
        lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, execution="batched")
    with pytest.raises(ValueError, match="execution must be one of"):
        lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, execution="vmap")
    mobile = lk.mobilenet_v2(width=0.125)
    with pytest.raises(ValueError, match=r"module \(root\) \(MobileNetV2\): its forward code is not known to act "
                                         r"per worker \(the batched execution runs nn.Sequential and .*VGG"):
        lk.LoftSimulator(mobile, lk.find_filter_groups(mobile, torch.randn(2, 3, 8, 8)), OPTIMIZERS["sgd"], 2,
                         execution="batched")


def test_batched_step_is_all_or_nothing():
    loop, batched = _pair("preact", 2, "reset")
    before = copy.deepcopy(batched.state_dict())

    def bad_loss(out, y):
        if bad_loss.calls == 1:
            raise RuntimeError("loss failed on worker 1")
        bad_loss.calls += 1
        return F.cross_entropy(out, y)
    bad_loss.calls = 0
    with pytest.raises(RuntimeError, match="loss failed"):
        batched.step([batch(s, 0) for s in range(2)], bad_loss)
    after = batched.state_dict()
    for a, b in zip(before["worker_models"], after["worker_models"]):
        assert max_diff(a, b)[0] == 0
    assert all(p.grad is None for m in batched.worker_models for p in m.parameters())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from loft_kernels.training import execution_choice
    monkeypatch.setenv("LOFT_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(execution_choice, "_memory", {})
    return tmp_path / execution_choice.FILE


def _fake_measure(monkeypatch, faster):
    """Replace the timing by a counted fake: `faster(x_shape)` says which form wins."""
    from loft_kernels.training import execution_choice
    calls = []

    def measure(x, weights, biases, run_stacked, run_loop):
        calls.append(tuple(x.shape))
        win = faster(tuple(x.shape))
        return {win: 1.0, ("loop" if win == "stacked" else "stacked"): 2.0}
    monkeypatch.setattr(execution_choice, "measure_conv", measure)
    return calls


def test_auto_measures_each_shape_once_and_keeps_it_on_disk(one_thread, cache, monkeypatch):  # noqa: F811
    from loft_kernels.training import execution_choice
    calls = _fake_measure(monkeypatch, lambda shape: "stacked" if shape[2] >= 4 else "loop")
    loop = _pair("vgg", 2, "reset", dtype=torch.float64)[0]
    model, groups = _model("vgg")
    auto = lk.LoftSimulator(model.double(), groups, OPTIMIZERS["sgd"], 2, 2, execution="auto")
    auto.model.train()
    for t in range(3):
        batches = [(x.double(), y) for x, y in (batch(s, t) for s in range(2))]
        la, lb = loop.step(batches, F.cross_entropy), auto.step(batches, F.cross_entropy)
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-12, atol=1e-12)
    _assert_same(loop, auto, 1e-8)
    chosen = auto.execution_choices()
    assert set(chosen) == {"features.0", "features.4", "features.8"}
    stored = json.loads(cache.read_text())
    convs = {k: e for k, e in stored.items() if '"step"' not in k}
    assert len(calls) == len(convs) >= 1  # one measurement per distinct key, each stored
    assert len(stored) == len(convs) + 1  # and one of the whole step, batched against the loop
    assert all(e["choice"] in ("stacked", "loop") and set(e["ms"]) == {"stacked", "loop"} for e in stored.values())
    # a new process (empty memory) reads the file instead of measuring again
    monkeypatch.setattr(execution_choice, "_memory", {})
    again = lk.LoftSimulator(copy.deepcopy(_model("vgg")[0].double()), _model("vgg")[1], OPTIMIZERS["sgd"], 2,
                             execution="auto")
    again.step([(x.double(), y) for x, y in (batch(s, 0) for s in range(2))], F.cross_entropy)
    assert len(calls) == len(convs)


def test_auto_measures_a_channels_last_model_apart(one_thread, cache, monkeypatch):  # noqa: F811
    calls = _fake_measure(monkeypatch, lambda shape: "loop")
    for layout in (torch.contiguous_format, torch.channels_last, torch.channels_last):
        model, groups = _model("vgg")
        sim = lk.LoftSimulator(model.to(memory_format=layout), groups, OPTIMIZERS["sgd"], 2, execution="auto")
        sim.model.train()
        sim.step([(x.contiguous(memory_format=layout), y) for x, y in (batch(s, 0) for s in range(2))],
                 F.cross_entropy)
    stored = json.loads(cache.read_text())
    convs = [json.loads(k) for k in stored if '"step"' not in k]
    layouts = {k[-1][0] for k in convs}
    assert layouts == {"strided", "channels_last"}
    assert len(calls) == len(convs)  # measured once per layout: the third simulator read the second's entries
    assert sum(k[-1][1] == "channels_last" for k in convs) == sum(k[-1][1] == "strided" for k in convs) >= 1


def test_auto_runs_the_loop_where_the_whole_step_measured_it_faster(one_thread, cache, monkeypatch):  # noqa: F811
    """Every conv faster stacked, yet the batched network's whole step slower (its copies, its other layers):
    the loop runs."""
    from loft_kernels.training import execution_choice
    _fake_measure(monkeypatch, lambda shape: "stacked")
    monkeypatch.setattr(execution_choice, "measure_steps", lambda runs, device: {"stacked": 2.0, "loop": 1.0})
    model, groups = _model("vgg")
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, execution="auto")
    runs, real = [], sim._batched.forward_backward
    monkeypatch.setattr(sim._batched, "forward_backward", lambda *a: runs.append(a[1]) or real(*a))
    losses = sim.step([batch(s, 0) for s in range(2)], F.cross_entropy)
    assert len(runs) == 1 and runs[0] is not F.cross_entropy  # the untimed pass of the decision only
    assert len(losses) == 2


def test_auto_runs_the_loop_where_every_conv_measured_it_faster(one_thread, cache, monkeypatch):  # noqa: F811
    _fake_measure(monkeypatch, lambda shape: "loop")
    model, groups = _model("preact")
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, execution="auto")
    sim.step([batch(s, 0) for s in range(2)], F.cross_entropy)  # measures, runs batched once
    assert all(how == "loop" for layer in sim.execution_choices().values() for how in layer.values())

    def batched_again(*args):
        raise AssertionError("the batched network ran although every conv measured the loop faster")
    monkeypatch.setattr(sim._batched, "forward_backward", batched_again)
    sim.step([batch(s, 1) for s in range(2)], F.cross_entropy)


def test_auto_falls_back_to_the_loop_for_a_model_batched_cannot_run(cache):
    model, groups = _model("preact")
    model.layer1[0].bn1 = torch.nn.GroupNorm(1, model.layer1[0].bn1.num_features)
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, execution="auto")
    assert sim.execution_choices() == {}
    sim.step([batch(s, 0) for s in range(2)], F.cross_entropy)


def test_auto_with_real_measurements_equals_the_loop(one_thread, cache):  # noqa: F811
    loop, _ = _pair("preact", 2, "reset", dtype=torch.float64)
    model, groups = _model("preact")
    auto = lk.LoftSimulator(model.double(), groups, OPTIMIZERS["sgd"], 2, 2, execution="auto")
    auto.model.train()
    for t in range(2):
        batches = [(x.double(), y) for x, y in (batch(s, t) for s in range(2))]
        loop.step(batches, F.cross_entropy)
        auto.step(batches, F.cross_entropy)
    _assert_same(loop, auto, 1e-8)
    assert cache.exists()


def test_auto_is_the_default_and_checks_the_batched_network_against_the_loop(one_thread, cache,  # noqa: F811
                                                                              monkeypatch):
    """A batched network whose gradients are wrong (here: every worker's loss doubled) is never run: auto warns
    and trains with the loop, and the result equals the loop simulator's."""
    from loft_kernels.training import execution_choice
    _fake_measure(monkeypatch, lambda shape: "stacked")
    monkeypatch.setattr(execution_choice, "measure_steps", lambda runs, device: {"stacked": 1.0, "loop": 2.0})
    loop = _pair("vgg", 2, "reset", dtype=torch.float64)[0]
    model, groups = _model("vgg")
    auto = lk.LoftSimulator(model.double(), groups, OPTIMIZERS["sgd"], 2, 2)
    assert auto.execution == "auto"
    auto.model.train()
    real = auto._batched.forward_backward
    monkeypatch.setattr(auto._batched, "forward_backward",
                        lambda batches, loss_fn, *rest: real(batches, lambda o, y: 2 * loss_fn(o, y), *rest))
    batches = [(x.double(), y) for x, y in (batch(s, 0) for s in range(2))]
    with pytest.warns(RuntimeWarning, match="gradients differ from the loop's"):
        auto.step(batches, F.cross_entropy)
    loop.step(batches, F.cross_entropy)
    _assert_same(loop, auto, 1e-12)
    assert not json.loads(cache.read_text()) or all('"step"' not in k for k in json.loads(cache.read_text()))


def test_gradient_mismatch_against_hand_made_cases():
    from loft_kernels.training.execution_choice import gradient_mismatch
    g = [torch.tensor([3.0, -4.0]), None, torch.tensor([1e-9, -1e-9])]  # norms 5, -, ~1.4e-9
    assert gradient_mismatch([t if t is None else t.clone() for t in g], g, False) is None
    # rounding noise in a gradient that is itself noise (far below the model's largest) is no mismatch
    assert gradient_mismatch([g[0], None, torch.tensor([3e-9, 0.0])], g, False) is None
    assert gradient_mismatch([g[0] * 1.04, None, g[2]], g, False) is None  # float32: within 5 %
    assert "parameter 0 (2,): difference of norm 0.5" in gradient_mismatch([g[0] * 1.1, None, g[2]], g, False)
    assert gradient_mismatch([g[0] * 1.15, None, g[2]], g, True) is None  # autocast: within 20 %
    assert gradient_mismatch([g[0] * 2, None, g[2]], g, True) is not None  # a loss counted twice
    assert gradient_mismatch([g[0].flip(0), None, g[2]], g, True) is not None  # channels swapped
    assert "one execution only" in gradient_mismatch([g[0], torch.zeros(1), g[2]], g, False)
    assert gradient_mismatch([torch.tensor([float("nan"), -4.0]), None, g[2]], g, False) is not None
    d = [torch.tensor([3.0, -4.0], dtype=torch.float64)]
    assert gradient_mismatch([d[0] * (1 + 1e-7)], d, False) is None
    assert gradient_mismatch([d[0] * (1 + 1e-5)], d, False) is not None  # float64 is held to 1e-6


def test_auto_accepts_a_correct_batched_network_in_float32(one_thread, cache):  # noqa: F811
    """The check compares gradients that mean something. Behind a BatchNorm the gradients of `out.sum()` cancel
    to rounding noise, which made this correct float32 batched network look wrong (a PreActResNet-18 at width
    0.25, batch 32 per worker: the first conv's gradients then differed by 2x the tolerance)."""
    import warnings
    torch.manual_seed(0)
    model, groups = lk.convert(lk.preact_resnet18(num_classes=10, width=0.25), torch.randn(2, 3, 32, 32))
    auto = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], 2, execution="auto")
    auto.model.train()
    batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        auto.step(batches, F.cross_entropy)


@pytest.mark.parametrize("ms, rounds", [((1.0, 8.0), 1), ((4.0, 4.2), 3), ((6.0, (1.0, 14.0)), 3)])
def test_a_close_call_is_measured_longer(ms, rounds):
    """Forms far apart are decided after one round of repetitions; forms within 15 % get up to three rounds, and so
    do forms whose medians are far apart while their repetitions scatter across each other (a pair of durations
    alternates call by call)."""
    import itertools
    import time

    from loft_kernels.training import execution_choice
    calls = {"a": 0, "b": 0}

    def setup(name, seconds):
        durations = itertools.cycle(seconds if isinstance(seconds, tuple) else (seconds,))

        def make():
            def go():
                calls[name] += 1
                time.sleep(next(durations) / 1e3)
            return go
        return make
    medians = execution_choice._medians({"a": setup("a", ms[0]), "b": setup("b", ms[1])}, None, 5)
    assert calls == {"a": 5 * rounds + execution_choice.WARMUP, "b": 5 * rounds + execution_choice.WARMUP}
    if rounds == 1:
        assert min(medians, key=medians.get) == "a"
