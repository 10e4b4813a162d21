"""LoFT training on the new group kinds (depthwise members, Linear producers/consumers): the plain reference
(tests/loft_reference.py, physically sliced sub-models) == LoftSimulator == 2 gloo processes after every sync,
and S = 1 == plain training with the wrapped optimizer."""

import pytest
import torch
from loft_reference import (  # noqa: F401 (one_thread: fixture)
    MODELS,
    OPTIMIZERS,
    assert_simulator_matches_reference,
    batch,
    loss_fn,
    max_diff,
    one_thread,
    run_plain,
    run_reference,
    run_simulator,
)
from test_distributed import launch

import loft_kernels as lk

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ["mobilenet", "convnext"]  # depthwise members / Linear groups


def test_the_kinds_are_what_these_tests_exercise():
    _, groups = MODELS["mobilenet"]()
    assert groups and all([m.kind for m in g.members] == ["batchnorm", "depthwise", "batchnorm"] for g in groups)
    model, groups = MODELS["convnext"]()
    assert groups and all(isinstance(model.get_submodule(g.producer), lk.LoftLinear) and
                          isinstance(model.get_submodule(g.consumer), lk.LoftLinear) for g in groups)


@pytest.mark.parametrize("model_name", KINDS)
@pytest.mark.parametrize("opt_name,workers,state", [("sgd", 3, "reset"), ("adam", 2, "keep")])
def test_simulator_matches_reference(model_name, opt_name, workers, state):
    model, groups = MODELS[model_name]()
    steps, k, seed = 5, 2, 3  # rounds of 2, 2 and a partial 1 closed by finalize()
    assert_simulator_matches_reference(model, groups, OPTIMIZERS[opt_name], workers, k, seed, state, steps)


@pytest.mark.parametrize("model_name", KINDS)
def test_one_worker_is_plain_training(model_name):
    model, groups = MODELS[model_name]()
    sim_snaps, sim = run_simulator(model, groups, OPTIMIZERS["sgd"], 1, 2, 0, "keep", 4)
    diff, where = max_diff(sim_snaps[-1], run_plain(model, groups, OPTIMIZERS["sgd"], 4))
    assert diff <= 1e-5, f"{where} differs by {diff}"


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("model_name", KINDS + ["efficientnet_se", "regnet_y"])  # + SE gates, grouped convs
def test_two_gloo_processes_match_simulator_and_reference(model_name, tmp_path):
    config = dict(model=model_name, optimizer="sgd", sync_every=2, seed=5, state="keep", steps=5)
    codes, results, logs = launch(2, config, tmp_path)
    assert codes == [0, 0], logs
    model, groups = MODELS[model_name]()
    ref = run_reference(model, groups, OPTIMIZERS["sgd"], 2, 2, 5, "keep", 5)
    sim_snaps, _ = run_simulator(model, groups, OPTIMIZERS["sgd"], 2, 2, 5, "keep", 5)
    for r, res in enumerate(results):
        assert res["error"] is None and len(res["snapshots"]) == 3
        for i, snap in enumerate(res["snapshots"]):
            for name, other in (("reference", ref[i]), ("simulator", sim_snaps[i])):
                diff, where = max_diff(snap, other)
                assert diff <= 1e-4, f"rank {r}, sync {i}: {where} differs from the {name} by {diff}"
