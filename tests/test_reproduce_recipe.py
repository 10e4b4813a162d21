"""python/reproduce_cifar.py runs a few steps on a tiny generated CIFAR-format directory."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loft_kernels as lk

torch.set_num_threads(1)  # tiny models: a second thread only adds contention on the shared CI cores
RECIPE = Path(__file__).resolve().parents[1] / "python" / "reproduce_cifar.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The recipe runs as a script (sys.path[0] = python/): make it import this checkout, not another installed copy.
ENV["PYTHONPATH"] = os.pathsep.join([str(RECIPE.parents[1])] + [p for p in (ENV.get("PYTHONPATH"),) if p])
SMALL = ["--width", "0.0625", "--epochs", "2", "--finetune-epochs", "1", "--max-steps", "2", "--batch-size", "8",
         "--device", "cpu"]


def check_results(out: Path, method: str, workers: int):
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and res["workers"] == workers
    assert set(res["ticket"]) == {"0.5", "0.8"} and all(0 <= v <= 100 for v in res["ticket"].values())
    pre = json.loads((out / "pretrain" / "summary.json").read_text())
    assert pre["epochs_run"] == 2 and pre["samples_per_epoch"] == 2 * 8 * workers  # 2 capped steps per epoch
    assert len(json.loads((out / "pretrain" / "metrics.json").read_text())) == 2
    assert res["comm_bytes"] == pre["comm_bytes_total"] > 0
    assert res["gpipe_comm_bytes"] > 0
    assert res["improvement"] == pytest.approx(res["gpipe_comm_bytes"] / res["comm_bytes"])
    assert "| " + method + " |" in (out / "results.md").read_text()
    return res, pre


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return lk.write_fake_cifar(tmp_path_factory.mktemp("c10"), n_train=40, n_test=20, num_classes=10)


def test_recipe_simulated_workers_in_process(tmp_path, cifar10, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "sim"
    monkeypatch.setattr(sys, "argv", [str(RECIPE), "--dataset", "cifar10", "--data-dir", str(cifar10),
                                      "--model", "preact_resnet34", "--workers", "2", *SMALL, "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(RECIPE), run_name="__main__")
    assert e.value.code == 0
    _, pre = check_results(out, "loft-2", 2)
    # the paper's policy: groups only in blocks >= 1 of stages 2-4
    assert pre["groups"] and all(g.split(".")[0] in ("layer2", "layer3", "layer4") and g.split(".")[1] != "0"
                                 for g in pre["groups"])


def test_recipe_under_torchrun_cifar100(tmp_path):
    data = lk.write_fake_cifar(tmp_path / "c100", n_train=40, n_test=20, num_classes=100)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE),
           "--dataset", "cifar100", "--data-dir", str(data), "--model", "resnet34", *SMALL, "--out", str(out)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check_results(out, "loft-2", 2)


def test_recipe_missing_data_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(RECIPE), "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")],
                       env={**ENV, "WORLD_SIZE": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "data_batch_1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
