"""LoftOptimizer over real torch.distributed (gloo) processes against the simulator and the reference,
and a dead or silent rank turning into a clear error instead of a hang.

Each rank is a subprocess running tests/loft_reference.py (rendezvous through a
FileStore in tmp_path, so no port can clash). The ranks use the torch kernel
backend: these tests are about the sync, and N processes must not wait on a
C++ extension build.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loft_reference import MODELS, OPTIMIZERS, max_diff, one_thread, run_reference, run_simulator  # noqa: F401

import loft_kernels as lk

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.distributed,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]

HERE = Path(__file__).resolve().parent


def launch(world, config, tmp_path, wait_s=240):
    """Start `world` ranks; returns (return codes, per-rank results or None). Never leaves a process behind."""
    env = dict(os.environ, LOFT_KERNELS_BACKEND="torch", OMP_NUM_THREADS="1")
    # The repository root too: the ranks must import this checkout's package, not an installed copy.
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)] + [p for p in (env.get("PYTHONPATH"),) if p])
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "loft_reference.py"), str(r), str(world),
                               str(tmp_path / "rendezvous"), str(outs[r]), repr(config)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + wait_s
    logs = []
    try:
        for p in procs:
            if config.get("stall_at") is not None and p is procs[config.get("die_rank", world - 1)]:
                continue  # the silent rank sleeps on: the others' outcome is what matters
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out.decode(errors="replace")[-3000:])
    except subprocess.TimeoutExpired:
        pytest.fail(f"ranks did not finish within {wait_s} s (a hang): {logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    results = [lk.load_checkpoint(o) if o.exists() else None for o in outs]
    return codes, results, logs


@pytest.mark.parametrize("world,model_name,opt_name,state", [
    (2, "preact", "adam", "keep"),
    (4, "vgg", "sgd", "reset"),
])
def test_distributed_matches_simulator_and_reference(world, model_name, opt_name, state, tmp_path):
    config = dict(model=model_name, optimizer=opt_name, sync_every=3, seed=11, state=state, steps=8)
    codes, results, logs = launch(world, config, tmp_path)
    assert codes == [0] * world, logs
    model, groups = MODELS[model_name]()
    factory = OPTIMIZERS[opt_name]
    ref = run_reference(model, groups, factory, world, 3, 11, state, 8)
    sim_snaps, sim = run_simulator(model, groups, factory, world, 3, 11, state, 8)
    assert len(ref) == len(sim_snaps) == 3
    for r, res in enumerate(results):
        assert res["rank"] == r and res["error"] is None
        assert len(res["snapshots"]) == 3
        for i, snap in enumerate(res["snapshots"]):
            # every rank holds the same full model after a sync
            assert max_diff(snap, results[0]["snapshots"][i])[0] == 0.0
            for name, other in (("reference", ref[i]), ("simulator", sim_snaps[i])):
                diff, where = max_diff(snap, other)
                assert diff <= 1e-4, f"rank {r}, sync {i}: {where} differs from the {name} by {diff}"
        # rank r owned what simulated worker r owned, round after round
        for rnd, owned in enumerate(res["owned"]):
            parts = sim.partition(rnd)
            for name, idx in owned.items():
                assert torch.equal(idx, parts[name][r]), (r, rnd, name)
        assert res["comm"] == sim.comm_stats()
    one = lk.loft_sync_bytes(model, groups, world, state, state_per_param=2 if opt_name == "adam" else 1)
    assert results[0]["comm"]["bytes_sent"] == 3 * one["bytes_sent"]


@pytest.mark.parametrize("fault", ["die_at", "stall_at"])
def test_a_dead_or_silent_rank_makes_the_others_raise_within_the_timeout(fault, tmp_path):
    timeout = 6
    config = dict(model="vgg", optimizer="sgd", sync_every=3, seed=0, state="reset", steps=6,
                  die_rank=1, timeout=timeout, **{fault: 2})
    start = time.monotonic()
    codes, results, logs = launch(2, config, tmp_path, wait_s=120)
    assert codes[0] == 0, logs
    err = results[0]["error"]
    assert err is not None and "LoFT sync failed on rank 0 of 2" in err and "peer" in err
    # the collective at the first sync (step 3) failed, within the process group's timeout
    assert results[0]["elapsed"] <= timeout + 10
    if fault == "die_at":
        assert codes[1] == 3 and results[1] is None
    assert time.monotonic() - start < 120


# ------------------------------------------------ one configuration ----
@pytest.mark.parametrize("override,field", [
    ({"seed": 5}, "seed"), ({"sync_every": 4}, "sync_every"), ({"state": "keep"}, "state"),
    ({"width": 0.15}, "parameters"), ({"double": True}, "dtypes"), ({"drop_group": True}, "groups")],
    ids=["seed", "sync_every", "state", "width", "dtype", "group-set"])
def test_a_misconfigured_rank_makes_every_rank_raise(override, field, tmp_path):
    timeout = 20
    config = dict(model="preact", optimizer="sgd", sync_every=3, seed=0, state="reset", steps=4,
                  timeout=timeout, overrides={1: override})
    start = time.monotonic()
    codes, results, logs = launch(2, config, tmp_path, wait_s=120)
    assert codes == [0, 0], logs  # no abort, no hang
    for res in results:
        assert res["error"] is not None and "differs across ranks" in res["error"], res["error"]
        assert f"{field} differs" in res["error"] and "ranks [0]" in res["error"] and "ranks [1]" in res["error"]
        assert res["elapsed"] <= timeout
    assert time.monotonic() - start < 120


# ------------------------------------------------- mixed precision ----
def test_grad_scaler_and_autocast_over_gloo(tmp_path):
    from loft_reference import batch, loss_fn
    base = dict(model="preact", optimizer="sgd", sync_every=3, seed=0, state="reset", steps=7)
    runs = {}
    for name, extra in (("plain", {}), ("scaled", {"scaler": True}),
                        ("inf", {"scaler": True, "inf_at": [1, 4, "partitioned"]}),
                        ("bf16", {"autocast": "bfloat16", "cycle": 2, "steps": 12}),
                        ("fp32", {"cycle": 2, "steps": 12})):
        (tmp_path / name).mkdir()
        codes, results, logs = launch(2, {**base, **extra}, tmp_path / name)
        assert codes == [0, 0], logs
        assert all(r["error"] is None for r in results), [r["error"] for r in results]
        runs[name] = results
    # scaled (2^16, fp32) steps equal unscaled ones
    for a, b in zip(runs["plain"][0]["snapshots"], runs["scaled"][0]["snapshots"]):
        assert max_diff(a, b)[0] <= 1e-5
    # an inf on rank 1 at step 4 halves rank 1's scale only; the syncs stay on schedule, ranks agree
    inf = runs["inf"]
    assert inf[0]["scales"] == [2.0 ** 16] * 7
    assert inf[1]["scales"][:4] == [2.0 ** 16] * 4 and inf[1]["scales"][4:] == [2.0 ** 15] * 3
    assert len(inf[0]["snapshots"]) == len(inf[1]["snapshots"]) == 3
    for a, b in zip(*(r["snapshots"] for r in inf)):
        assert max_diff(a, b)[0] == 0.0
    # ... and equals the simulator in which worker 1 skips the same step
    model, groups = MODELS["preact"]()
    sim = lk.LoftSimulator(model, groups, OPTIMIZERS["sgd"], workers=2, sync_every=3, execution="loop")
    sim.model.train()
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) for _ in range(2)]
    for t in range(7):
        handle = None
        if t == 4:
            handle = sim.worker_models[1].get_parameter(f"{groups[0].conv_a}.weight").register_hook(
                lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
        sim.step([batch(s, t) for s in range(2)], loss_fn, scalers=scalers)
        if handle is not None:
            handle.remove()
    sim.finalize()
    assert max_diff(inf[0]["snapshots"][-1], sim.model.state_dict())[0] <= 1e-4
    # bf16 autocast trains like fp32: the loss falls, and by about as much
    for r in range(2):
        bf16, fp32 = runs["bf16"][r]["losses"], runs["fp32"][r]["losses"]
        assert sum(bf16[-2:]) < 0.8 * sum(bf16[:2]) and sum(fp32[-2:]) < 0.8 * sum(fp32[:2])
        assert abs(sum(bf16[-2:]) - sum(fp32[-2:])) / 2 < 0.15 * fp32[0]
