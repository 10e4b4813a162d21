"""loft_kernels.report: report.json schema and aggregation, the paper-shaped table, the plots."""
import json

import numpy as np
import pytest
import torch

from loft_kernels import report


def seed_result(no_prune, t5, t8, comm=1000, foot=3, mask=None, **extra):
    return {"no_prune": no_prune, "ticket": {"0.5": t5, "0.8": t8}, "comm_bytes": comm,
            "emerged_epoch": {"footrule": foot, "mask": mask}, **extra}


@pytest.fixture
def results():
    return {
        "dense": {0: seed_result(90.0, 91.0, 89.0, comm=0, foot=4, mask=5),
                  1: seed_result(92.0, 93.0, 87.0, comm=0, foot=2, mask=7),
                  2: seed_result(94.0, 92.0, 88.0, comm=0, foot=6, mask=6)},
        "loft-2": {0: seed_result(80.0, 90.0, 86.0, comm=100, foot=3, mask=None),
                   1: seed_result(81.0, 90.5, 86.5, comm=100, foot=5, mask=4),
                   2: seed_result(82.0, 91.0, 87.0, comm=103, foot=1, mask=4)},
    }


def test_build_report_means_and_schema(results):
    rep = report.build_report("digits", [0, 1, 2], results)
    assert set(rep) == {"dataset", "seeds", "methods"}
    assert rep["dataset"] == "digits" and rep["seeds"] == [0, 1, 2]
    d = rep["methods"]["dense"]
    assert set(d) == {"no_prune", "ticket", "per_seed", "comm_bytes", "emerged_epoch"}
    assert d["no_prune"] == pytest.approx(92.0)
    assert d["ticket"] == {"0.5": pytest.approx(92.0), "0.8": pytest.approx(88.0)}
    assert d["comm_bytes"] == 0
    # median of (4, 2, 6) and (5, 7, 6)
    assert d["emerged_epoch"] == {"footrule": 4, "mask": 6}
    l2 = rep["methods"]["loft-2"]
    assert l2["comm_bytes"] == 101  # round(mean(100, 100, 103))
    assert l2["emerged_epoch"] == {"footrule": 3, "mask": None}  # mask never fired for seed 0
    assert l2["per_seed"]["0"]["emerged_epoch"]["mask"] is None
    assert list(l2["per_seed"]) == ["0", "1", "2"]
    json.dumps(rep)  # plain JSON
    # an even number of seeds: the lower of the two middle epochs, an epoch at which some seed's criterion fired
    two = report.build_report("digits", [0, 1], {"dense": {0: results["dense"][0], 1: results["dense"][1]}})
    assert two["methods"]["dense"]["emerged_epoch"] == {"footrule": 2, "mask": 5}


def test_one_seed_has_no_spread_and_beats_no_control(results):
    controls = {"initial-weights": {0: {"ticket": {"0.5": 80.0, "0.8": 70.0}}}}
    rep = report.build_report("digits", [0], {m: {0: per[0]} for m, per in results.items()}, controls)
    assert report.spread([91.0]) is None and report.spread([1.0, 3.0]) == pytest.approx(2 ** 0.5)
    beat = rep["discrimination"]["per_ratio"]["0.8"]["controls"]["initial-weights"]
    assert beat["margin"] == pytest.approx(19.0) and beat["spread"] is None and not beat["beaten"]
    assert "| dense | 91.00 | 89.00 |" in report.format_ratio_table(rep)
    assert any("not beaten (one seed: no spread" in line for line in report.format_discrimination(rep["discrimination"]))


def test_extra_per_seed_fields_are_kept(results):
    results["dense"][0]["drawn_at"] = {"1": 50.0}
    rep = report.build_report("digits", [0, 1, 2], results)
    assert rep["methods"]["dense"]["per_seed"]["0"]["drawn_at"] == {"1": 50.0}


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["dense"][0].pop("no_prune"), "missing"),
    (lambda r: r["dense"][0].update(no_prune=120.0), r"no_prune.*\[0, 100\]"),
    (lambda r: r["dense"][0].update(comm_bytes=-1), "comm_bytes"),
    (lambda r: r["dense"][0]["ticket"].pop("0.8"), "ticket"),
    (lambda r: r["dense"][0]["emerged_epoch"].update(footrule=1.5), "footrule"),
    (lambda r: r["dense"].pop(2), "seeds"),
])
def test_build_report_rejects_bad_results(results, mutate, match):
    mutate(results)
    with pytest.raises((ValueError, TypeError), match=match):
        report.build_report("digits", [0, 1, 2], results)


def test_validate_report_rejects_extra_keys(results):
    rep = report.build_report("digits", [0, 1, 2], results)
    rep["extra"] = 1
    with pytest.raises(ValueError, match="exactly the keys"):
        report.validate_report(rep)
    del rep["extra"]
    rep["methods"]["dense"]["gpipe"] = 3
    with pytest.raises(ValueError, match="exactly the keys"):
        report.validate_report(rep)


