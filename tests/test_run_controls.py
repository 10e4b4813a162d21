"""`loft run` with control tickets: ratios, the initial-weights and random-filter controls, the discrimination."""
import json
import statistics

import pytest
import torch

from loft_kernels import engine, report
from loft_kernels.cli import main
from loft_kernels.tickets.prune import group_scores

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A short configuration of the showcase's pipeline: digits, 2 seeds, dense and LoFT-2, ratios in percent."""
    out = tmp_path_factory.mktemp("controls") / "job"
    argv = ["run", "--dataset", "digits", "--model", "vgg", "--width", "0.25", "--methods", "dense,loft-2",
            "--seeds", "2", "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "32",
            "--train-samples", "300", "--test-samples", "200", "--ratios", "50,90", "--sync-every", "4",
            "--draw-at", "none", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


def test_report_has_every_ratio_and_both_controls(job):
    rep = json.loads((job / "report.json").read_text())
    report.validate_report(rep)
    assert sorted(rep["methods"]["dense"]["ticket"]) == ["0.5", "0.9"]
    assert list(rep["controls"]) == ["initial-weights", "random-filters"]
    for name in ("initial-weights", "random-filters"):
        c = rep["controls"][name]
        for ratio in ("0.5", "0.9"):
            per = [c["per_seed"][s]["ticket"][ratio] for s in ("0", "1")]
            assert c["ticket"][ratio] == pytest.approx(sum(per) / 2)
    for seed in (0, 1):
        init_dir = job / "units" / "initial-weights" / f"seed{seed}"
        for ratio in ("0.5", "0.9"):
            ft = json.loads((init_dir / f"ticket-{ratio}" / "summary.json").read_text())
            assert rep["controls"]["initial-weights"]["per_seed"][str(seed)]["ticket"][ratio] == ft["test_acc"]
            # fine-tuned exactly like the tickets: same epochs and the same schedule
            ticket = json.loads((job / "units" / "dense" / f"seed{seed}" / f"ticket-{ratio}" / "summary.json")
                                .read_text())
            assert ft["epochs"] == ticket["epochs"] == 1
    for name in ("ticket_vs_ratio.png", "footrule_to_final.png", "curves.png"):
        assert (job / name).is_file()
    md = (job / "report.md").read_text()
    assert "## Tickets against the pruning ratio" in md and "| control: random-filters |" in md
    assert "verdict at 50 %, 90 %" in md


def test_random_filter_control_keeps_as_many_filters_at_random_from_the_pretrained_weights(job):
    for seed in (0, 1):
        unit = job / "units" / "dense" / f"seed{seed}"
        pretrained, groups = engine.full_model(engine.load_model_file(unit / "pretrain" / "model.pt"))
        for ratio in ("0.5", "0.9"):
            rnd = engine.load_model_file(unit / f"random-filters-{ratio}" / "model.pt")
            ticket = engine.load_model_file(unit / f"ticket-{ratio}" / "model.pt")
            # an independent draw: the top of torch.rand scores from a generator seeded with the seed
            gen = torch.Generator().manual_seed(seed)
            for g in groups:
                scores = torch.rand(g.n, generator=gen)
                want = torch.sort(scores, descending=True, stable=True).indices[:len(ticket["kept"][g.name])]
                assert torch.equal(rnd["kept"][g.name], want.sort().values)
                assert len(rnd["kept"][g.name]) == len(ticket["kept"][g.name])
            # the ticket keeps the top L2 norms of the same pretrained weights
            norms = group_scores(pretrained, groups)
            for g in groups:
                top = torch.sort(norms[g.name], descending=True, stable=True).indices[:len(ticket["kept"][g.name])]
                assert torch.equal(ticket["kept"][g.name], top.sort().values)


def test_discrimination_follows_from_the_per_seed_numbers(job):
    rep = json.loads((job / "report.json").read_text())
    d = rep["discrimination"]
    assert d["ratios"] == ["0.5", "0.9"] and d["settings"]["margin"] == 1.5
    for ratio in d["ratios"]:
        dense = [rep["methods"]["dense"]["per_seed"][s]["ticket"][ratio] for s in ("0", "1")]
        for name in ("initial-weights", "random-filters"):
            ctrl = [rep["controls"][name]["per_seed"][s]["ticket"][ratio] for s in ("0", "1")]
            margin = statistics.mean(dense) - statistics.mean(ctrl)
            c = d["per_ratio"][ratio]["controls"][name]
            assert c["margin"] == pytest.approx(margin) and c["spread"] == pytest.approx(statistics.stdev(ctrl))
            assert c["beaten"] == (margin >= 1.5 and margin > max(statistics.stdev(dense), statistics.stdev(ctrl)))
        loft = [rep["methods"]["loft-2"]["per_seed"][s]["ticket"][ratio] for s in ("0", "1")]
        m = d["per_ratio"][ratio]["methods"]["loft-2"]
        assert m["gap"] == pytest.approx(statistics.mean(loft) - statistics.mean(dense))
        assert m["within"] == (abs(m["gap"]) <= 1.0)
    assert d["pretraining_matters"] == all(c["beaten"] for r in d["per_ratio"].values()
                                           for c in r["controls"].values())
    tampered = json.loads(json.dumps(rep))
    tampered["discrimination"]["pretraining_matters"] = not d["pretraining_matters"]
    with pytest.raises(ValueError, match="does not follow"):
        report.validate_report(tampered)


def test_discrimination_rules_on_hand_numbers():
    def seed(t9):
        return {"no_prune": 90.0, "ticket": {"0.5": 90.0, "0.9": t9}, "comm_bytes": 0,
                "emerged_epoch": {"footrule": 1, "mask": None}}
    results = {"dense": {0: seed(85.0), 1: seed(86.0), 2: seed(87.0)},     # mean 86, std 1
               "loft-4": {0: seed(85.0), 1: seed(85.2), 2: seed(85.4)}}    # mean 85.2: -0.8
    controls = {"random-filters": {s: {"ticket": {"0.5": 90.0, "0.9": v}} for s, v in enumerate((84.5, 84.5, 84.5))},
                "initial-weights": {s: {"ticket": {"0.5": 88.0, "0.9": v}} for s, v in enumerate((82.0, 84.0, 86.0))}}
    rep = report.build_report("digits", [0, 1, 2], results, controls)
    r9 = rep["discrimination"]["per_ratio"]["0.9"]
    assert r9["controls"]["random-filters"]["beaten"]                # 1.5 points, above the spread of 1
    init = r9["controls"]["initial-weights"]
    assert init["margin"] == pytest.approx(2.0) and not init["beaten"]  # 2 points but a spread of 2
    assert r9["methods"]["loft-4"]["within"] and r9["methods"]["loft-4"]["gap"] == pytest.approx(-0.8)
    assert not rep["discrimination"]["pretraining_matters"] and rep["discrimination"]["methods_match_reference"]
    table = report.format_ratio_table(rep).splitlines()
    assert table[0] == "| ticket from | 50 % pruned | 90 % pruned |"
    assert table[2] == "| dense | 90.00 ± 0.00 | 86.00 ± 1.00 |"
    assert table[5] == "| control: initial-weights | 88.00 ± 0.00 | 84.00 ± 2.00 |"
    bad = dict(controls, dense=controls["random-filters"])
    with pytest.raises(ValueError, match="must not share its name with a method"):
        report.build_report("digits", [0, 1, 2], results, bad)
    with pytest.raises(ValueError, match="must have the seeds"):
        report.build_report("digits", [0, 1, 2], results, {"random-filters": {0: controls["random-filters"][0]}})


def test_ratios_are_fractions_or_percents():
    from loft_kernels.cli._common import CLIError
    from loft_kernels.cli.run_job import parse_controls, parse_ratios
    assert parse_ratios("0.8,0.5,0.8") == [0.5, 0.8]
    assert parse_ratios("50,80,90,95") == pytest.approx([0.5, 0.8, 0.9, 0.95])
    assert parse_ratios("50%, 0.9") == pytest.approx([0.5, 0.9])
    assert parse_ratios("95%,80") == pytest.approx([0.8, 0.95])
    assert parse_ratios("2.5") == pytest.approx([0.025])
    for bad, match in [("0.5,80", "80 is not a pruning ratio"), ("100", "100 is not"), ("", "must not be empty"),
                       ("-0.2", "-0.2 is not"), ("nan", "nan is not"), ("0.5;0.8", "comma-separated list")]:
        with pytest.raises(CLIError, match=match):
            parse_ratios(bad)
    assert parse_controls("none") == [] and parse_controls("random-filters,initial-weights") == [
        "initial-weights", "random-filters"]


def test_emergence_savings_count_sample_steps():
    from loft_kernels.cli.run_summary import draws
    r = {"loss_curve": [1.0] * 8, "epoch_seconds": [2.0] * 8, "comm_curve": [10 * e for e in range(1, 9)],
         "emerged_epoch": {"footrule": 5, "mask": None}, "drawn_at": {"0": 70.0, "5": 81.0, "8": 81.4},
         "samples_per_epoch": 1000}
    d = draws({"loft-4": {0: r}}, {"draw_at": "auto", "draw_ratio": 0.95})
    save = d["methods"]["loft-4"]["savings"]["footrule"]["0"]
    assert save == {"epochs_saved": 3, "train_seconds_saved": 6.0, "comm_bytes_saved": 30,
                    "ticket_acc_change": pytest.approx(-0.4), "sample_steps_saved": 3000, "sample_steps_total": 8000}
    line = report.format_savings(d)[0]
    assert "saves 3.0 epochs, 3,000 sample-steps (38 % of the pretraining)" in line


def test_global_batch_split_and_fine_tuning_weight_decay(tmp_path):
    """--batch-split global: LoFT-S workers take --batch-size / S samples per step, so they take as many steps
    per epoch as dense training; --finetune-weight-decay applies to the tickets only."""
    out = tmp_path / "job"
    argv = ["run", "--dataset", "digits", "--model", "vgg", "--width", "0.25", "--methods", "dense,loft-2",
            "--seeds", "1", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32", "--batch-split",
            "global", "--train-samples", "256", "--test-samples", "100", "--ratios", "50", "--controls", "none",
            "--weight-decay", "0.002", "--finetune-weight-decay", "0.0001", "--draw-at", "none", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["batch_split"] == "global" and config["finetune"]["weight_decay"] == 0.0001
    assert config["pretrain"]["weight_decay"] == 0.002
    for method, batch in (("dense", 32), ("loft-2", 16)):
        summary = json.loads((out / "units" / method / "seed0" / "pretrain" / "summary.json").read_text())
        assert summary["train"]["batch_size"] == batch and summary["train"]["weight_decay"] == 0.002
        assert summary["samples_per_epoch"] == 256  # every method sees every training sample once per epoch


def test_global_batch_split_needs_a_batch_that_splits_over_the_workers(capsys, tmp_path):
    rc = main(["run", "--dataset", "digits", "--methods", "dense,loft-3", "--batch-size", "32", "--batch-split",
               "global", "--out", str(tmp_path / "job")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--batch-size 32 does not split evenly over the workers of loft-3" in err


def test_loft_budget_updates_pretrains_loft_s_for_s_times_the_epochs(tmp_path):
    """--loft-budget updates: LoFT-S pretrains S x --epochs epochs (as many updates per filter as dense training),
    and an explicit --draw-at epoch e (a dense epoch) is LoFT-S's epoch e x S."""
    out = tmp_path / "job"
    argv = ["run", "--dataset", "digits", "--model", "vgg", "--width", "0.25", "--methods", "dense,loft-2",
            "--seeds", "1", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32", "--loft-budget",
            "updates", "--train-samples", "256", "--test-samples", "100", "--ratios", "50", "--controls", "none",
            "--draw-at", "0,1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["loft_budget"] == "updates"
    for method, epochs in (("dense", 1), ("loft-2", 2)):
        unit = out / "units" / method / "seed0" / "pretrain"
        summary = json.loads((unit / "summary.json").read_text())
        assert summary["train"]["epochs"] == epochs == summary["epochs_run"]
        assert summary["samples_per_epoch"] == 256 and (unit / f"epoch_{epochs:03d}.pt").exists()
        assert summary["emergence"].get("every", 1) == epochs  # LoFT-2's criteria look at every 2nd epoch
    rep = json.loads((out / "report.json").read_text())
    assert sorted(rep["methods"]["dense"]["per_seed"]["0"]["drawn_at"]) == ["0", "1"]
    assert sorted(rep["methods"]["loft-2"]["per_seed"]["0"]["drawn_at"]) == ["0", "2"]
    notes = json.loads((out / "details.json").read_text())["notes"]
    assert any(n.startswith("loft-2: pretrained 2 x the epochs") for n in notes)
    assert (out / "curves.png").stat().st_size > 0 and (out / "ticket_vs_epoch.png").stat().st_size > 0


def test_loft_budget_updates_excludes_a_global_batch_split(capsys, tmp_path):
    rc = main(["run", "--dataset", "digits", "--loft-budget", "updates", "--batch-split", "global",
               "--out", str(tmp_path / "job")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--loft-budget updates with --batch-split global" in err


def _hand_report(methods, controls=("random-filters",), seeds=(0, 1)):
    def seed(v):
        return {"no_prune": 90.0, "ticket": {"0.5": v, "0.9": v - 5}, "comm_bytes": 0,
                "emerged_epoch": {"footrule": 1, "mask": None}}
    results = {m: {s: seed(85.0 + i + s) for s in seeds} for i, m in enumerate(methods)}
    ctl = {c: {s: {"ticket": {"0.5": 80.0, "0.9": 70.0 + s}} for s in seeds} for c in controls}
    return report.build_report("digits", list(seeds), results, ctl)


def test_a_job_without_other_methods_or_without_dense_says_what_it_cannot_compare(tmp_path):
    """Only dense: no method was compared with it (all([]) used to say every method matched). Without dense:
    no verdict, said in words, and the random-filter control is described as drawn from the method that ran."""
    alone = _hand_report(["dense"])
    assert alone["discrimination"]["methods_match_reference"] is None
    report.write_report(tmp_path / "alone", alone)
    text = (tmp_path / "alone" / "report.md").read_text()
    assert "no other method ran to compare with dense" in text and "every method's ticket is within" not in text
    assert "from the dense-pretrained weights" in text and "initial-weights (" not in text  # the one control run
    loft = _hand_report(["loft-2"], controls=("initial-weights", "random-filters"))
    assert loft["discrimination"] is None
    report.write_report(tmp_path / "loft", loft)
    text = (tmp_path / "loft" / "report.md").read_text()
    assert "no verdict: the job did not pretrain dense" in text
    assert "from the loft-2-pretrained weights" in text and "dense-pretrained" not in text


def test_listed_draw_points_are_labelled_in_dense_epochs():
    """Under --loft-budget updates LoFT-2 draws at its epochs 2 and 4 for --draw-at 1,2: the columns must be dense
    epochs 1 and 2, beside dense's own (they were labelled 'epoch 2' and 'epoch 4')."""
    from loft_kernels.cli.run_summary import draw_points
    loft2 = {"drawn_at": {"0": 90.0, "2": 91.0, "4": 92.0}, "epoch_scale": 2}
    dense = {"drawn_at": {"0": 90.0, "1": 93.0, "2": 94.0}}
    assert draw_points(loft2, auto=False) == {"epoch 0": 0, "epoch 1": 2, "epoch 2": 4}
    assert list(draw_points(dense, auto=False)) == list(draw_points(loft2, auto=False))
