"""Checkpoint mid-round, kill the process, resume: bit-identical to an uninterrupted run (CPU, deterministic).

The interrupted run is a subprocess that checkpoints before every step (lk.atomic_save)
and dies with os._exit halfway through a step in the middle of a round; the
resumed run loads the last checkpoint (lk.load_checkpoint, weights_only=True)
and finishes. Data order is a pure function of (worker, step). Both processes use
the torch kernel backend and one thread, so the arithmetic is the same.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loft_reference import MODELS, one_thread, train_with_checkpoints  # noqa: F401 (fixture)

import loft_kernels as lk

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("config", [
    dict(model="vgg", optimizer="adam", workers=3, sync_every=3, seed=4, state="keep", steps=8),
    dict(model="preact", optimizer="sgd", workers=4, sync_every=3, seed=4, state="reset", steps=8),
], ids=["vgg-adam-keep", "preact-sgd-reset"])
def test_kill_and_resume_is_bit_identical(config, tmp_path):
    ckpt = tmp_path / "run" / "loft.pt"
    crash_at = 4  # round 1, one step in: compact views, their state and the keep-mode shadows are mid-flight
    env = dict(os.environ, LOFT_KERNELS_BACKEND="torch", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in (env.get("PYTHONPATH"),) if p])
    proc = subprocess.run([sys.executable, str(HERE / "loft_reference.py"), "crash", str(ckpt), str(crash_at),
                           repr(config)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stdout.decode() + proc.stderr.decode()
    assert lk.load_checkpoint(ckpt)["step"] == crash_at
    assert [p.name for p in ckpt.parent.iterdir()] == ["loft.pt"]  # atomic writes leave no temp files

    with lk.use_backend("torch"):
        resumed = train_with_checkpoints(config, str(ckpt))
        uninterrupted = train_with_checkpoints(config, str(tmp_path / "fresh.pt"))
    assert resumed.round == uninterrupted.round == 3
    for (name, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for oa, ob in zip(uninterrupted.optimizers, resumed.optimizers):
        sa, sb = oa.state_dict(), ob.state_dict()
        assert sa["loft"]["round"] == sb["loft"]["round"] and sa["loft"]["comm"] == sb["loft"]["comm"]
        for (ka, va), (kb, vb) in zip(sa["state"].items(), sb["state"].items()):
            for key in va:
                assert torch.equal(va[key], vb[key]), (ka, key)
    # the run did train: the resumed model is far from the initial one
    initial, _ = MODELS[config["model"]]()
    moved = max((a - b).abs().max().item() for a, b in zip(initial.parameters(), resumed.model.parameters()))
    assert moved > 1e-3
