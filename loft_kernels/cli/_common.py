"""What every `loft` subcommand shares: common options, the output directory, config and metrics files.

Output-directory rule: every argument is validated (and every input file
opened) before --out is created, so a bad invocation leaves nothing behind; a
directory that already holds a run is refused unless --resume is given.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import platform
import sys
import time
from pathlib import Path

import torch

from ..io import atomic_write_text


class CLIError(Exception):
    """A user error: printed as `loft <command>: error: <message>`, exit status 2."""


def add_common(p: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--out", default=out_default,
                   help="output directory" + (f" (default: {out_default})" if out_default else ""))
    g.add_argument("--device", default="auto",
                   help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def parse_list(text: str, kind, name: str) -> list:
    """'0.5,0.8' -> [0.5, 0.8]; a clear CLIError naming the option otherwise."""
    try:
        items = [kind(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"{name} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not items:
        raise CLIError(f"{name} must not be empty")
    return items


def check_ratio(value: float, name: str) -> float:
    if not 0.0 <= value < 1.0:
        raise CLIError(f"{name} must lie in [0, 1), got {value:g}")
    return value


def check_positive(value: int, name: str, minimum: int = 1):
    if value < minimum:
        raise CLIError(f"{name} must be >= {minimum}, got {value}")
    return value


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device: {text!r} is not a torch device (try cpu, cuda, cuda:0, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: CUDA is not available in this torch/machine")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device: only cpu and cuda devices are supported, got {text!r}")
    return dev


def default_out(command: str) -> str:
    return str(Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_out(out: str, *, resume: bool = False, marker: str = "config.json") -> Path:
    """Create --out (after all validation). An existing run there needs --resume."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out!r} exists and is not a directory")
    if resume:
        if not (path / marker).is_file():
            raise CLIError(f"--resume: {out!r} holds no run to resume (no {marker})")
    elif (path / marker).exists():
        raise CLIError(f"--out {out!r} already holds a run ({marker}); pass --resume to continue it "
                       f"or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_out_free(out: str | None, *, resume: bool = False, marker: str = "config.json") -> None:
    """The checks of prepare_out without creating anything (to fail before expensive work)."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out!r} exists and is not a directory")
    if resume and not (path / marker).is_file():
        raise CLIError(f"--resume: {out!r} holds no run to resume (no {marker})")
    if not resume and (path / marker).exists():
        raise CLIError(f"--out {out!r} already holds a run ({marker}); pass --resume to continue it "
                       f"or choose another --out")


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "argv": sys.argv}


def write_config(out: Path, config: dict, name: str = "config.json") -> None:
    atomic_write_text(json.dumps({**config, "environment": environment()}, indent=2, default=str) + "\n",
                      out / name)


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{what}: {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{what}: {str(path)!r} is not valid JSON ({e})") from None


def write_metrics(out: Path, rows: list[dict], stem: str = "metrics") -> None:
    """<stem>.json (list of per-epoch dicts) and <stem>.csv (one row per epoch), both rewritten atomically."""
    atomic_write_text(json.dumps(rows, indent=2) + "\n", out / f"{stem}.json")
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    atomic_write_text(buf.getvalue(), out / f"{stem}.csv")


def show_progress(quiet: bool) -> bool:
    """tqdm bars only on a terminal, never with --quiet."""
    return not quiet and sys.stderr.isatty()


def say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)
