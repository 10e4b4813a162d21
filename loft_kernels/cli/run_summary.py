"""What `loft run` derives from its units' results: the details dict (notes, comm, draws, savings) and the plots."""
from __future__ import annotations

from pathlib import Path

from .. import report

SEED_KEYS = ("no_prune", "ticket", "comm_bytes", "emerged_epoch", "no_prune_bn_recalibrated", "drawn_at")


def seed_entry(r: dict) -> dict:
    """The part of a unit's result that report.json keeps per seed."""
    return {k: r[k] for k in SEED_KEYS if k in r}


def mean_curve(rows: list[list[float]]) -> list[float]:
    n = min(len(r) for r in rows)  # runs stopped at different epochs: common prefix
    return [sum(r[i] for r in rows) / len(rows) for i in range(n)]


def settled_from(values: list[float], frac: float) -> int:
    """First index from which `values` stay within `frac` of their total change (first to last) of the last value."""
    last, span = values[-1], abs(values[0] - values[-1])
    return next(i for i in range(len(values)) if all(abs(v - last) <= frac * span for v in values[i:]))


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def draw_points(r: dict, auto: bool) -> dict:
    """label -> epoch of one seed's drawn tickets: initial/footrule/mask/end (auto) or 'epoch d', d counted in
    dense epochs as --draw-at counts them (LoFT-S under --loft-budget updates draws at its epoch S * d)."""
    epochs = sorted(int(e) for e in r["drawn_at"])
    if not auto:
        scale = r.get("epoch_scale", 1)
        return {f"epoch {e / scale:g}": e for e in epochs}
    end = len(r["loss_curve"])
    return {"initial weights": 0, "footrule emergence": r["emerged_epoch"]["footrule"],
            "mask emergence": r["emerged_epoch"]["mask"], "end of pretraining": end}


def savings(r: dict, epoch: int) -> dict:
    """What stopping pretraining at `epoch` would have saved against running to the end, for one seed."""
    end = len(r["loss_curve"])
    comm = r["comm_curve"]
    out = {"epochs_saved": end - epoch, "train_seconds_saved": sum(r["epoch_seconds"][epoch:]),
           "comm_bytes_saved": (comm[-1] - (comm[epoch - 1] if epoch else 0)) if comm else 0}
    if "samples_per_epoch" in r:  # samples all workers together pushed through the model (one step each)
        out.update(sample_steps_saved=(end - epoch) * r["samples_per_epoch"],
                   sample_steps_total=end * r["samples_per_epoch"])
    return out


def draws(results: dict, st: dict) -> dict:
    """Per method: the draw-epoch table (mean and per-seed accuracy per label) and the emergence savings."""
    auto = st["draw_at"] == "auto"
    out = {}
    for m, per in results.items():
        rows, save = {}, {}
        for seed, r in per.items():
            for label, e in draw_points(r, auto).items():
                cell = rows.setdefault(label, {"per_seed": {}})
                cell["per_seed"][str(seed)] = None if e is None else {"epoch": e, "acc": r["drawn_at"][str(e)]}
            for c in ("footrule", "mask") if auto else ():
                e, end = r["emerged_epoch"][c], str(len(r["loss_curve"]))
                save.setdefault(c, {})[str(seed)] = None if e is None else {
                    **savings(r, e), "ticket_acc_change": r["drawn_at"][str(e)] - r["drawn_at"][end]}
        for cell in rows.values():
            got = [v for v in cell["per_seed"].values() if v is not None]
            cell["mean_acc"] = _mean(v["acc"] for v in got) if len(got) == len(per) else None
        out[m] = {"rows": rows, "savings": save}
    return {"ratio": st["draw_ratio"], "methods": out}


