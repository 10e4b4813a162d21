"""The `loft` CLI end to end on tiny settings: every subcommand, resume after a kill, torchrun, bad input."""
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import loft_kernels as lk
from loft_kernels import engine, report
from loft_kernels.cli import main

torch.set_num_threads(1)
TINY = ["--dataset", "synthetic", "--model", "preact_resnet", "--width", "0.125", "--batch-size", "32"]
LOFT2 = ["--workers", "2", "--sync-every", "4", "--epochs", "2", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def rows_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pre"
    # The loop execution: what the distributed ranks compute. The batched network rounds differently, and over two
    # epochs a ReLU input that rounding moves across zero can grow that difference past the comparison's tolerance.
    assert main(["pretrain", *TINY, *LOFT2, "--execution", "loop", "--keep-epochs", "1", "--out", str(out),
                 "--quiet"]) == 0
    return out


# ------------------------------------------------------------------ help ----
@pytest.mark.parametrize("command", ["pretrain", "prune", "finetune", "distance", "run"])
def test_help_lists_common_options(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--seed", "--out", "--device", "--quiet"):
        assert opt in text


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["pretrain", "--epochs", "x"], ["prune", "--bogus"], ["run", "--bogus", "1"], ["nosuch"],
                                  ["bench", "--repeats", "x"], ["bench", "--cases", "P99"], ["run", "--seeds"]])
def test_usage_errors_are_one_line(argv):
    """argparse's own errors (bad types, unknown options) are one line like every other user error."""
    r = subprocess.run([sys.executable, "-m", "loft_kernels", *argv], capture_output=True, text=True, env=ENV)
    command = argv[0] if argv[0] != "nosuch" else ""
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"loft {command}".rstrip() + ": error: ") and "--help" in r.stderr, r.stderr


def test_an_unreadable_data_file_is_a_user_error(capsys, monkeypatch, tmp_path):
    import loft_kernels.data as data

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/train-images-idx3-ubyte")
    monkeypatch.setattr(data, "get_dataset", unreadable)
    rc, _, err = cli(capsys, "groups", "--dataset", "mnist", "--data-dir", tmp_path)
    assert rc == 2 and err == ("loft groups: error: --data-dir: '/data/train-images-idx3-ubyte': cannot be read "
                               "(Permission denied)\n")


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "loft_kernels", "--help"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and "pretrain" in r.stdout and "run" in r.stdout


def test_bench_forwards_every_argument(monkeypatch, capsys):
    import loft_kernels.benchmarks.runner as runner
    seen = []
    monkeypatch.setattr(runner, "main", lambda argv: seen.append(argv) or 7)
    assert main(["bench", "--quick", "--json", "x.json"]) == 7
    assert main(["bench", "--help"]) == 7
    assert seen == [["--quick", "--json", "x.json"], ["--help"]]


@pytest.mark.parametrize("option, target", [("--json", "{file}/r.json"), ("--json", "{tmp}"),
                                            ("--json", "/sys/r.json"), ("--results-dir", "{file}")])
def test_bench_refuses_an_unwritable_report_before_running(monkeypatch, capsys, tmp_path, option, target):
    import loft_kernels.benchmarks.runner as runner
    ran = []
    monkeypatch.setattr(runner, "run_cases", lambda *a, **k: ran.append(a) or [])
    (tmp_path / "file").write_text("")
    target = target.format(tmp=tmp_path, file=tmp_path / "file")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--cases", "P7", option, target])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not ran
    assert err.startswith(f"loft bench: error: {option} {target!r} cannot be written") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -------------------------------------------------------------- pretrain ----
def test_pretrain_writes_config_metrics_model(pretrained):
    cfg = json.loads((pretrained / "config.json").read_text())
    assert cfg["train"]["workers"] == 2 and cfg["train"]["method"] == "loft" and cfg["seed"] == 3
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics] == [1, 2]
    table = rows_csv(pretrained / "metrics.csv")
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in metrics]
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["method"] == "loft-2"
    # each of the 2 ranks sends the same bytes; the total counts both
    assert summary["comm_bytes_total"] == 2 * summary["comm"]["bytes_sent"] > 0
    assert summary["comm"]["bytes_sent"] == metrics[-1]["comm_bytes_sent"]
    model, groups, tracker = engine.load_pretrained(pretrained)
    assert tracker.tags == [0, 1, 2] and len(groups) == 8  # 0: the initial weights
    data = lk.get_dataset("synthetic", seed=3)
    assert engine.evaluate(model, data.test_x, data.test_y)["acc"] == pytest.approx(metrics[-1]["test_acc"])
    # the kept epoch and the initial weights are model files of the same architecture
    for name in ("epoch_001.pt", "init.pt"):
        engine.full_model(engine.load_model_file(pretrained / name))
    assert not (pretrained / "epoch_002.pt").exists()
    assert not list(pretrained.glob(".*.tmp"))


