"""`loft groups`: the groups and reasons of lk.explain_groups, the policy's selection, user errors as one line."""
import json

import torch

import loft_kernels as lk
from loft_kernels.cli import main


def test_groups_lists_what_explain_groups_finds(tmp_path, capsys):
    out = tmp_path / "groups.json"
    rc = main(["groups", "--model", "preact_resnet18", "--width", "0.125", "--policy", "paper", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    torch.manual_seed(0)
    model = lk.get_model("preact_resnet18", num_classes=10, in_channels=1, width=0.125)
    report = lk.explain_groups(model, torch.zeros(2, 1, 8, 8))
    data = json.loads(out.read_text())
    assert [g["name"] for g in data["groups"]] == [g.name for g in report.groups]
    assert data["not_groups"] == report.reasons
    paper = {g.name for g in lk.select_groups(report.groups, "paper")}
    assert {g["name"] for g in data["groups"] if g["selected"]} == paper
    assert f"{len(paper)} of {len(report.groups)} group(s)" in printed
    assert all(g.name in printed for g in report.groups)


def test_groups_user_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv, needle in ((["groups", "--model", "nope"], "--model"),
                         (["groups", "--model", "preact_resnet18", "--width", "0.125", "--json", str(blocker / "g.json")],
                          "--json")):
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err, err