def details(results, extras, st, wall, wall_total) -> dict:
    notes, settle = [], {}
    scale = _epoch_x(results)[0]
    for m, per in results.items():
        k = scale[m]
        if k > 1:
            notes.append(f"{m}: pretrained {k} x the epochs of dense training (--loft-budget updates), so each "
                         f"filter got as many updates; its epochs below are its own")
        f = mean_curve([r["footrule_to_final"] for r in per.values()])
        loss = mean_curve([r["loss_curve"] for r in per.values()])
        # footrule_to_final starts at epoch 0 (initial weights), the loss curve at epoch 1
        settle[m] = {"footrule_below_10pct_epoch": settled_from(f, 0.1),
                     "loss_within_10pct_epoch": settled_from(loss, 0.1) + 1}
        # the distance to the final ranking is zero at the final epoch by definition: settling there is no settling
        ranking = (f"stays below 10 % of its first value from epoch {settle[m]['footrule_below_10pct_epoch']}"
                   if settle[m]["footrule_below_10pct_epoch"] < len(f) - 1 else
                   "does not stay below 10 % of its first value before the final epoch")
        notes.append(f"{m}: footrule distance to the final ranking {ranking}; training loss stays within 10 % of its "
                     f"total drop from epoch {settle[m]['loss_within_10pct_epoch']}")
    dense = results.get("dense")
    if dense:
        for m, per in results.items():
            if m == "dense":
                continue
            for k in next(iter(per.values()))["ticket"]:
                gap = _mean(r["ticket"][k] for r in per.values()) - _mean(r["ticket"][k] for r in dense.values())
                notes.append(f"{m} ticket at {float(k) * 100:g} %: {gap:+.2f} points vs the dense-pretrained ticket "
                             f"(mean over seeds)")
    recal = {m: _mean(r["no_prune_bn_recalibrated"] for r in per.values()) for m, per in results.items()}
    return {"gpipe_bytes": {m: e["gpipe"] for m, e in extras.items()},
            "ddp_bytes": {m: e["ddp"] for m, e in extras.items()},
            # LoFT's bytes as the communication model predicts them (one sync per K steps over the whole run);
            # the measured comm_bytes equal them when the steps per epoch are a multiple of K, and are higher
            # otherwise by the extra sync at each epoch end.
            "loft_comm_model_bytes": {m: e["loft_model"] for m, e in extras.items()},
            "no_prune_bn_recalibrated": recal, "tickets": {m: e["tickets"] for m, e in extras.items()},
            "settling": settle, "draws": draws(results, st) if st["draw_at"] else None,
            "wall_seconds_per_method": wall, "wall_seconds": wall_total, "notes": notes,
            "draw_ratio": st["draw_ratio"] if st["draw_at"] else None}


def _epoch_x(results: dict) -> tuple[dict, str]:
    """Per method, the factor its epochs are divided by on the plots' x axis, and the axis label: LoFT-S under
    --loft-budget updates runs S epochs per dense epoch (the same updates per filter), so it is plotted at epoch / S."""
    scale = {m: next(iter(per.values())).get("epoch_scale", 1) for m, per in results.items()}
    label = "epoch" if all(v == 1 for v in scale.values()) else \
        "dense epoch (LoFT-S's epoch / S: the same updates per filter)"
    return scale, label


def plots(out: Path, results, extras, st, rep: dict | None = None) -> None:
    scale, xlabel = _epoch_x(results)
    f = {m: mean_curve([r["footrule_to_final"] for r in per.values()]) for m, per in results.items()}
    report.plot_lines(f, out / "footrule_to_final.png", x={m: [i / scale[m] for i in range(len(v))]
                                                           for m, v in f.items()},
                      title="footrule distance to the final ranking (epoch 0: initial weights)",
                      xlabel=xlabel, ylabel="F(epoch, final), summed over groups (mean over seeds)")
    if rep is not None:
        report.plot_ticket_vs_ratio(rep, out / "ticket_vs_ratio.png")
    report.plot_heatmaps({m: e["matrix"] for m, e in extras.items()}, next(iter(extras.values()))["groups"], out)
    curves = {m: {"train_loss": mean_curve([r["loss_curve"] for r in per.values()]),
                  "test_acc": mean_curve([r["test_curve"] for r in per.values()])} for m, per in results.items()}
    report.plot_curves(curves, out / "curves.png", xlabel=xlabel,
                       x={m: [(i + 1) / scale[m] for i in range(len(c["train_loss"]))] for m, c in curves.items()})
    if st["draw_at"]:
        xs, ys = {}, {}
        for m, per in results.items():  # mean over the seeds that drew at each epoch (emergence epochs differ)
            by_epoch: dict[int, list[float]] = {}
            for r in per.values():
                for e, acc in r["drawn_at"].items():
                    by_epoch.setdefault(int(e), []).append(acc)
            xs[m] = [e / scale[m] for e in sorted(by_epoch)]
            ys[m] = [_mean(by_epoch[e]) for e in sorted(by_epoch)]
        report.plot_lines(ys, out / "ticket_vs_epoch.png", x=xs,
                          title=f"ticket ({st['draw_ratio'] * 100:g} % pruned) drawn at epoch e, fine-tuned",
                          xlabel=f"{xlabel} the ticket was drawn at",
                          ylabel="test accuracy (%, mean over the seeds that drew there)")


def run_info(wall_seconds: float, load_at_start: tuple, device) -> dict:
    """When, where and how the job ran, for the report's last section."""
    import os
    import platform
    import shlex
    import sys
    import time

    import torch
    return {"date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "command": shlex.join(["loft", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith(
                ("loft", "__main__.py")) else "(called from Python)",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load average (1 min) at start / end": f"{load_at_start[0]:.1f} / {os.getloadavg()[0]:.1f}",
            "wall time": f"{wall_seconds:.0f} s ({wall_seconds / 60:.1f} min), report and plots included"}