def test_stop_at_emergence_saves_epochs(capsys, tmp_path):
    # A threshold this loose fires as soon as the window of 2 distances (epochs 0-1, 1-2) is filled: epoch 2 of 4.
    rc, out, _ = cli(capsys, "pretrain", *TINY, "--epochs", "4", "--stop-at-emergence", "footrule",
                     "--footrule-threshold", "1000", "--footrule-window", "2", "--out", tmp_path / "s")
    assert rc == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["emerged_epoch"]["footrule"] == 2
    assert summary["epochs_run"] == 2 and summary["epochs_saved"] == 2 and summary["seconds_saved"] > 0
    assert len(json.loads((tmp_path / "s" / "metrics.json").read_text())) == 2
    assert "saved 2 epochs" in out


def test_distance_judges_on_the_runs_own_epoch_grid(capsys, tmp_path, pretrained):
    """A loft run unit of LoFT-S under --loft-budget updates is judged every S-th epoch; `loft distance` reads
    that grid from the run's summary (it judged every epoch and reported another emergence epoch)."""
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["emergence"]["every"] = 2
    (run / "summary.json").write_text(json.dumps(summary))
    loose = ["--footrule-threshold", "1000", "--footrule-window", "1"]  # fires at the first judged distance
    for every, epoch in ((None, 2), (1, 1)):
        extra = [] if every is None else ["--every", every]
        rc, out, _ = cli(capsys, "distance", "--run", run, *loose, *extra, "--out", tmp_path / f"d{every}")
        assert rc == 0 and f"footrule at epoch {epoch}" in out, out


def _footrule(a, b):
    """Plain LoFT footrule between two score vectors (rank 1 = highest score, ties to the lower index)."""
    n = len(a)
    order_a = sorted(range(n), key=lambda j: (-a[j], j))
    rank_b = {f: i + 1 for i, f in enumerate(sorted(range(n), key=lambda j: (-b[j], j)))}
    return sum(abs(math.log(i) - math.log(rank_b[f])) / i for i, f in enumerate(order_a, 1))


