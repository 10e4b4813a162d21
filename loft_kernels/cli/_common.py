"""What every `loft` subcommand shares: common options, the output directory, config and metrics files.

Output-directory rule: every argument is validated (and every input file
opened) before --out is created, so a bad invocation leaves nothing behind; a
directory that already holds a run is refused unless --resume is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..io import atomic_write_text, check_writable, existing_ancestor
from ..training.batched import unsupported as batched_unsupported


class CLIError(Exception):
    """A user error: printed as `loft <command>: error: <message>`, exit status 2."""


MAX_SEED = 2 ** 63 - 1  # torch generators and numpy seed sequences take any int in 0..2**63-1


def seed_arg(text: str) -> int:
    """argparse type of --seed: an int in 0..MAX_SEED (argparse names the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in 0..2**63-1, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type of every float option: a finite number (inf and nan are refused with the option's name)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def add_common(p: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--seed", type=seed_arg, default=0, help="random seed, 0..2**63-1 (default: %(default)s)")
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


def check_positive(value: int, name: str, *, most: int = None) -> int:
    if value < 1:
        raise CLIError(f"{name} must be >= 1, got {value}")
    if most is not None and value > most:
        raise CLIError(f"{name} must be <= {most}, got {value}")
    return value


def check_non_negative(value: int, name: str) -> int:
    if value < 0:
        raise CLIError(f"{name} must be >= 0, got {value}")
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


def prepare_out(out: str, *, resume: bool = False, marker: str = "config.json", resumable: bool = True) -> Path:
    """Create --out (after all validation). An existing run there needs --resume (`resumable`: the command has it)."""
    check_out_free(out, resume=resume, marker=marker, resumable=resumable)
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a read-only filesystem lets mkdir(exist_ok) pass
            pass
    except OSError as e:
        raise CLIError(f"--out {out!r} cannot be created or written: {e.strerror or e}") from None
    return path


def check_out_free(out: str | None, *, resume: bool = False, marker: str = "config.json",
                   resumable: bool = True) -> None:
    """The checks of prepare_out without creating anything (to fail before expensive work)."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {out!r} exists and is not a directory")
    base = existing_ancestor(path)
    if not base.is_dir():
        raise CLIError(f"--out {out!r} lies under {str(base)!r}, which is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out!r} cannot be created or written: {str(base)!r} is not writable")
    if resume and not (path / marker).is_file():
        raise CLIError(f"--resume: {out!r} holds no run to resume (no {marker})")
    if not resume and (path / marker).exists():
        raise CLIError(f"--out {out!r} already holds a run ({marker}); "
                       + ("pass --resume to continue it or choose another --out" if resumable else
                          "choose another --out"))


# Training settings that say how a run computes, not what: a resumed run may change them (its checkpoints load
# into either memory format), and a run written before they existed resumes with today's default.
_NOT_IDENTITY = ("memory_format",)


def _identity(value):
    return {k: v for k, v in value.items() if k not in _NOT_IDENTITY} if isinstance(value, dict) else value


def check_same_config(out: str, config: dict, keys) -> None:
    """--resume: the settings `keys` of `config` must equal those the run in `out` was started with."""
    old = read_json(Path(out) / "config.json", "--resume")
    diff = [k for k in keys if _identity(old.get(k)) != _identity(json.loads(json.dumps(config[k], default=str)))]
    if diff:
        raise CLIError(f"--resume: these settings differ from the run in {out!r}: {', '.join(diff)}; "
                       f"resume with the original arguments")


def check_resumed_seeds(out: str, seeds: list) -> bool:
    """--resume may add seeds to a run (its finished units are reused), not drop any; True if it adds some."""
    old = read_json(Path(out) / "config.json", "--resume").get("seeds")
    if not isinstance(old, list) or old != seeds[:len(old)]:
        raise CLIError(f"--resume: the run in {out!r} has seeds {old}, this command's are {seeds}; resume with the "
                       f"same --seed and at least {len(old) if isinstance(old, list) else 'as many'} --seeds "
                       f"(more seeds extend the run)")
    return len(seeds) > len(old)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "argv": sys.argv}


def write_config(out: Path, config: dict, name: str = "config.json") -> None:
    atomic_write_text(json.dumps({**config, "environment": environment()}, indent=2, default=str) + "\n",
                      out / name)


def read_json(path: Path, what: str, kind: type = dict):
    """The JSON value of `path`, which must be a `kind` (dict: an object, list: an array)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{what}: {str(path)!r} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # not JSON, not UTF-8 text, or unreadable
        raise CLIError(f"{what}: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(obj, kind):
        raise CLIError(f"{what}: {str(path)!r} holds a JSON {type(obj).__name__}, not the {kind.__name__} "
                       f"it should hold")
    return obj


def check_output_file(path, option: str) -> None:
    """An output file written after long work: refuse an unusable `path` now, naming `option`."""
    try:
        check_writable(path)
    except OSError as e:
        raise CLIError(f"{option} {str(path)!r} cannot be written: {e}") from None


def show_progress(quiet: bool) -> bool:
    """tqdm bars only on a terminal, never with --quiet."""
    return not quiet and sys.stderr.isatty()


def say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


# ------------------------------------------------------ data and model args ----
def add_data_model(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="digits",
                   help="digits (embedded, default), fashion-mnist, mnist, kmnist (idx files), cifar10, cifar100 "
                        "(python pickles) or synthetic")
    g.add_argument("--data-dir", default=None,
                   help="directory of the idx files (mnist, kmnist; fashion-mnist defaults to "
                        "/usr/share/datasets/fashion-mnist) or of the CIFAR pickles; never downloaded")
    if model:
        g.add_argument("--model", default="preact_resnet18", help="zoo model name (default: %(default)s)")
        g.add_argument("--width", type=finite_float, default=0.25,
                       help="width multiplier on all channels (default: %(default)s)")
        g.add_argument("--policy", default="all", choices=("all", "paper"),
                       help="filter groups to partition/prune: all, or paper (official ResNet rule)")
        g.add_argument("--include", default=None, help="comma-separated fnmatch patterns of groups to keep")
        g.add_argument("--exclude", default=None, help="comma-separated fnmatch patterns of groups to drop")


def load_dataset(args):
    """The dataset of --dataset/--data-dir, or a CLIError naming the option."""
    from ..data import DATASETS, get_dataset
    if args.dataset not in DATASETS:
        raise CLIError(f"--dataset: unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.dataset.startswith("cifar") and args.data_dir is None:
        raise CLIError(f"--dataset {args.dataset} needs --data-dir (a directory in the CIFAR python-pickle "
                       f"layout; datasets are never downloaded)")
    try:
        return get_dataset(args.dataset, args.data_dir, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--data-dir: {e}") from None
    except OSError as e:  # unreadable: permissions, an I/O error
        where = f"{str(e.filename)!r}: " if e.filename else ""
        raise CLIError(f"--data-dir: {where}cannot be read ({e.strerror or e})") from None
    except MemoryError:  # the loaders bound what a file can claim by its size; a real dataset can still be too big
        raise CLIError(f"--dataset {args.dataset}: the data do not fit in this machine's memory") from None


def make_spec(args, dataset, *, workers: int = 1, workers_option: str = "--workers") -> dict:
    """The model spec of --model/--width/--policy/--include/--exclude, checked by building it once.

    The model's size is checked on the meta device before any memory is
    allocated, and every filter group must have at least `workers` filters
    (errors name `workers_option`).
    """
    from .. import engine
    from ..models import available_models
    if args.model not in available_models():
        raise CLIError(f"--model: unknown model {args.model!r}; available: {', '.join(available_models())}")
    if not (args.width > 0 and math.isfinite(args.width)):
        raise CLIError(f"--width must be a finite number > 0, got {args.width:g}")
    include = parse_list(args.include, str, "--include") if args.include else None
    exclude = parse_list(args.exclude, str, "--exclude") if args.exclude else None
    spec = engine.model_spec(args.model, dataset, width=args.width, policy=args.policy, include=include,
                             exclude=exclude)
    check_model_fits(spec, f"--width {args.width:g}")
    from ..training.discovery import ExampleInputError
    try:
        model, groups = engine.build_model(spec)
    except ExampleInputError as e:  # the model's own forward failed on this dataset's images
        size = "x".join(map(str, dataset.train_x.shape[1:]))
        raise CLIError(f"--model {args.model} cannot run on --dataset {dataset.name}'s {size} images "
                       f"({str(e.__cause__ or e)}); choose another --model or --dataset") from None
    except (ValueError, TypeError) as e:
        raise CLIError(f"--model {args.model} with --policy {args.policy}: {e}") from None
    except (MemoryError, RuntimeError) as e:  # fits the machine on paper, not in the memory free now
        if isinstance(e, RuntimeError) and "can't allocate memory" not in str(e):
            raise
        raise CLIError(f"--width {args.width:g}: {args.model} does not fit in the memory available "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    check_workers_fit(groups, workers, workers_option)
    if workers > dataset.train_x.shape[0]:  # each worker needs its own shard of the training images
        raise CLIError(f"{workers_option}: {workers} workers need at least as many training images; "
                       f"--dataset {dataset.name} has {dataset.train_x.shape[0]}")
    if workers > 1 and getattr(args, "execution", None) == "batched":
        reason = batched_unsupported(model)
        if reason is not None:
            raise CLIError(f"--execution batched cannot run --model {args.model}: {reason}; use --execution loop "
                           f"or auto")
    return spec


def memory_bytes() -> int | None:
    """The memory this process may use: physical memory, or less under an address-space limit (None: unknown)."""
    try:
        limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (AttributeError, ValueError, OSError):
        limits = []
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits, default=None)


def check_model_fits(spec: dict, option: str) -> None:
    """Refuse, naming `option`, a model whose parameters and buffers alone exceed this machine's memory.

    Counted on the meta device, so nothing is allocated; training needs
    several times this, so only models that cannot possibly fit are refused.
    """
    from ..models import get_model
    try:
        with torch.device("meta"):
            model = get_model(spec["model"], **spec["kwargs"])
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise CLIError(f"{option}: {spec['model']} would have tensors too large to represent ({e})") from None
    tensors = [*model.parameters(), *model.buffers()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    limit = memory_bytes()
    if limit is not None and nbytes > limit:
        params = sum(p.numel() for p in model.parameters())
        raise CLIError(f"{option}: {spec['model']} would have {params:,} parameters ({nbytes / 2 ** 30:,.1f} GiB), "
                       f"more than the {limit / 2 ** 30:,.1f} GiB of memory this process may use; use a smaller "
                       f"--width")


def check_workers_fit(groups, workers: int, option: str) -> None:
    """Every worker owns at least one filter of every group (of every conv group of a grouped one): refuse,
    naming `option`, groups with fewer; the same rule as the library's group check, said for the CLI."""
    small = sorted((g for g in groups if g.block_size < workers), key=lambda g: (g.block_size, g.name))
    if small:
        least = small[0]
        many, which = ((f"{len(small)} filter groups have", "those groups") if len(small) > 1
                       else ("1 filter group has", "that group"))
        size = f"{least.n} filters" + (f" in {least.conv_groups} conv groups of {least.block_size}"
                                       if least.conv_groups > 1 else "")
        raise CLIError(f"{option}: {many} fewer filters than {workers} workers (every worker owns at least one "
                       f"filter of every group); the smallest is {least.name!r} with {size}: use at most "
                       f"{least.block_size} workers, a larger --width, or --exclude {which}")