def test_table_orders_ratios_like_the_paper_and_computes_improvement(results):
    rep = report.build_report("digits", [0, 1, 2], results)
    table = report.format_table(rep, {"dense": None, "loft-2": 505})
    lines = table.strip().splitlines()
    assert lines[0].index("ticket 80 %") < lines[0].index("ticket 50 %")
    dense_row = [c.strip() for c in lines[2].strip("|").split("|")]
    loft_row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert dense_row[:4] == ["dense", "92.00", "88.00", "92.00"]
    assert loft_row[0] == "loft-2" and loft_row[1] == "81.00"
    assert loft_row[4] == "101 B" and loft_row[5] == "505 B"
    assert loft_row[6] == "5.00x"  # 505 / 101
    assert dense_row[6] == "n/a"
    assert loft_row[7] == "epoch 3" and loft_row[8] == "not fired"


def test_write_report_files(tmp_path, results):
    rep = report.build_report("digits", [0, 1, 2], results)
    report.write_report(tmp_path, rep, {"gpipe_bytes": {"loft-2": 505}, "notes": ["a note"]})
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(rep))
    md = (tmp_path / "report.md").read_text()
    assert "| loft-2 |" in md and "a note" in md and "5.00x" in md
    assert json.loads((tmp_path / "details.json").read_text())["gpipe_bytes"] == {"loft-2": 505}
    assert not list(tmp_path.glob(".*tmp*"))


def test_method_workers():
    assert report.method_workers("dense") == 1
    assert report.method_workers("loft-4") == 4


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    p = report.plot_lines({"dense": [3.0, 1.0, 0.0], "loft-2": [4.0, 2.0, 0.0]}, tmp_path / "f.png",
                          title="t", xlabel="epoch", ylabel="F")
    assert _is_png(p)
    p = report.plot_curves({"dense": {"train_loss": [1.0, 0.5], "test_acc": [80.0, 90.0]}}, tmp_path / "c.png")
    assert _is_png(p)
    mats = {"dense": torch.rand(2, 4, 4), "loft-2": np.random.rand(2, 4, 4)}
    paths = report.plot_heatmaps(mats, ["layer1.0.conv1", "odd/name"], tmp_path)
    assert [q.name for q in paths] == ["footrule_heatmap_layer1.0.conv1.png", "footrule_heatmap_odd_name.png"]
    assert all(_is_png(q) for q in paths)
    with pytest.raises(ValueError, match="x positions"):
        report.plot_lines({"a": [1.0, 2.0]}, tmp_path / "g.png", title="", xlabel="", ylabel="", x={"a": [1]})


def test_table_bn_recalibrated_column(results):
    rep = report.build_report("digits", [0, 1, 2], results)
    lines = report.format_table(rep, None, {"loft-2": 95.5}).splitlines()
    assert "no-prune, BN re-estimated (%)" in lines[0]
    assert [c.strip() for c in lines[3].strip("|").split("|")][:3] == ["loft-2", "81.00", "95.50"]
    assert [c.strip() for c in lines[2].strip("|").split("|")][2] == "n/a"


def test_table_ddp_column(results):
    rep = report.build_report("digits", [0, 1, 2], results)
    lines = report.format_table(rep, {"loft-2": 505}, None, {"dense": None, "loft-2": 2_000_000}).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    col = head.index("DDP comm (same workers)")
    assert head[col - 1] == "improv." and head[col + 1] == "emerged (footrule)"
    assert [c.strip() for c in lines[3].strip("|").split("|")][col] == "2.00 MB"
    assert [c.strip() for c in lines[2].strip("|").split("|")][col] == "n/a"


# ------------------------------------------- draws against the epoch (loft run) ----
def unit(emerged, drawn, seconds, comm):
    return {"loss_curve": [1.0] * len(seconds), "epoch_seconds": seconds, "comm_curve": comm,
            "emerged_epoch": emerged, "drawn_at": drawn}


