"""`loft run`: the main job. Pretrain with each method and seed, track filter rankings, draw and fine-tune tickets.

For every seed and method (dense; loft-S = LoFT with S simulated workers):
pretrain (filter scores snapshotted every epoch), note the epoch each
emergence criterion fired, prune at each --ratios (top filters by L2 norm),
fine-tune each ticket and evaluate it. Then print a table shaped like the
paper's and write to --out (default runs/<timestamp>): report.json, report.md,
details.json, footrule_to_final.png, footrule_heatmap_<group>.png,
curves.png, and with --draw-at ticket_vs_epoch.png. Every unit of work lives
under --out/units/<method>/seed<k>/ with its own checkpoints, so --resume
continues a killed job where it stopped.
"""
from __future__ import annotations

import argparse
import functools
import re
import time
from pathlib import Path

import torch

from .. import engine, report
from ..comm_model import comm_cost
from ..tickets import draw
from . import _common as U
from .pretrain import add_loft_args, add_train_args, emergence_options, train_config

HELP = "the main job: dense vs LoFT-2/4 pretraining, tickets pruned 50 and 80 percent, emergence, table, plots"

# Defaults (tuned on digits, see python/README.md) and what --quick changes.
FULL = {"seeds": 3, "epochs": 20, "finetune_epochs": 20}
QUICK = {"seeds": 1, "epochs": 8, "finetune_epochs": 5}


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_data_model(p)
    g = p.add_argument_group("the job")
    g.add_argument("--methods", default="dense,loft-2,loft-4",
                   help="comma-separated: dense and/or loft-S (S simulated workers) (default: %(default)s)")
    g.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds, --seed, --seed+1, ... (default: {FULL['seeds']}; --quick: {QUICK['seeds']})")
    g.add_argument("--ratios", default="0.5,0.8", help="pruning ratios of the tickets (default: %(default)s)")
    g.add_argument("--draw-at", default=None,
                   help="comma-separated epochs: also draw tickets from those epochs' weights, fine-tune them and "
                        "plot ticket_vs_epoch.png")
    g.add_argument("--draw-ratio", type=float, default=None,
                   help="pruning ratio of the --draw-at tickets (default: the largest of --ratios)")
    g.add_argument("--quick", action="store_true",
                   help=f"a short version: {QUICK['seeds']} seed, {QUICK['epochs']} pretraining and "
                        f"{QUICK['finetune_epochs']} fine-tuning epochs (unless given explicitly)")
    add_train_args(p, epochs=None, lr=0.05, epochs_help=f"pretraining epochs (default: {FULL['epochs']}; "
                                                        f"--quick: {QUICK['epochs']})")
    g.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"fine-tuning epochs per ticket (default: {FULL['finetune_epochs']}; --quick: "
                        f"{QUICK['finetune_epochs']})")
    g.add_argument("--finetune-lr", type=float, default=0.05,
                   help="fine-tuning learning rate, cosine-annealed (default: %(default)s)")
    add_loft_args(p)
    p.add_argument("--resume", action="store_true", help="continue the job in --out where it stopped")
    U.add_common(p)
    return p


def parse_methods(text: str) -> list[tuple[str, int]]:
    methods = []
    for m in U.parse_list(text, str, "--methods"):
        m = m.strip()
        match = re.fullmatch(r"loft-(\d+)", m)
        if m == "dense":
            methods.append((m, 1))
        elif match and int(match.group(1)) >= 2:
            methods.append((m, int(match.group(1))))
        else:
            raise U.CLIError(f"--methods: {m!r} is not a method; use dense or loft-S with S >= 2 (e.g. loft-4)")
    if len({m for m, _ in methods}) != len(methods):
        raise U.CLIError(f"--methods lists a method twice: {text!r}")
    return methods