def test_distance(capsys, pretrained, tmp_path):
    rc, out, _ = cli(capsys, "distance", "--run", pretrained, "--out", tmp_path / "d")
    assert rc == 0
    rows = json.loads((tmp_path / "d" / "metrics.json").read_text())
    scores = torch.load(pretrained / "tracker.pt", weights_only=True)["scores"]  # per group [T, n]
    for t, r in enumerate(rows):
        want = sum(_footrule(s[t].tolist(), s[-1].tolist()) for s in scores)
        assert r["footrule_to_reference"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert rows[-1]["footrule_to_reference"] == 0.0 and rows[0]["footrule_to_previous"] is None
    d = json.loads((tmp_path / "d" / "distance.json").read_text())
    assert d["epochs"] == [0, 1, 2]
    assert len(d["footrule_matrix"]) == 8 and len(d["footrule_matrix"][0]) == 3
    assert (tmp_path / "d" / "footrule_to_final.png").is_file()
    assert len(list((tmp_path / "d").glob("footrule_heatmap_*.png"))) == 8


# ---------------------------------------------------------- prune, tune ----
def test_prune_keeps_top_norm_filters(capsys, pretrained, tmp_path):
    rc, out, _ = cli(capsys, "prune", "--checkpoint", pretrained, "--ratio", "0.8", "--speed-repeats", "2",
                     "--out", tmp_path / "p")
    assert rc == 0 and "ticket at ratio 0.8" in out
    obj = engine.load_model_file(tmp_path / "p" / "ticket.pt")
    full = engine.load_model_file(pretrained / "model.pt")
    for g in obj["groups"]:
        w = full["state_dict"][g["producer"] + ".weight"]
        norms = w.flatten(1).norm(dim=1)
        keep = g["n"] - math.floor(0.8 * g["n"])
        want = sorted(torch.argsort(norms, descending=True, stable=True)[:keep].tolist())
        assert obj["kept"][g["name"]].tolist() == want
        assert obj["state_dict"][g["producer"] + ".weight"].shape[0] == keep
        assert obj["state_dict"][g["consumer"] + ".weight"].shape[1] == keep
    m = json.loads((tmp_path / "p" / "metrics.json").read_text())[0]
    assert m["params_after"] < m["params_before"] and m["flops_after"] < m["flops_before"]
    assert m["inference_speedup"] > 0


def test_finetune_and_rewind(capsys, pretrained, tmp_path):
    assert cli(capsys, "prune", "--checkpoint", pretrained, "--ratio", "0.5", "--speed-repeats", "0",
               "--out", tmp_path / "p")[0] == 0
    rc, out, _ = cli(capsys, "finetune", "--ticket", tmp_path / "p", "--dataset", "synthetic", "--seed", "3",
                     "--epochs", "1", "--batch-size", "32", "--out", tmp_path / "f")
    assert rc == 0
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    tuned = engine.ticket_model(engine.load_model_file(tmp_path / "f" / "model.pt"))
    data = lk.get_dataset("synthetic", seed=3)
    assert engine.evaluate(tuned, data.test_x, data.test_y)["acc"] == pytest.approx(summary["test_acc"])
    assert len(rows_csv(tmp_path / "f" / "metrics.csv")) == 1

    # rewound to the initial weights: the first epoch starts from init.pt's weights cut by the same kept filters
    rc, _, _ = cli(capsys, "finetune", "--ticket", tmp_path / "p", "--rewind-from", pretrained / "init.pt",
                   "--dataset", "synthetic", "--seed", "3", "--epochs", "1", "--batch-size", "32",
                   "--out", tmp_path / "r")
    assert rc == 0
    rewound = json.loads((tmp_path / "r" / "metrics.json").read_text())[0]
    pruned_start = json.loads((tmp_path / "f" / "metrics.json").read_text())[0]
    assert rewound["train_loss"] > pruned_start["train_loss"]  # random init trains worse than a pretrained ticket
    assert json.loads((tmp_path / "r" / "config.json").read_text())["rewind_from"].endswith("init.pt")


# ------------------------------------------------------------------- run ----
def test_run_end_to_end(capsys, tmp_path):
    out = tmp_path / "job"
    rc, stdout, _ = cli(capsys, "run", *TINY, "--methods", "dense,loft-2", "--seeds", "1", "--epochs", "2",
                        "--finetune-epochs", "1", "--draw-at", "0,2", "--sync-every", "4", "--ratios", "0.5,0.8",
                        "--out", out, "--quiet")
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    report.validate_report(rep)
    assert rep["dataset"] == "synthetic" and rep["seeds"] == [0] and list(rep["methods"]) == ["dense", "loft-2"]
    for method in ("dense", "loft-2"):
        m = rep["methods"][method]
        unit = out / "units" / method / "seed0"
        pre = json.loads((unit / "pretrain" / "summary.json").read_text())
        assert m["no_prune"] == pytest.approx(pre["final"]["test_acc"])
        assert m["comm_bytes"] == (pre["comm_bytes_total"] or 0)
        for ratio in ("0.5", "0.8"):
            ft = json.loads((unit / f"ticket-{ratio}" / "summary.json").read_text())
            assert m["ticket"][ratio] == pytest.approx(ft["test_acc"])
        assert set(m["per_seed"]["0"]["drawn_at"]) == {"0", "2"}  # 0: drawn from the initial weights
    assert rep["methods"]["dense"]["comm_bytes"] == 0 and rep["methods"]["loft-2"]["comm_bytes"] > 0
    assert "| loft-2 |" in stdout and "| loft-2 |" in (out / "report.md").read_text()
    details = json.loads((out / "details.json").read_text())
    assert details["gpipe_bytes"]["loft-2"] > 0
    for name in ("footrule_to_final.png", "curves.png", "ticket_vs_epoch.png"):
        assert (out / name).is_file()
    assert len(list(out.glob("footrule_heatmap_*.png"))) == 8
    # a finished job resumes to the same report without training again
    before = (out / "report.json").read_text()
    rc, _, _ = cli(capsys, "run", *TINY, "--methods", "dense,loft-2", "--seeds", "1", "--epochs", "2",
                   "--finetune-epochs", "1", "--draw-at", "0,2", "--sync-every", "4", "--ratios", "0.5,0.8",
                   "--out", out, "--quiet", "--resume")
    assert rc == 0 and (out / "report.json").read_text() == before


# ---------------------------------------------------------------- resume ----
def _pretrain_cmd(out, epochs):
    return [sys.executable, "-m", "loft_kernels", "pretrain", *TINY, "--workers", "2", "--sync-every", "5",
            "--epochs", str(epochs), "--seed", "1", "--out", str(out), "--quiet"]


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    epochs = 4
    full = tmp_path / "full"
    subprocess.run(_pretrain_cmd(full, epochs), check=True, env=ENV, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_pretrain_cmd(killed, epochs), env=ENV)
    deadline = time.time() + 240
    while not any(killed.glob("checkpoints/step-*/rank0-of-1.pt")):  # the first epoch's checkpoint is on disk
        assert proc.poll() is None and time.time() < deadline, "pretraining ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the process finished before it could be killed"

    r = subprocess.run(_pretrain_cmd(killed, epochs) + ["--resume"], env=ENV, timeout=300, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    a = engine.load_model_file(full / "model.pt")["state_dict"]
    b = engine.load_model_file(killed / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(ma) == drop(mb)
    assert json.loads((full / "summary.json").read_text())["comm"] == \
        json.loads((killed / "summary.json").read_text())["comm"]


def test_torchrun_two_gloo_processes_match_the_simulation(pretrained, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loft_kernels", "pretrain", *TINY, *LOFT2, "--distributed", "--device", "cpu",
           "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, env=ENV, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    sim = engine.load_model_file(pretrained / "model.pt")["state_dict"]
    dist = engine.load_model_file(out / "model.pt")["state_dict"]
    for k in sim:
        assert torch.allclose(sim[k].double(), dist[k].double(), rtol=1e-4, atol=1e-5), k
    s_sim = json.loads((pretrained / "summary.json").read_text())
    s_dist = json.loads((out / "summary.json").read_text())
    assert s_dist["comm"] == s_sim["comm"] and s_dist["comm_bytes_total"] == s_sim["comm_bytes_total"]
    newest = sorted(out.glob("checkpoints/step-*"))[-1]  # one file per rank in each checkpoint set
    assert sorted(p.name for p in newest.iterdir()) == ["rank0-of-2.pt", "rank1-of-2.pt"]
    assert s_dist["resumes"] == [] and s_dist["torchrun_restarts"] == 0


def test_torchrun_ranks_with_different_settings_all_refuse(tmp_path):
    """Rank 1 trains at another lr (it would train apart silently) or another batch size (gloo would abort):
    every rank says so in one line and exits 2, before writing anything."""
    for flag, values in (("--lr", ("0.05", "0.1")), ("--batch-size", ("32", "16"))):
        out = tmp_path / flag.strip("-")
        loft = f"{sys.executable} -m loft_kernels pretrain {' '.join(TINY[:-2])} {' '.join(LOFT2)} --distributed " \
               f"--device cpu --out {out} --quiet"
        script = f'if [ "$RANK" = 0 ]; then exec {loft} {flag} {values[0]}; else exec {loft} {flag} {values[1]}; fi'
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
               "sh", "-c", script]
        r = subprocess.run(cmd, env=ENV, timeout=300, capture_output=True, text=True)
        assert r.returncode != 0
        said = "loft pretrain: error: --distributed: the run's settings must be the same on every rank: train differs"
        assert r.stderr.count(said) == 2, r.stderr[-3000:]  # one line from each rank
        assert "loft_kernels/" not in r.stderr  # no traceback of ours (torchrun prints its own summary)
        assert not out.exists()


# ------------------------------------------------------------- bad input ----
BAD = [
    (["pretrain", "--model", "resnet_nope"], "unknown model 'resnet_nope'"),
    (["pretrain", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["pretrain", "--dataset", "cifar10"], "needs --data-dir"),
    (["pretrain", "--dataset", "cifar10", "--data-dir", "{tmp}"], "data_batch_1"),
    (["pretrain", "--workers", "0"], "--workers must be >= 1"),
    (["pretrain", "--workers", "2", "--distributed"], "torchrun"),
    (["pretrain", "--workers", "2", "--distributed", "--device", "mps"], "only cpu and cuda devices are supported"),
    (["pretrain", "--epochs", "3", "--keep-epochs", "5"], "--keep-epochs must lie in 1..3"),
    (["pretrain", "--device", "tpu:0"], "--device"),
    (["pretrain", "--lr", "0"], "learning rate must be a finite number > 0"),
    (["prune", "--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["prune", "--checkpoint", "{pre}", "--ratio", "1.5"], r"--ratio must lie in \[0, 1\)"),
    (["prune", "--checkpoint", "{pre}", "--ratio", "-0.1"], r"--ratio must lie in \[0, 1\)"),
    (["prune", "--checkpoint", "{pre}/metrics.json"], "not a loft_kernels model file"),
    (["finetune", "--ticket", "{pre}/model.pt", "--dataset", "synthetic"], "not a ticket"),
    (["finetune", "--ticket", "{tmp}"], "ticket.pt"),
    (["distance", "--run", "{tmp}/nowhere"], "not a directory"),
    (["distance", "--run", "{tmp}"], "model.pt"),
    (["run", "--ratios", "0.5,1.2"], r"--ratios: 1\.2 is not a pruning ratio; give fractions in \(0, 1\)"),
    (["run", "--ratios", "50,100"], r"--ratios: 100 is not a pruning ratio"),
    (["run", "--ratios", "0,0.5"], r"--ratios: 0 is not a pruning ratio"),
    (["run", "--ratios", "0.5,x"], "--ratios must be a comma-separated list of numbers"),
    (["run", "--controls", "random"], "'random' is not a control"),
    (["run", "--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["run", "--finetune-weight-decay", "-0.1"], "--finetune-weight-decay must be >= 0"),
    (["run", "--methods", "dense,loft-1"], "'loft-1' is not a method"),
    (["run", "--methods", "dense,gpipe"], "'gpipe' is not a method"),
    (["run", "--epochs", "2", "--draw-at", "1,9"], r"--draw-at epochs must lie in 0\.\.2"),
    (["run", "--model", "preact_resnet", "--width", "0.0625", "--methods", "loft-8"], "fewer filters than 8"),
    (["pretrain", "--workers", "100"], "--workers 100: 6 filter groups have fewer filters than 100 workers .*the "
                                       "smallest is 'layer1.0.conv1' with 16 filters: use at most 16 workers"),
    (["pretrain", "--model", "preact_resnet", "--width", "0.0625", "--workers", "9", "--exclude", "layer1.*,layer2.1.*"],
     "--workers 9: 1 filter group has fewer filters than 9 workers .*'layer2.0.conv1' with 8 filters: use at most 8 "
     "workers, a larger --width, or --exclude that group"),
    (["pretrain", "--width", "1e12"], r"--width 1e\+12: preact_resnet18 would have tensors too large to represent"),
    (["pretrain", "--width", "1e4"], r"--width 10000: preact_resnet18 would have [\d,]+ parameters \([\d,.]+ GiB\), "
                                     r"more than the [\d,.]+ GiB of memory"),
    (["run", "--width", "1e4"], "--width 10000: vgg would have"),
    (["pretrain", "--model", "wide_resnet", "--width", "0.25", "--workers", "2", "--execution", "batched"],
     "--execution batched cannot run --model wide_resnet: module .*dropout"),
    (["pretrain", "--out", "{pre}/config.json/sub"], "--out .* which is a file"),
    (["pretrain", "--out", "/sys/loft_kernels_out"], "--out '/sys/loft_kernels_out' cannot be created"),
    (["prune", "--checkpoint", "{tmp}/junk.pt"], "--checkpoint: .*junk.pt.* is not a loft_kernels model file"),
    (["prune", "--checkpoint", "{tmp}/cut.pt"], "--checkpoint: .*cut.pt.* is not a loft_kernels model file"),
    (["finetune", "--ticket", "{tmp}/cut.pt"], "--ticket: .*cut.pt.* is not a loft_kernels model file"),
    (["run", "--ratios", "0.4999999,0.5"], "--ratios: 0.4999999 and 0.5 are both ratio 0.5"),
    (["run", *TINY, "--train-samples", "3", "--methods", "loft-4"],
     "--methods loft-4: 4 workers need at least as many training images; --dataset synthetic has 3"),
    (["run", "--seeds", "100000000000"], "--seeds must be <= 10000"),
    (["pretrain", "--dataset", "digits", "--data-dir", "{tmp}"], "--data-dir: data_dir does not apply to dataset "
                                                                "'digits' \\(it is embedded in scikit-learn\\)"),
    (["run", "--epochs", "10000000000", "--draw-at", "auto"], "--epochs must be <= 100000"),
    (["pretrain", "--model", "vgg11", "--dataset", "synthetic"],
     "--model vgg11 cannot run on --dataset synthetic's 1x8x8 images \\(Given input size"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[f"{a[0]}-{m[:20]}" for a, m in BAD])
def test_bad_input_fails_cleanly(capsys, tmp_path, pretrained, argv, message):
    out = tmp_path / "out"
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    whole = (pretrained / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # a truncated model file
    argv = [a.format(tmp=tmp_path, pre=pretrained) for a in argv]
    if "--out" not in argv:
        argv += ["--out", out]
    rc, _, err = cli(capsys, *argv)
    assert rc == 2
    assert err.startswith(f"loft {argv[0]}: error:") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists()  # nothing half-written


def test_model_files_of_the_wrong_kind_or_that_do_not_fit_are_user_errors(capsys, tmp_path, pretrained):
    assert cli(capsys, "prune", "--checkpoint", pretrained, "--ratio", "0.5", "--speed-repeats", "0",
               "--out", tmp_path / "p", "--quiet")[0] == 0
    ticket = torch.load(tmp_path / "p" / "ticket.pt", weights_only=False)
    fake_run = tmp_path / "fake_run"  # a pretraining directory whose model.pt is a ticket (a fine-tuned one is)
    fake_run.mkdir()
    shutil.copy(tmp_path / "p" / "ticket.pt", fake_run / "model.pt")
    shutil.copy(pretrained / "tracker.pt", fake_run / "tracker.pt")
    tampered = dict(ticket, kept={k: v[:-1] for k, v in ticket["kept"].items()})
    torch.save(tampered, tmp_path / "tampered.pt")
    resized = dict(ticket, spec=dict(ticket["spec"], input_shape=[ticket["spec"]["input_shape"][0], 16, 16]))
    torch.save(resized, tmp_path / "resized.pt")
    tune = ["--dataset", "synthetic", "--epochs", "1"]
    for argv, message in [
        (["prune", "--checkpoint", tmp_path / "p" / "ticket.pt"], "--checkpoint .*ticket.pt.* is a ticket"),
        (["distance", "--run", fake_run], "--run: .*model.pt.* is a ticket"),
        (["finetune", "--ticket", tmp_path / "p", "--rewind-from", tmp_path / "p" / "ticket.pt", *tune],
         "--rewind-from .*ticket.pt.* is a ticket"),
        (["finetune", "--ticket", tmp_path / "tampered.pt", *tune],
         "--ticket .*tampered.pt.*: its spec, filter groups and weights do not fit together"),
        (["finetune", "--ticket", tmp_path / "resized.pt", *tune],
         "--dataset synthetic has 8x8 images, the ticket was drawn from a model trained on 16x16 ones"),
        (["prune", "--checkpoint", pretrained, "--out", tmp_path / "p"], "already holds a run .*choose another"),
    ]:
        argv = [str(a) for a in argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "out")])
        rc, _, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and re.search(message, err), (argv, err)
        assert "--resume" not in err and not (tmp_path / "out").exists()


def test_resume_refuses_a_config_that_is_not_a_json_object(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("[1, 2]")
    rc, _, err = cli(capsys, "pretrain", *TINY, "--epochs", "1", "--out", out, "--resume")
    assert rc == 2 and "holds a JSON list, not the dict" in err, err


def test_workers_check_counts_a_grouped_groups_conv_blocks():
    # 32 filters in 8 conv groups of 4: every worker needs a filter of every conv group, so at most 4 workers
    from loft_kernels.cli._common import CLIError, check_workers_fit
    from loft_kernels.filter_group import FilterGroup, check_group_list
    grouped = FilterGroup("grouped", "a", (), "b", 32, conv_groups=8)
    plain = FilterGroup("plain", "c", (), "d", 16)
    check_workers_fit([grouped, plain], 4, "--workers")
    with pytest.raises(CLIError, match=r"'grouped' with 32 filters in 8 conv groups of 4: use at most 4 workers"):
        check_workers_fit([grouped, plain], 5, "--workers")
    with pytest.raises(ValueError, match="fewer filters than workers=5"):  # the library's rule agrees
        check_group_list([grouped, plain], 5)


def test_a_refused_run_leaves_an_existing_out_untouched(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "pretrain", *TINY, "--workers", "64", "--epochs", "1", "--out", out)
    assert rc == 2 and err.count("\n") == 1 and "--workers 64" in err, err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_memory_failures_while_loading_are_user_errors(monkeypatch, capsys, tmp_path):
    import loft_kernels.data as data

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(data, "get_dataset", no_memory)
    rc, _, err = cli(capsys, "pretrain", *TINY, "--out", tmp_path / "a")
    assert rc == 2 and err == "loft pretrain: error: --dataset synthetic: the data do not fit in this machine's " \
                              "memory\n", err
    monkeypatch.undo()

    def no_room(spec):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.\nmore")

    monkeypatch.setattr(engine, "build_model", no_room)
    rc, _, err = cli(capsys, "pretrain", *TINY, "--out", tmp_path / "b")
    assert rc == 2 and err.count("\n") == 1 and "--width 0.125: preact_resnet does not fit in the memory available "\
                                                "(RuntimeError: DefaultCPUAllocator: can't allocate memory" in err, err
    monkeypatch.setattr(engine, "build_model", lambda spec: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["pretrain", *TINY, "--out", str(tmp_path / "c")])
    assert not any(tmp_path.iterdir())


def test_existing_run_needs_resume_and_same_settings(capsys, pretrained):
    before = {p.name: p.stat().st_mtime_ns for p in pretrained.iterdir()}
    rc, _, err = cli(capsys, "pretrain", *TINY, *LOFT2, "--out", pretrained)
    assert rc == 2 and "already holds a run" in err
    rc, _, err = cli(capsys, "pretrain", *TINY, "--workers", "2", "--epochs", "3", "--out", pretrained, "--resume")
    assert rc == 2 and "differ" in err and "train" in err
    assert {p.name: p.stat().st_mtime_ns for p in pretrained.iterdir()} == before
    rc, _, err = cli(capsys, "pretrain", *TINY, "--out", Path(pretrained).parent / "fresh", "--resume")
    assert rc == 2 and "no run to resume" in err


def test_resume_may_change_the_memory_format_and_takes_runs_from_before_it(capsys, pretrained, tmp_path):
    copy = tmp_path / "pre"
    shutil.copytree(pretrained, copy)
    cfg = json.loads((copy / "config.json").read_text())
    assert cfg["train"]["memory_format"] == "auto"
    rc, _, err = cli(capsys, "pretrain", *TINY, *LOFT2, "--execution", "loop", "--keep-epochs", "1",
                     "--memory-format", "contiguous", "--out", copy, "--resume", "--quiet")
    assert rc == 0, err
    del cfg["train"]["memory_format"]  # a run written before the option existed
    (copy / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli(capsys, "pretrain", *TINY, *LOFT2, "--execution", "loop", "--keep-epochs", "1",
                     "--out", copy, "--resume", "--quiet")
    assert rc == 0, err


BAD_VALUES = [
    (["pretrain", "--seed", "-1"], "argument --seed: must lie in 0..2\\*\\*63-1, got -1"),
    (["pretrain", "--seed", str(2 ** 70)], "argument --seed: must lie in 0..2\\*\\*63-1"),
    (["pretrain", "--width", "inf"], "argument --width: must be a finite number, got 'inf'"),
    (["pretrain", "--lr", "nan"], "argument --lr: must be a finite number"),
    (["prune", "--checkpoint", "x", "--ratio", "inf"], "argument --ratio: must be a finite number"),
]


@pytest.mark.parametrize("argv, message", BAD_VALUES, ids=[" ".join(a[1:3]) for a, _ in BAD_VALUES])
def test_bad_values_name_the_option(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_largest_seed_is_accepted(capsys, tmp_path):
    rc, _, err = cli(capsys, "pretrain", *TINY, "--epochs", "1", "--seed", str(2 ** 63 - 1),
                     "--out", tmp_path / "o", "--quiet")
    assert rc == 0, err


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(engine, "pretrain_run", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["pretrain", *TINY, "--epochs", "1", "--out", str(tmp_path / "o"), "--quiet"])


def test_resume_from_a_truncated_checkpoint_is_a_user_error(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli(capsys, "pretrain", *TINY, "--epochs", "2", "--out", out, "--quiet")[0] == 0
    (out / "summary.json").unlink()  # as if killed before the end
    ckpts = sorted(out.glob("checkpoints/*/rank0-of-1.pt"))
    assert len(ckpts) == 2  # the newest two sets are kept
    for ck in ckpts:
        ck.write_bytes(ck.read_bytes()[:100])
    rc, _, err = cli(capsys, "pretrain", *TINY, "--epochs", "2", "--out", out, "--quiet", "--resume")
    assert rc == 2 and err.count("\n") == 1, err
    assert str(ckpts[-1]) in err and "cannot be loaded" in err


def test_resume_from_a_checkpoint_of_another_program_is_a_user_error(capsys, tmp_path):
    """A file in the right format that does not hold a training run's state (here: what ElasticCheckpoint itself
    writes for a user's own loop) is refused in one line, not with a KeyError."""
    out = tmp_path / "run"
    assert cli(capsys, "pretrain", *TINY, "--epochs", "1", "--out", out, "--quiet")[0] == 0
    (out / "summary.json").unlink()
    for ck in out.glob("checkpoints/*/rank0-of-1.pt"):
        state = torch.load(ck, weights_only=True)
        state["state"] = {"model": {}, "optimizer": {}}
        torch.save(state, ck)
    rc, _, err = cli(capsys, "pretrain", *TINY, "--epochs", "1", "--out", out, "--quiet", "--resume")
    assert rc == 2 and err.count("\n") == 1, err
    assert "is not a checkpoint of a loft_kernels training run: it has no 'trainer'" in err, err


def test_a_diverging_pretraining_is_one_line(capsys, tmp_path):
    rc, _, err = cli(capsys, "pretrain", *TINY, "--epochs", "1", "--lr", "1e12", "--out", tmp_path / "o", "--quiet")
    assert rc == 2 and err.count("\n") == 1, err
    assert "snapshot 1: the weights of group" in err and "the training diverged" in err


def test_a_diverging_fine_tuning_is_one_line(capsys, tmp_path, pretrained):
    """A NaN fine-tuning loss was reported as a ticket at chance accuracy, exit 0, with a bare NaN in its JSON."""
    assert cli(capsys, "prune", "--checkpoint", pretrained, "--ratio", "0.5", "--speed-repeats", "0",
               "--out", tmp_path / "p", "--quiet")[0] == 0
    rc, _, err = cli(capsys, "finetune", "--ticket", tmp_path / "p", "--dataset", "synthetic", "--epochs", "1",
                     "--lr", "1e12", "--batch-size", "32", "--out", tmp_path / "f", "--quiet")
    assert rc == 2 and err.count("\n") == 1, err
    assert "fine-tuning epoch 1: the training loss is nan" in err and not (tmp_path / "f" / "summary.json").exists()


def test_missing_optional_dependency_names_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    rc, _, err = cli(capsys, "pretrain", "--dataset", "digits", "--epochs", "1", "--out", tmp_path / "o")
    assert rc == 2 and err.count("\n") == 1, err
    assert "scikit-learn" in err and "pip install 'loft_kernels[digits]'" in err
    assert not (tmp_path / "o").exists()


def test_resume_with_more_seeds_extends_a_run_and_fewer_are_refused(capsys, tmp_path):
    """`loft run --resume --seeds N` reuses the finished seeds' units and adds the new ones: the report equals that
    of a run started with N seeds; dropping a seed or changing --seed is refused."""
    args = [*TINY, "--methods", "dense", "--epochs", "1", "--finetune-epochs", "1", "--ratios", "0.5",
            "--controls", "none", "--quiet"]
    assert cli(capsys, "run", *args, "--seeds", "1", "--out", tmp_path / "grown")[0] == 0
    assert cli(capsys, "run", *args, "--seeds", "2", "--out", tmp_path / "grown", "--resume")[0] == 0
    assert cli(capsys, "run", *args, "--seeds", "2", "--out", tmp_path / "fresh")[0] == 0
    grown, fresh = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("grown", "fresh"))
    assert grown["seeds"] == fresh["seeds"] == [0, 1]
    assert grown["methods"] == fresh["methods"]
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["seeds"] == [0, 1]
    for more in (["--seeds", "1"], ["--seeds", "2", "--seed", "1"]):
        rc, _, err = cli(capsys, "run", *args, *more, "--out", tmp_path / "grown", "--resume")
        assert rc == 2 and "has seeds [0, 1]" in err and "more seeds extend the run" in err, err