def test_draws_rows_means_and_savings():
    from loft_kernels.cli.run_summary import draws
    per = {0: unit({"footrule": 2, "mask": None}, {"0": 60.0, "2": 80.0, "4": 81.0}, [1.0, 2.0, 3.0, 4.0],
                   [10, 20, 30, 40]),
           1: unit({"footrule": 3, "mask": 1}, {"0": 62.0, "1": 70.0, "3": 79.0, "4": 82.0}, [1.5] * 4,
                   [10, 20, 30, 40])}
    d = draws({"loft-2": per}, {"draw_at": "auto", "draw_ratio": 0.8})
    rows = d["methods"]["loft-2"]["rows"]
    assert list(rows) == ["initial weights", "footrule emergence", "mask emergence", "end of pretraining"]
    assert rows["initial weights"]["mean_acc"] == pytest.approx(61.0)
    assert rows["footrule emergence"]["per_seed"] == {"0": {"epoch": 2, "acc": 80.0}, "1": {"epoch": 3, "acc": 79.0}}
    assert rows["footrule emergence"]["mean_acc"] == pytest.approx(79.5)
    assert rows["mask emergence"]["mean_acc"] is None  # did not fire for seed 0
    assert rows["end of pretraining"]["mean_acc"] == pytest.approx(81.5)
    save = d["methods"]["loft-2"]["savings"]
    # seed 0 stops after epoch 2 of 4: epochs 3 and 4 (3 s + 4 s), comm 40 - 20
    assert save["footrule"]["0"] == {"epochs_saved": 2, "train_seconds_saved": 7.0, "comm_bytes_saved": 20,
                                     "ticket_acc_change": -1.0}
    assert save["footrule"]["1"]["epochs_saved"] == 1 and save["mask"]["0"] is None
    assert save["mask"]["1"] == {"epochs_saved": 3, "train_seconds_saved": 4.5, "comm_bytes_saved": 30,
                                 "ticket_acc_change": -12.0}
    table = report.format_draw_table(d).splitlines()
    assert table[0] == "| method | initial weights | footrule emergence | mask emergence | end of pretraining |"
    assert table[2].startswith("| loft-2 | 61.00 (60.00 @0, 62.00 @0) | 79.50 (80.00 @2, 79.00 @3) | "
                               "n/a (not fired, 70.00 @1) |")
    lines = report.format_savings(d)
    assert "loft-2, footrule criterion (fired for 2 of 2 seeds): stopping there saves 1.5 epochs, 4.2 s" in lines[0]
    assert "ticket changes by -2.00 ± 1.00 points (mean ± standard error over those seeds): not within 0.5 point " \
           "of the end-of-pretraining ticket" in lines[0]  # changes -1 and -3: sample sd sqrt(2), error 1
    assert lines[1].endswith("ticket changes by -12.00 points (one seed): not within 0.5 point of the "
                             "end-of-pretraining ticket")
    footrule = d["methods"]["loft-2"]["savings"]["footrule"]
    footrule["0"]["ticket_acc_change"], footrule["1"]["ticket_acc_change"] = -1.9, -2.1
    assert lines[0].split("ticket changes by ")[0] == report.format_savings(d)[0].split("ticket changes by ")[0]
    assert report.format_savings(d)[0].endswith("-2.00 ± 0.10 points (mean ± standard error over those seeds): not "
                                                "within 0.5 point of the end-of-pretraining ticket, and more than two "
                                                "standard errors from it")
    footrule["0"]["ticket_acc_change"], footrule["1"]["ticket_acc_change"] = -0.5, -3.5
    assert report.format_savings(d)[0].endswith("-2.00 ± 1.50 points (mean ± standard error over those seeds): not "
                                                "within 0.5 point of the end-of-pretraining ticket, but within two "
                                                "standard errors of it (the seeds cannot tell the change from none)")
    footrule["0"]["ticket_acc_change"], footrule["1"]["ticket_acc_change"] = 0.25, -0.75
    assert report.format_savings(d)[0].endswith("-0.25 ± 0.50 points (mean ± standard error over those seeds): "
                                                "within 0.5 point of the end-of-pretraining ticket")
    assert lines[1].startswith("- loft-2, mask criterion (fired for 1 of 2 seeds)")


def test_draws_at_explicit_epochs():
    from loft_kernels.cli.run_summary import draws
    per = {0: unit({"footrule": None, "mask": None}, {"0": 50.0, "2": 70.0}, [1.0, 1.0], [0, 0])}
    d = draws({"dense": per}, {"draw_at": [0, 2], "draw_ratio": 0.5})
    assert list(d["methods"]["dense"]["rows"]) == ["epoch 0", "epoch 2"] and d["methods"]["dense"]["savings"] == {}
    assert report.format_savings(d) == []