def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    for key in base:
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    U.check_positive(args.seeds, "--seeds")
    U.check_positive(args.finetune_epochs, "--finetune-epochs")
    methods = parse_methods(args.methods)
    ratios = sorted({U.check_ratio(r, "--ratios") for r in U.parse_list(args.ratios, float, "--ratios")})
    draw_at = sorted(set(U.parse_list(args.draw_at, int, "--draw-at"))) if args.draw_at else []
    if any(not 0 <= e <= args.epochs for e in draw_at):
        raise U.CLIError(f"--draw-at epochs must lie in 0..{args.epochs} (0: the initial weights), got {draw_at}")
    draw_ratio = U.check_ratio(args.draw_ratio, "--draw-ratio") if args.draw_ratio is not None else max(ratios)
    return {"methods": methods, "ratios": ratios, "draw_at": draw_at, "draw_ratio": draw_ratio,
            "seeds": [args.seed + i for i in range(args.seeds)]}


class Job:
    """The settings shared by every unit of the job, and the units: one pretraining, its tickets, its draws."""

    def __init__(self, args, st: dict, out: Path, dataset, spec: dict, device, emergence: dict, ft_cfg):
        self.args, self.st, self.out, self.dataset, self.spec = args, st, out, dataset, spec
        self.device, self.emergence, self.ft_cfg = device, emergence, ft_cfg
        self.log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
        self.progress = U.show_progress(args.quiet)
        self.example = dataset.train_x[:args.batch_size].to(device)

    def unit(self, method: str, workers: int, seed: int) -> tuple[dict, dict]:
        """Pretrain + tickets (+ draws) for one method and seed: (per-seed result, extras for the first seed)."""
        unit = self.out / "units" / method / f"seed{seed}"
        cfg = train_config(self.args, workers, False)
        self.log(f"== {method}, seed {seed}: pretraining {cfg.epochs} epochs")
        summary = engine.pretrain_run(unit / "pretrain", dataset=self.dataset, spec=self.spec, cfg=cfg, seed=seed,
                                      device=self.device, emergence=self.emergence, resume=True,
                                      keep_epochs=[e for e in self.st["draw_at"] if e], progress=self.progress,
                                      log=None if self.args.quiet else (lambda m: self.log("   " + m)))
        model, groups, tracker = engine.load_pretrained(unit / "pretrain")
        model = model.to(self.device)
        history = U.read_json(unit / "pretrain" / "metrics.json", "metrics")
        first = seed == self.st["seeds"][0]
        res = {"no_prune": summary["final"]["test_acc"], "ticket": {},
               "no_prune_bn_recalibrated": summary["test_acc_bn_recalibrated"],
               "comm_bytes": int(summary["comm_bytes_total"] or 0), "emerged_epoch": dict(summary["emerged_epoch"]),
               "loss_curve": [r["train_loss"] for r in history], "test_curve": [r["test_acc"] for r in history],
               "footrule_to_final": tracker.footrule_to(tracker.tags[-1]).total.tolist()}
        extras = {"tickets": {}}
        for ratio in self.st["ratios"]:
            key = report.ratio_key(ratio)
            pruned, kept, metrics = draw(model, groups, ratio, self.example, speed_repeats=10 if first else 0)
            res["ticket"][key] = self.finetune(unit / f"ticket-{key}", pruned, groups, kept, ratio, seed)
            extras["tickets"][key] = metrics
            self.log(f"   ticket {ratio * 100:g} %: {res['ticket'][key]:.2f}% "
                     f"(params {metrics['params_before']} -> {metrics['params_after']})")
        if self.st["draw_at"]:
            res["drawn_at"] = {str(e): self.drawn(unit, e, seed) for e in self.st["draw_at"]}
            self.log("   tickets drawn at epochs " + ", ".join(f"{e}: {a:.2f}%" for e, a in res["drawn_at"].items()))
        if first:
            extras["matrix"], extras["groups"] = tracker.footrule_matrix(), tracker.group_names
            samples = summary["epochs_run"] * summary["samples_per_epoch"]
            cost = functools.partial(comm_cost, model, self.example, workers=workers,
                                     batch_size=self.args.batch_size, samples=samples)
            extras["gpipe"] = int(cost(method="gpipe").total_bytes) if workers > 1 else None
            extras["loft_model"] = int(cost(method="loft", sync_every=self.args.sync_every, state=self.args.state,
                                            groups=groups).total_bytes) if workers > 1 else None
        return res, extras

    def finetune(self, out: Path, pruned, groups, kept, ratio: float, seed: int) -> float:
        torch.manual_seed(seed)
        return engine.finetune_run(out, model=pruned, spec=self.spec, groups=groups, kept=kept, ratio=ratio,
                                   dataset=self.dataset, cfg=self.ft_cfg, seed=seed, device=self.device,
                                   resume=True, progress=self.progress)["test_acc"]

    def drawn(self, unit: Path, epoch: int, seed: int) -> float:
        """Fine-tuned accuracy of the ticket drawn from the weights of `epoch` (0: the initial weights)."""
        name = f"epoch_{epoch:03d}.pt" if epoch else "init.pt"
        model, groups = engine.full_model(engine.load_model_file(unit / "pretrain" / name))
        pruned, kept, _ = draw(model.to(self.device), groups, self.st["draw_ratio"], self.example)
        return self.finetune(unit / f"drawn-epoch{epoch}", pruned, groups, kept, self.st["draw_ratio"], seed)


