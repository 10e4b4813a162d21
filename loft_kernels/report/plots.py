"""The report's plots, on matplotlib's file-only Agg backend (an optional extra), each written atomically."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .._optional import require
from .results import ticket_stats, validate_report


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported at the first plot (plots are an extra)."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def _save(fig, path: Path) -> Path:
    # Write beside the target and rename, like every other file the library writes.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def plot_lines(series: Mapping[str, Sequence[float]], path, *, title: str, xlabel: str, ylabel: str,
               x: Mapping[str, Sequence[float]] | None = None, logy: bool = False) -> Path:
    """One line per key of `series` (x defaults to 1..len)."""
    if not series:
        raise ValueError("series must not be empty")
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for name, ys in series.items():
        xs = list(x[name]) if x is not None else list(range(1, len(ys) + 1))
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r} has {len(ys)} values but {len(xs)} x positions")
        ax.plot(xs, list(ys), marker="o", markersize=3, label=name)
    if logy:
        ax.set_yscale("symlog", linthresh=1e-2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_ticket_vs_ratio(report: Mapping, path) -> Path:
    """ticket accuracy against the pruning ratio: one line per method and control, mean over seeds, spread as bars."""
    validate_report(report)
    fig, ax = _pyplot().subplots(figsize=(6.5, 4.2))
    for name, per in ticket_stats(report).items():
        ratios = sorted(per, key=float)
        control = name not in report["methods"]
        ax.errorbar([float(r) * 100 for r in ratios], [per[r]["mean"] for r in ratios],
                    yerr=[per[r]["spread"] or 0.0 for r in ratios], marker="s" if control else "o", markersize=4,
                    capsize=3, linestyle="--" if control else "-", label=f"control: {name}" if control else name)
    bars = "bars: ± 1 std" if len(report["seeds"]) > 1 else "one seed: no spread"
    ax.set(title=f"fine-tuned tickets on {report['dataset']} ({len(report['seeds'])} seed(s); {bars})",
           xlabel="filters pruned per group (%)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_curves(histories: Mapping[str, Mapping[str, Sequence[float]]], path, *,
                x: Optional[Mapping[str, Sequence[float]]] = None, xlabel: str = "epoch") -> Path:
    """Training loss and test accuracy per epoch, one line per method (histories[m]['train_loss'/'test_acc']);
    `x`: per method, the x value of each epoch (default 1, 2, ...)."""
    if not histories:
        raise ValueError("histories must not be empty")
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(11, 4))
    for name, h in histories.items():
        xs = list(x[name]) if x is not None else list(range(1, len(h["train_loss"]) + 1))
        a1.plot(xs[:len(h["train_loss"])], h["train_loss"], label=name)
        a2.plot(xs[:len(h["test_acc"])], h["test_acc"], label=name)
    a1.set(title="pretraining: training loss", xlabel=xlabel, ylabel="loss")
    a2.set(title="pretraining: test accuracy of the full model", xlabel=xlabel, ylabel="accuracy (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    return _save(fig, Path(path))


def safe_name(name: str) -> str:
    """A group name as a file-name part: 'layer2.1.conv1' -> 'layer2.1.conv1', odd characters -> '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def plot_heatmaps(matrices: Mapping[str, "object"], group_names: Sequence[str], out_dir,
                  first_epoch: int = 0) -> list[Path]:
    """footrule_heatmap_<group>.png: the T x T footrule matrix of each group, one panel per method.

    matrices[method] is a [groups, T, T] array-like (torch tensor or numpy) over
    consecutive epochs starting at `first_epoch` (0: the initial weights).
    """
    if not matrices:
        raise ValueError("matrices must not be empty")
    paths = []
    for g, gname in enumerate(group_names):
        fig, axes = _pyplot().subplots(1, len(matrices), figsize=(4.4 * len(matrices), 3.8), squeeze=False,
                                 layout="constrained")
        for ax, (method, mat) in zip(axes[0], matrices.items()):
            m = mat[g]
            m = m.cpu().numpy() if hasattr(m, "cpu") else m
            lo = first_epoch - 0.5
            im = ax.imshow(m, origin="lower", cmap="viridis",
                           extent=(lo, lo + m.shape[1], lo, lo + m.shape[0]))
            ax.set(title=method, xlabel="epoch b", ylabel="epoch a")
            fig.colorbar(im, ax=ax, shrink=0.85)
        fig.suptitle(f"footrule F(epoch a, epoch b): {gname}")
        paths.append(_save(fig, Path(out_dir) / f"footrule_heatmap_{safe_name(gname)}.png"))
    return paths
