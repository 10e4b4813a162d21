"""The ratio benchmark runner (`loft bench`): it runs every case and writes valid JSON (numbers are not
asserted: CI machines are shared), its table, goals and storage, and the interleaved timing helper."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loft_kernels.benchmarks import runner
from loft_kernels.benchmarks.result import Result, Spec, judge, valued
from loft_kernels.benchmarks.timing import Timings, interleaved

CASE_IDS = ["P1a", "P1b", "P2a", "P2b", "P3a", "P3b", "P4a", "P4b", "P5a", "P5b", "P6a", "P6b", "P6c", "P6m", "P6s", "P7",
            "P8t2", "P8t4", "P8t8", "P8r", "P8m", "P8g", "P8v", "P9v", "P9r", "P9s"]
VALUE_ROWS = {"P6m", "P6s", "P7", "P8r", "P8m"}  # compare computed values (bytes, modelled traffic), not times
ROW_KEYS = {"id", "name", "candidate_ms", "baseline_ms", "ratio", "limit", "goal", "met"}


def test_quick_run_writes_valid_json_with_every_case(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = runner.main(["--quick", "--repeats", "1", "--warmup", "0", "--json", str(out), "--no-store"])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    errors = [(r["id"], r["error"]) for r in report["results"] if r["error"]]
    assert rc == 0 and not errors, errors
    assert {"cpu", "threads", "torch", "device", "date", "started"} <= set(report["machine"])
    assert f"{report['machine']['started']} to {report['machine']['date']}" in printed  # start and end stamps
    assert [r["id"] for r in report["results"]] == CASE_IDS
    for r in report["results"]:
        assert ROW_KEYS <= set(r)
        assert isinstance(r["met"], bool) and isinstance(r["limit"], float) and r["goal"]
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0
        if r["id"] in VALUE_ROWS:
            assert r["candidate_ms"] is None and r["candidate_value"] > 0
        else:
            assert r["candidate_ms"] > 0 and r["baseline_ms"] > 0
        assert r["id"] in printed
    assert "| id |" in printed


def test_case_subset_and_bad_arguments(tmp_path):
    out = tmp_path / "p7.json"
    assert runner.main(["--cases", "p7", "--json", str(out)]) == 0
    assert [r["id"] for r in json.loads(out.read_text())["results"]] == ["P7"]
    for argv in (["--cases", "P10"], ["--repeats", "0"], ["--warmup", "-1"], ["--bogus"]):
        with pytest.raises(SystemExit) as e:
            runner.main(argv)
        assert e.value.code == 2


def test_a_failing_case_is_reported_not_raised(monkeypatch, tmp_path):
    spec = Spec("P7", "comm model", "paper", 0.02, "abs(ratio - 1) <= 0.02", within=True)

    def broken(cfg):
        raise RuntimeError("no zoo")
    monkeypatch.setitem(runner.CASES, "P7", ((spec,), broken))
    out = tmp_path / "r.json"
    assert runner.main(["--cases", "P7", "--json", str(out)]) == 1
    row = json.loads(out.read_text())["results"][0]
    assert row["met"] is False and row["ratio"] is None and "no zoo" in row["error"]


def test_table_marks_goals_not_met_and_errors():
    met = valued(Spec("X1", "a", "b", 0.02, "within 2 %", within=True), 3.49, 3.5, unit="").as_json()
    missed = Result("X2", "slow", "fast", 10.0, 5.0, 2.0, 1.15, "ratio <= 1.15", False).as_json()
    broken = Result("X3", "c", "d", None, None, None, 1.0, "ratio <= 1", False, error="boom").as_json()
    memory = valued(Spec("X4", "m", "n", 1.5, "ratio <= 1.5"), 3 * 2 ** 20, 2 * 2 ** 20, unit="bytes").as_json()
    lines = runner.format_table({"results": [met, missed, broken, memory]}).splitlines()
    assert lines[2].endswith("| met |") and "| 3.4900 | 3.5000 |" in lines[2]
    assert lines[3].endswith("| NOT MET |") and "| 10.00 ms | 5.00 ms | 2.000 |" in lines[3]
    assert lines[4].endswith("| ERROR |")
    assert "| 3.0 MiB | 2.0 MiB | 1.500 |" in lines[5]  # bytes are not printed as milliseconds


def test_goal_judgement():
    assert judge(1.15, 1.15) and not judge(1.16, 1.15)
    assert judge(0.99, 0.02, within=True) and judge(1.02, 0.02, within=True)
    assert not judge(0.97, 0.02, within=True) and not judge(None, 1.0) and not judge(math.nan, 1.0)


def test_store_writes_json_and_table_under_the_machine_name(tmp_path):
    report = {"machine": {"cpu": "Test CPU 1", "device": "cpu", "cores": 2, "threads": 2, "torch": "2.x",
                          "backends": ["torch"], "date": "2025-01-01 00:00 UTC", "commit": None},
              "mode": "full", "results": []}
    path = runner.store(report, tmp_path)
    assert path == tmp_path / "test-cpu-1-cpu.json"
    assert json.loads(path.read_text()) == report
    assert "Test CPU 1" in (tmp_path / "test-cpu-1-cpu.md").read_text()


def test_machine_slug():
    m = {"cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "device": "cpu"}
    assert runner.machine_slug(m) == "intel-xeon-platinum-8375c-cpu-2-90ghz-cpu"
    assert runner.machine_slug({"cpu": "AMD EPYC 7B13", "device": "NVIDIA H100 80GB HBM3"}) == \
        "amd-epyc-7b13-nvidia-h100-80gb-hbm3"


def test_interleaved_rotates_order_and_uses_fresh_setups():
    calls = []

    def entry(name):
        def setup():
            calls.append(("setup", name))
            return lambda: calls.append(("run", name))
        return setup
    t = interleaved({"a": entry("a"), "b": entry("b"), "c": entry("c")}, repeats=2, warmup=1)
    runs = [n for kind, n in calls if kind == "run"]
    # each repetition starts one entry later: warm-up a b c, then b c a, then c a b
    assert runs == list("abc" "bca" "cab")
    assert [n for kind, n in calls if kind == "setup"] == runs  # a fresh setup before every call
    assert {k: len(v) for k, v in t.samples.items()} == {"a": 2, "b": 2, "c": 2}


def test_timings_ratio_is_the_median_of_paired_ratios():
    t = Timings({"cand": [1.0, 8.0, 9.0], "base": [2.0, 2.0, 9.0]})
    # paired ratios 0.5, 4, 1 -> median 1 (the ratio of the medians would be 8 / 2 = 4)
    assert t.ratio("cand", "base") == 1.0
    assert t.ratio("cand", "base", scale=0.5) == 2.0
    assert t.median("cand") == 8.0
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": lambda: (lambda: None)}, repeats=0)
    with pytest.raises(TypeError, match="entries"):
        interleaved({"a": 3}, repeats=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; this machine has a GPU")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(repo / "bench" / "gpu_check.sh"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("gpu_check: no CUDA GPU here")
    assert not (tmp_path / "out").exists()


def test_gpu_check_orders_correct_backends_fastest_first_and_renders():
    from loft_kernels.benchmarks import gpu_check
    ops = {"filter_stats": {"cuda": {"error": {"fp32": 1e-7}, "correct": True, "ms": 2.0},
                            "triton": {"error": {"fp32": 1e-7}, "correct": True, "ms": 1.0},
                            "torch": {"error": {"fp32": 0.0}, "correct": True}},
           "partial_conv2d": {"cuda": {"error": {"fp32": 1e-7}, "correct": True, "ms": 3.0},
                              "triton": {"error": {"fp32": 0.5}, "correct": False, "ms": 0.1},
                              "torch": {"error": {}, "correct": False, "skipped": "pretend"}}}
    assert gpu_check.orders(ops) == {"filter_stats": ["triton", "cuda", "torch"], "partial_conv2d": ["cuda"]}
    text = gpu_check._markdown({"device": "Fake GPU", "date": "today", "torch": "x", "ops": ops,
                                "orders": gpu_check.orders(ops)})
    assert "| partial_conv2d | triton | 5.0e-01 | - | - | False | 0.100 | - |" in text
    assert "filter_stats: triton" in text and "pretend" in text


def test_saved_bytes_counts_each_saved_tensor_once_and_two_slices_of_a_buffer_twice():
    from loft_kernels.benchmarks.case_step import saved_bytes
    x = torch.randn(10, requires_grad=True)

    def slices():
        a, b = x[:5], x[5:]
        (a.sin() + b.sin()).sum()  # sin saves its input: the two halves, 20 bytes each

    def twice():
        (x.sin() + x.cos()).sum()  # x saved by both ops: one tensor
    assert saved_bytes(slices) == 40
    assert saved_bytes(twice) == 40


def test_the_microbenchmarks_run():
    """Every pytest-benchmark microbenchmark in bench/ runs once (timing disabled): the suite cannot rot."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                        str(root / "bench")], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_gpu_check_keeps_what_it_measured_and_the_last_choice_when_it_measures_nothing(monkeypatch, tmp_path):
    """The GPU check's bookkeeping, with the GPU faked: the summary is rewritten after every part, a backend whose
    timing failed is no choice, the reference is ordered by its own time, `chosen` comes from this run, a run
    that skips the ops keeps the previous choice, and an unknown --skip part is refused."""
    from loft_kernels.benchmarks import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    seen = []

    def fake_ops(folder, deadline):
        seen.append(json.loads((folder / "summary.json").read_text())["parts"])  # written after the build
        return {"filter_norms": {"cuda": {"error": {"fp32": 0.0}, "correct": True, "ms": 2.0, "torch_ms": 1.0},
                                 "triton": {"error": {"fp32": 0.0}, "correct": True, "failed": "out of time"},
                                 "torch": {"error": {"fp32": 0.0}, "correct": True}}}
    monkeypatch.setattr(gpu_check, "_ops_in_subprocesses", fake_ops)
    monkeypatch.setattr(gpu_check, "training_smoke", lambda device, deadline: {"dense": {"steps": 0}})
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--skip", "build,pytest,bench"]) == 0
    untested = json.loads((out / "summary.json").read_text())
    assert untested["orders"] == {"filter_norms": ["torch"]} and "GPU tests did not pass" in untested["orders_note"]
    monkeypatch.setattr(gpu_check, "_run", lambda cmd, timeout, log: {"rc": 0, "cmd": " ".join(cmd)})
    assert gpu_check.main(["--out", str(out), "--skip", "build,bench"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert seen and seen[0]["build"] == "skipped (--skip)"
    assert first["orders"] == {"filter_norms": ["torch", "cuda"]}  # the reference was faster: first
    assert first["chosen"] == {"filter_norms": "torch"} and first["sources"]
    assert gpu_check.main(["--out", str(out), "--skip", "build,ops,bench,training"]) == 0  # the tests pass again
    second = json.loads((out / "summary.json").read_text())
    assert second["orders"] == first["orders"] and second["orders_from"] == first["date"]
    assert gpu_check.main(["--out", str(out), "--skip", "build,ops,pytest,bench,training"]) == 0
    assert json.loads((out / "summary.json").read_text())["orders"] == {"filter_norms": ["torch"]}  # untested
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(out), "--skip", "opz"])
    assert e.value.code == 2


def test_gpu_check_never_reads_an_earlier_runs_rows_for_a_backend_whose_process_died(monkeypatch, tmp_path):
    from loft_kernels.benchmarks import gpu_check
    (tmp_path / "ops-cuda.json").write_text(json.dumps({"partial_conv2d": {"cuda": {"correct": True, "ms": 0.01}}}))
    monkeypatch.setattr(gpu_check, "_run", lambda cmd, timeout, log: {"rc": -11, "cmd": " ".join(cmd)})
    rows = gpu_check._ops_in_subprocesses(tmp_path, time.perf_counter() + 30)
    assert rows["partial_conv2d"]["cuda"]["correct"] is False and "-11" in rows["partial_conv2d"]["cuda"]["failed"]