def run(args) -> int:
    t_job = time.perf_counter()
    st = _settings(args)
    base_cfg = train_config(args)
    ft_cfg = train_config(args, schedule="cosine", epochs=args.finetune_epochs, lr=args.finetune_lr)
    emergence = emergence_options(args)
    out_text = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    U.check_out_free(out_text, resume=args.resume)
    device = U.resolve_device(args.device)
    dataset = U.load_dataset(args)
    spec = U.make_spec(args, dataset)
    max_workers = max(s for _, s in st["methods"])
    small = [f"{g.name} (n={g.n})" for g in engine.build_model(spec)[1] if g.n < max_workers]
    if small:
        raise U.CLIError(f"--methods: groups {', '.join(small)} have fewer filters than {max_workers} workers; "
                         f"raise --width or use fewer workers")
    config = {"command": "run", "dataset": args.dataset, "data_dir": args.data_dir, "spec": spec,
              "methods": [m for m, _ in st["methods"]], "seeds": st["seeds"], "ratios": st["ratios"],
              "draw_at": st["draw_at"], "draw_ratio": st["draw_ratio"], "pretrain": base_cfg.to_dict(),
              "finetune": ft_cfg.to_dict(), "emergence": emergence, "quick": args.quick, "device": str(device)}
    if args.resume:
        U.check_same_config(out_text, config, [k for k in config if k not in ("device", "quick")])
    out = U.prepare_out(out_text, resume=args.resume)
    if not args.resume:
        U.write_config(out, config)

    job = Job(args, st, out, dataset, spec, device, emergence, ft_cfg)
    results: dict[str, dict[int, dict]] = {}
    extras: dict[str, dict] = {}
    wall: dict[str, float] = {}
    for method, workers in st["methods"]:
        t0 = time.perf_counter()
        for seed in st["seeds"]:
            res, ex = job.unit(method, workers, seed)
            results.setdefault(method, {})[seed] = res
            if "matrix" in ex:
                extras[method] = ex
        wall[method] = time.perf_counter() - t0

    rep = report.build_report(args.dataset, st["seeds"], {m: {s: _seed_entry(r) for s, r in per.items()}
                                                          for m, per in results.items()})
    details = _details(results, extras, st, wall, time.perf_counter() - t_job)
    report.write_report(out, rep, details)
    _plots(out, results, extras, st)
    print(report.format_table(rep, details["gpipe_bytes"], details["no_prune_bn_recalibrated"]))
    for note in details["notes"]:
        job.log(note)
    job.log(f"wrote {out}/report.json, report.md and plots ({details['wall_seconds']:.0f}s)")
    return 0


def _seed_entry(r: dict) -> dict:
    keep = ("no_prune", "ticket", "comm_bytes", "emerged_epoch", "no_prune_bn_recalibrated", "drawn_at")
    return {k: r[k] for k in keep if k in r}