# ------------------------------------------------- loft run on idx files ----
def test_run_on_idx_files_draws_at_emergence(tmp_path, capsys):
    from loft_kernels.cli import main
    from loft_kernels.data import write_fake_idx
    data = write_fake_idx(tmp_path / "mnist", n_train=120, n_test=40)
    out = tmp_path / "job"
    argv = ["run", "--dataset", "mnist", "--data-dir", str(data), "--model", "vgg", "--width", "0.25",
            "--methods", "dense,loft-2", "--seeds", "2", "--epochs", "3", "--finetune-epochs", "1",
            "--batch-size", "16", "--train-samples", "100", "--footrule-window", "1", "--footrule-threshold", "0.9",
            "--draw-at", "auto", "--ratios", "0.5,0.8", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    report.validate_report(rep)
    config = json.loads((out / "config.json").read_text())
    assert config["train_samples"] == 100 and config["spec"]["model"] == "vgg" and config["draw_at"] == "auto"
    details = json.loads((out / "details.json").read_text())
    for method in ("dense", "loft-2"):
        for seed in ("0", "1"):
            r = rep["methods"][method]["per_seed"][seed]
            unit_dir = out / "units" / method / f"seed{seed}"
            pre = json.loads((unit_dir / "pretrain" / "summary.json").read_text())
            assert pre["samples_per_epoch"] == 100  # the class-balanced subset
            want = {0, 3} | {e for e in pre["emerged_epoch"].values() if e is not None}
            assert {int(e) for e in r["drawn_at"]} == want
            assert r["drawn_at"]["3"] == r["ticket"]["0.8"]  # the end's ticket is the 80 % ticket
            for e in want - {0, 3}:
                ft = json.loads((unit_dir / f"drawn-epoch{e}" / "summary.json").read_text())
                assert r["drawn_at"][str(e)] == pytest.approx(ft["test_acc"])
            # the initial weights are every method's: their ticket is fine-tuned once per seed and shared
            init = json.loads((out / "units" / "initial-weights" / f"seed{seed}" / "ticket-0.8" / "summary.json")
                              .read_text())
            assert r["drawn_at"]["0"] == pytest.approx(init["test_acc"]) and not (unit_dir / "drawn-epoch0").exists()
        assert details["ddp_bytes"][method] is None if method == "dense" else details["ddp_bytes"][method] > 0
    assert details["draws"]["methods"]["loft-2"]["rows"]["initial weights"]["mean_acc"] is not None
    md = (out / "report.md").read_text()
    assert "## Ticket (80 % pruned) against the epoch it was drawn at" in md and "## Run" in md
    assert "| initial weights |" in stdout.splitlines()[4] or "initial weights" in stdout
    assert (out / "ticket_vs_epoch.png").is_file()


def test_run_defaults_follow_the_dataset(capsys):
    import argparse

    from loft_kernels.cli import run_job, run_presets
    sub = argparse.ArgumentParser().add_subparsers()
    p = run_job.add_parser(sub)
    args = p.parse_args(["--dataset", "fashion-mnist"])
    assert run_presets.apply(args) == "default"
    assert (args.model, args.width, args.batch_size, args.train_samples, args.test_samples, args.draw_at,
            args.seeds) == ("vgg", 0.5, 64, 10000, 5000, "auto", 3)
    assert (args.sync_every, args.weight_decay, args.finetune_weight_decay) == (3, 1e-2, 1e-2)
    args = p.parse_args(["--dataset", "fashion-mnist", "--sync-every", "15"])
    run_presets.apply(args)
    assert args.sync_every == 15  # an explicit option wins over the preset
    args = p.parse_args(["--dataset", "fashion-mnist", "--full"])
    run_presets.apply(args)  # more seeds of the same setting, not a longer setting
    assert (args.seeds, args.train_samples, args.epochs, args.finetune_epochs, args.sync_every) == (6, 10000, 8, 3, 3)
    args = p.parse_args(["--dataset", "fashion-mnist", "--model", "preact_resnet18", "--seeds", "5", "--full"])
    run_presets.apply(args)
    assert (args.model, args.seeds, args.train_samples, args.epochs) == ("preact_resnet18", 5, 10000, 8)
    args = p.parse_args([])
    run_presets.apply(args)
    assert (args.dataset, args.model, args.width, args.draw_at, args.seeds, args.sync_every) == (
        "digits", "vgg", 0.5, "none", 1, 15)
    args = p.parse_args(["--full"])
    run_presets.apply(args)
    assert (args.seeds, args.epochs, args.finetune_epochs) == (3, 20, 20)
    assert "--dataset fashion-mnist:" in p.format_help()
    from loft_kernels.cli import main
    assert main(["run", "--quick", "--full"]) == 2
    assert "--quick and --full exclude each other" in capsys.readouterr().err
    assert main(["run", "--dataset", "kmnist", "--data-dir", "/nonexistent"]) == 2
    assert "missing train-images-idx3-ubyte" in capsys.readouterr().err


def test_settled_from():
    from loft_kernels.cli.run_summary import settled_from
    assert settled_from([10.0, 5.0, 0.5, 0.2, 0.0], 0.1) == 2    # within 1.0 of the last value from index 2
    assert settled_from([1.0, 2.0, 3.0], 0.1) == 2               # rising curves settle too (at the last value)
    assert settled_from([4.0, 0.0, 3.0, 0.1, 0.0], 0.1) == 3     # a late excursion moves the settling point
    assert settled_from([2.0], 0.1) == 0
