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