def _mean(rows: list[list[float]]) -> list[float]:
    n = min(len(r) for r in rows)  # runs stopped at different epochs: common prefix
    return [sum(r[i] for r in rows) / len(rows) for i in range(n)]


def _settled_from(values: list[float], frac: float) -> int:
    """First index from which `values` stay within `frac` of their total drop above the last value."""
    lo, hi = values[-1], values[0]
    return next(i for i in range(len(values)) if all(v - lo <= frac * (hi - lo) for v in values[i:]))


def _details(results, extras, st, wall, wall_total) -> dict:
    notes, settle = [], {}
    for m, per in results.items():
        f = _mean([r["footrule_to_final"] for r in per.values()])
        loss = _mean([r["loss_curve"] for r in per.values()])
        # footrule_to_final starts at epoch 0 (initial weights), the loss curve at epoch 1
        settle[m] = {"footrule_below_10pct_epoch": _settled_from(f, 0.1),
                     "loss_within_10pct_epoch": _settled_from(loss, 0.1) + 1}
        notes.append(f"{m}: footrule distance to the final ranking stays below 10 % of its first value from epoch "
                     f"{settle[m]['footrule_below_10pct_epoch']}; training loss stays within 10 % of its total drop "
                     f"from epoch {settle[m]['loss_within_10pct_epoch']}")
    dense = results.get("dense")
    if dense:
        for m, per in results.items():
            if m == "dense":
                continue
            for k in next(iter(per.values()))["ticket"]:
                gap = (sum(r["ticket"][k] for r in per.values()) - sum(r["ticket"][k] for r in dense.values())) \
                    / len(per)
                notes.append(f"{m} ticket at {float(k) * 100:g} %: {gap:+.2f} points vs the dense-pretrained ticket "
                             f"(mean over seeds)")
    recal = {m: sum(r["no_prune_bn_recalibrated"] for r in per.values()) / len(per) for m, per in results.items()}
    return {"gpipe_bytes": {m: e["gpipe"] for m, e in extras.items()},
            # LoFT's bytes as the communication model predicts them (one sync per K steps over the whole run);
            # the measured comm_bytes equal them when the steps per epoch are a multiple of K (the defaults),
            # and are higher otherwise by the extra sync at each epoch end.
            "loft_comm_model_bytes": {m: e["loft_model"] for m, e in extras.items()},
            "no_prune_bn_recalibrated": recal, "tickets": {m: e["tickets"] for m, e in extras.items()},
            "settling": settle, "wall_seconds_per_method": wall, "wall_seconds": wall_total, "notes": notes,
            "draw_ratio": st["draw_ratio"] if st["draw_at"] else None}


def _plots(out: Path, results, extras, st) -> None:
    f = {m: _mean([r["footrule_to_final"] for r in per.values()]) for m, per in results.items()}
    report.plot_lines(f, out / "footrule_to_final.png", x={m: range(len(v)) for m, v in f.items()},
                      title="footrule distance to the final ranking (epoch 0: initial weights)",
                      xlabel="epoch", ylabel="F(epoch, final), summed over groups (mean over seeds)")
    report.plot_heatmaps({m: e["matrix"] for m, e in extras.items()}, next(iter(extras.values()))["groups"], out)
    report.plot_curves({m: {"train_loss": _mean([r["loss_curve"] for r in per.values()]),
                            "test_acc": _mean([r["test_curve"] for r in per.values()])}
                        for m, per in results.items()}, out / "curves.png")
    if st["draw_at"]:
        series = {m: [sum(r["drawn_at"][str(e)] for r in per.values()) / len(per) for e in st["draw_at"]]
                  for m, per in results.items()}
        report.plot_lines(series, out / "ticket_vs_epoch.png", x={m: st["draw_at"] for m in series},
                          title=f"ticket ({st['draw_ratio'] * 100:g} % pruned) drawn at epoch e, fine-tuned",
                          xlabel="epoch the ticket was drawn at", ylabel="test accuracy (%)")
