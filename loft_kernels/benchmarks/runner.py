"""The ratio benchmark runner: `loft bench [--quick] [--json FILE]` (also `python -m loft_kernels.benchmarks`).

Runs cases P1..P9, each comparing a candidate with a named baseline
or limit inside this process (timing.py), prints a table and writes JSON
    {"machine": {...}, "results": [{"id", "name", "candidate_ms", "baseline_ms",
                                    "ratio", "limit", "goal", "met", ...}, ...]}
A goal that is not met is reported as NOT MET; a case that cannot run is
reported with its error (and the exit status is 1). A full run of every case
from a source checkout also stores its JSON and markdown table in
bench/results/<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .._argparse import Parser
from ..backends import available_backends
from ..io import atomic_write_text, check_writable
from . import case_comm, case_conv, case_layout, case_sim, case_stats, case_step, case_sync
from .result import Config, Result, failed

CASES = {**case_conv.CASES, **case_stats.CASES, **case_sync.CASES, **case_step.CASES, **case_comm.CASES,
         **case_sim.CASES, **case_layout.CASES}
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def loadavg():
    """1, 5 and 15 minute load averages: other jobs on a shared machine make the times noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "loadavg": loadavg(),
            "torch": torch.__version__, "device": device_name(device), "python": platform.python_version(),
            "platform": platform.platform(), "backends": available_backends(),
            "date": _utc_now(), "commit": commit}


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine_slug(machine: dict) -> str:
    """File name of a machine's results: CPU model + device, lower-case, [a-z0-9-] only."""
    text = f"{machine['cpu']} {machine['device']}".lower()
    text = re.sub(r"\((r|tm)\)", " ", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _value(v, unit) -> str:
    """A compared quantity with its unit (reports written before units were stored give none)."""
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "bytes":
        return f"{v / 2 ** 20:.1f} MiB"
    return f"{v:.4f}"


def _status(r: dict) -> str:
    if r.get("error"):
        return "ERROR"
    return "met" if r["met"] else "NOT MET"


def format_table(report: dict) -> str:
    """The results as a markdown table (also what the runner prints)."""
    lines = ["| id | candidate | baseline / limit | candidate | baseline | ratio | goal | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r.get("candidate_value") is not None:
            cand, base = (_value(r["candidate_value"], r.get("unit")), _value(r["baseline_value"], r.get("unit")))
        else:
            cand, base = (_value(r["candidate_ms"], "ms"), _value(r["baseline_ms"], "ms"))
        name = r["name"] + (f" [{r['backend']}]" if r.get("backend") else "")
        lines.append(f"| {r['id']} | {name} | {r['baseline']} | {cand} | {base} | {_fmt(r['ratio'], 3)} | "
                     f"{r['goal']} | {_status(r)} |")
    notes = [f"- {r['id']}: {r['note']}" for r in report["results"] if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def format_header(report: dict) -> str:
    m = report["machine"]
    # "date" is when the run ended; runs stored before "started" existed have only that
    when = f"{m['started']} to {m['date']}" if m.get("started") else m["date"]
    return (f"{when}: {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads), device {m['device']}, "
            f"torch {m['torch']}, backends {', '.join(m['backends'])}"
            + (f", commit {m['commit']}" if m.get("commit") else "")
            + (f", load average {m['loadavg_start'][0]} at start, {m['loadavg'][0]} at end"
               if m.get("loadavg") and m.get("loadavg_start") else "") + f"; mode {report['mode']}")


def store(report: dict, results_dir) -> Path:
    """Write <machine>.json (the report) and <machine>.md (header + table) into results_dir."""
    slug = machine_slug(report["machine"])
    path = Path(results_dir) / f"{slug}.json"
    atomic_write_text(json.dumps(report, indent=2) + "\n", path)
    atomic_write_text(f"{format_header(report)}\n\n{format_table(report)}", path.with_suffix(".md"))
    return path


def _parse(argv) -> argparse.Namespace:
    p = Parser(prog="loft bench", description=(
        "Ratio benchmarks P1..P9: each candidate against its baseline or limit, interleaved in one process, "
        "medians over repetitions on fresh random inputs. Goals not met are reported as NOT MET."))
    p.add_argument("--quick", action="store_true", help="fewer repetitions (under 2 minutes on a 2-core CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--cases", metavar="IDS", help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device for the kernel cases (default: cuda if available, else cpu)")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="override every case's repetition count (smoke tests; stored results are never from it)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed repetitions before the timed ones (default 1)")
    p.add_argument("--results-dir", metavar="DIR",
                   help=f"where a full run stores <machine>.json/.md (default: {RESULTS_DIR} if it exists)")
    p.add_argument("--no-store", action="store_true", help="do not store the results in the results directory")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.cases is not None:
        ids = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in ids if c not in CASES]
        if unknown or not ids:
            p.error(f"--cases: unknown case(s) {unknown or args.cases!r}; choose from {','.join(CASES)}")
        args.cases = ids
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    # The reports are written after the whole run: refuse an unusable destination before it starts.
    outputs = [("--json", args.json, args.json),
               ("--results-dir", args.results_dir, args.results_dir and Path(args.results_dir, "results.json"))]
    for option, value, target in outputs:
        try:
            if target:
                check_writable(target)
        except OSError as exc:
            p.exit(2, f"{p.prog}: error: {option} {value!r} cannot be written: {exc}\n")
    return args


def run_cases(cfg: Config, ids, log=print) -> list[Result]:
    results = []
    for cid in ids:
        specs, fn = CASES[cid]
        start = time.perf_counter()
        try:
            rows = fn(cfg)
        except Exception as exc:  # a broken case is reported, and the others still run
            traceback.print_exc(file=sys.stderr)
            rows = [failed(s, f"{type(exc).__name__}: {exc}") for s in specs]
        log(f"  {cid}: {time.perf_counter() - start:.1f} s")
        results.extend(rows)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cfg = Config(device=device, quick=args.quick, repeats=args.repeats, warmup=args.warmup)
    ids = args.cases or list(CASES)
    mode = "quick" if args.quick else "full"
    if args.repeats is not None:
        mode += f", repeats={args.repeats}"
    if args.warmup != 1:
        mode += f", warmup={args.warmup}"
    print(f"loft bench ({mode}) on {device_name(device)}: cases {', '.join(ids)}", flush=True)
    start, load_start, started = time.perf_counter(), loadavg(), _utc_now()
    results = run_cases(cfg, ids, log=lambda s: print(s, flush=True))
    report = {"machine": {**machine_info(device), "loadavg_start": load_start, "started": started}, "mode": mode,
              "wall_s": round(time.perf_counter() - start, 1), "results": [r.as_json() for r in results]}
    print(format_header(report))
    print(format_table(report), end="")
    if args.json:
        atomic_write_text(json.dumps(report, indent=2) + "\n", args.json)
        print(f"wrote {args.json}")
    full_run = not args.quick and args.repeats is None and args.warmup == 1 and args.cases is None
    results_dir = Path(args.results_dir) if args.results_dir else (RESULTS_DIR if RESULTS_DIR.is_dir() else None)
    if full_run and not args.no_store and results_dir is not None:
        print(f"stored {store(report, results_dir)}")
    return 1 if any(r.error for r in results) else 0
