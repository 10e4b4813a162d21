"""`loft run`: the main job. Pretrain with each method and seed, track filter rankings, draw and fine-tune tickets.

For every seed and method (dense; loft-S = LoFT with S simulated workers):
pretrain (filter scores snapshotted every epoch), note the epoch each
emergence criterion fired, prune at each --ratios (top filters by L2 norm),
fine-tune each ticket and evaluate it. The --controls are fine-tuned the same
way at every ratio: the ticket drawn from the initial weights, and the same
number of filters per group kept at random from the dense-pretrained weights;
report.json's "discrimination" says whether the pretrained ticket beats them. With --draw-at, tickets are also drawn
from earlier weights (auto: the initial weights, the epoch each emergence
criterion fired, and the end) and fine-tuned the same way. Then print a table
shaped like the paper's and write to --out (default runs/<timestamp>):
report.json, report.md, details.json, footrule_to_final.png,
footrule_heatmap_<group>.png, curves.png, ticket_vs_ratio.png and, with --draw-at,
ticket_vs_epoch.png. Every unit of work lives under --out/units/<method>/seed<k>/
with its own checkpoints, so --resume continues a killed job where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import time
from pathlib import Path

import torch

from .. import engine, report
from ..comm_model import comm_cost
from ..data import stratified_subset
from ..tickets import draw, prune
from . import _common as U
from . import run_presets
from .pretrain import add_loft_args, add_train_args, emergence_options, train_config
from .run_summary import details, plots, run_info, seed_entry

HELP = ("the main job: dense vs LoFT-2/4 pretraining, tickets pruned 50-95 percent against two controls, emergence, "
        "table, plots")
CONTROLS = ("initial-weights", "random-filters")
BUDGETS = ("epochs", "updates")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help=HELP, description=HELP + ".\n\n" + __doc__.split("\n\n", 1)[1],
                       epilog=run_presets.describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    U.add_data_model(p)
    g = p.add_argument_group("the job")
    g.add_argument("--methods", default="dense,loft-2,loft-4",
                   help="comma-separated: dense and/or loft-S (S simulated workers) (default: %(default)s)")
    g.add_argument("--seeds", type=int, help="number of seeds, --seed, --seed+1, ...")
    g.add_argument("--ratios", help="pruning ratios of the tickets: fractions in (0, 1) or percents in (0, 100), "
                                    "e.g. 50,80,90,95")
    g.add_argument("--controls", default=",".join(CONTROLS),
                   help="control tickets fine-tuned exactly like the tickets, at every ratio: initial-weights (drawn "
                        "from the initial weights) and/or random-filters (the same number of filters per group kept "
                        "at random from the pretrained weights), or none (default: %(default)s)")
    g.add_argument("--draw-at", help="also draw tickets from earlier weights, fine-tune them and plot "
                                     "ticket_vs_epoch.png: comma-separated epochs (0: the initial weights), "
                                     "auto (0, each emergence epoch, the end) or none")
    g.add_argument("--draw-ratio", type=U.finite_float, default=None,
                   help="pruning ratio of the --draw-at tickets (default: the largest of --ratios)")
    g.add_argument("--train-samples", type=int,
                   help="train on a class-balanced subset of this many training images (0: all)")
    g.add_argument("--test-samples", type=int,
                   help="evaluate on a class-balanced subset of this many test images (0: all)")
    g.add_argument("--quick", action="store_true", help="a short version (1 seed, few epochs) for smoke tests")
    g.add_argument("--full", action="store_true", help="the long multi-seed version (per dataset, see below)")
    add_train_args(p, epochs=None, lr=None, batch_size=None, epochs_help="pretraining epochs")
    g.add_argument("--batch-split", choices=("per-worker", "global"),
                   help="pretraining batch of LoFT-S: per-worker (each worker takes --batch-size samples per step) "
                        "or global (each takes --batch-size / S, so every method takes the same number of steps "
                        "over the same samples per epoch) (default: per dataset, see below)")
    g.add_argument("--loft-budget", choices=BUDGETS,
                   help="pretraining length of LoFT-S: epochs (--epochs, as dense training; each worker passes over "
                        "its 1/S of the data per epoch, so each filter gets 1/S of dense training's updates) or "
                        "updates (S x --epochs, so each filter gets as many updates as in dense training; --draw-at "
                        "epochs then count dense epochs, epoch e being LoFT-S's epoch e x S) "
                        "(default: per dataset, see below)")
    g.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs per ticket")
    g.add_argument("--finetune-lr", type=U.finite_float, help="fine-tuning learning rate, cosine-annealed")
    g.add_argument("--finetune-weight-decay", type=U.finite_float,
                   help="fine-tuning weight decay (default: per dataset; else --weight-decay)")
    add_loft_args(p)
    p.add_argument("--resume", action="store_true", help="continue the job in --out where it stopped")
    U.add_common(p)
    run_presets.make_dataset_dependent(p)
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


def parse_ratios(text: str) -> list[float]:
    """'0.5,0.8' or '50,80' (percents; also '50%') -> sorted distinct fractions, each in (0, 1)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise U.CLIError("--ratios must not be empty")
    try:
        values = [float(t.rstrip("%")) for t in items]
    except ValueError:
        raise U.CLIError(f"--ratios must be a comma-separated list of numbers, got {text!r}") from None
    # "80%" is a percent; plain numbers are fractions, or percents when every plain number is >= 1 (50,80,90,95).
    plain_percent = all(v >= 1 for t, v in zip(items, values) if not t.endswith("%"))
    ratios = [v / 100 if t.endswith("%") or plain_percent else v for t, v in zip(items, values)]
    bad = [t for t, r in zip(items, ratios) if not 0 < r < 1]
    if bad:
        raise U.CLIError(f"--ratios: {', '.join(bad)} is not a pruning ratio; give fractions in (0, 1) such as "
                         f"0.5,0.8 or percents in (0, 100) such as 50,80 (not both in one list), got {text!r}")
    ratios = sorted(set(ratios))
    keys: dict[str, float] = {}
    for r in ratios:  # the report, the tables and the ticket folders name a ratio by its key
        key = report.ratio_key(r)
        if keys.setdefault(key, r) != r:
            raise U.CLIError(f"--ratios: {keys[key]!r} and {r!r} are both ratio {key}; give "
                             f"ratios that differ in their first six significant digits")
    return ratios


def parse_controls(text: str) -> list[str]:
    if text.strip() == "none":
        return []
    controls = [c.strip() for c in U.parse_list(text, str, "--controls")]
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise U.CLIError(f"--controls: {', '.join(map(repr, unknown))} is not a control; use "
                         f"{' and/or '.join(CONTROLS)}, or none")
    return [c for c in CONTROLS if c in controls]


def _draw_at(text: str, epochs: int):
    """'auto' | [] (none) | sorted epochs."""
    if text.strip() in ("auto", "none"):
        return "auto" if text.strip() == "auto" else []
    draw_at = sorted(set(U.parse_list(text, int, "--draw-at")))
    if any(not 0 <= e <= epochs for e in draw_at):
        raise U.CLIError(f"--draw-at epochs must lie in 0..{epochs} (0: the initial weights), got {draw_at}")
    return draw_at


# Far beyond any real job (each seed is a pretraining per method; every epoch may be kept on disk), and small
# enough that the lists of seeds and kept epochs cannot exhaust memory before the first epoch runs.
MOST_SEEDS, MOST_EPOCHS = 10_000, 100_000


def _settings(args) -> dict:
    length = run_presets.apply(args)
    U.check_positive(args.seeds, "--seeds", most=MOST_SEEDS)
    U.check_positive(args.finetune_epochs, "--finetune-epochs", most=MOST_EPOCHS)
    U.check_non_negative(args.weight_decay, "--weight-decay")  # first: the fine-tuning's defaults to it
    U.check_non_negative(args.finetune_weight_decay, "--finetune-weight-decay")
    U.check_non_negative(args.train_samples, "--train-samples")
    U.check_non_negative(args.test_samples, "--test-samples")
    methods = parse_methods(args.methods)
    ratios = parse_ratios(args.ratios)
    draw_at = _draw_at(args.draw_at, U.check_positive(args.epochs, "--epochs", most=MOST_EPOCHS))
    draw_ratio = U.check_ratio(args.draw_ratio, "--draw-ratio") if args.draw_ratio is not None else max(ratios)
    if args.batch_split == "global":
        uneven = [m for m, s in methods if args.batch_size % s]
        if uneven:
            raise U.CLIError(f"--batch-split global: --batch-size {args.batch_size} does not split evenly over the "
                             f"workers of {', '.join(uneven)}; use a multiple of their worker counts")
    if args.loft_budget == "updates" and args.batch_split == "global":
        raise U.CLIError("--loft-budget updates with --batch-split global: under global each filter already gets "
                         "as many updates as in dense training; use one of them")
    names = [m for m, _ in methods]
    return {"methods": methods, "ratios": ratios, "draw_at": draw_at, "draw_ratio": draw_ratio, "length": length,
            "controls": parse_controls(args.controls),
            # the random-filter control keeps filters of the dense-pretrained weights (or the first method's)
            "control_source": "dense" if "dense" in names else names[0],
            "seeds": [args.seed + i for i in range(args.seeds)]}


class Job:
    """The settings shared by every unit of the job, and the units: one pretraining, its tickets, its draws."""

    def __init__(self, args, st: dict, out: Path, dataset, spec: dict, device, emergence: dict, ft_cfg):
        self.args, self.st, self.out, self.dataset, self.spec = args, st, out, dataset, spec
        self.device, self.emergence, self.ft_cfg = device, emergence, ft_cfg
        self.log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
        self.progress = U.show_progress(args.quiet)
        self.example = dataset.train_x[:args.batch_size].to(device)

    def epoch_scale(self, workers: int) -> int:
        """LoFT-S's epochs per --epochs epoch: S under --loft-budget updates, else 1."""
        return workers if self.args.loft_budget == "updates" else 1

    def _emergence(self, workers: int) -> dict:
        """The emergence options of one method: LoFT-S under --loft-budget updates is judged every S epochs (one
        dense epoch's updates per filter), so its criteria mean what they mean for dense training."""
        scale = self.epoch_scale(workers)
        return self.emergence if scale == 1 else {**self.emergence, "every": scale}

    def _keep_epochs(self, workers: int) -> list[int]:
        if self.st["draw_at"] == "auto":  # emergence epochs are known only afterwards: keep every epoch
            return list(range(1, self.args.epochs * self.epoch_scale(workers) + 1))
        return [e * self.epoch_scale(workers) for e in self.st["draw_at"] if e]

    def unit(self, method: str, workers: int, seed: int) -> tuple[dict, dict]:
        """Pretrain + tickets (+ draws) for one method and seed: (per-seed result, extras for the first seed)."""
        unit = self.out / "units" / method / f"seed{seed}"
        cfg = train_config(self.args, workers, False, epochs=self.args.epochs * self.epoch_scale(workers))
        if self.args.batch_split == "global":
            cfg = dataclasses.replace(cfg, batch_size=self.args.batch_size // workers)
        self.log(f"== {method}, seed {seed}: pretraining {cfg.epochs} epochs")
        summary = engine.pretrain_run(unit / "pretrain", dataset=self.dataset, spec=self.spec, cfg=cfg, seed=seed,
                                      device=self.device, emergence=self._emergence(workers), resume=True,
                                      keep_epochs=self._keep_epochs(workers), progress=self.progress,
                                      log=None if self.args.quiet else (lambda m: self.log("   " + m)))
        model, groups, tracker = engine.load_pretrained(unit / "pretrain")
        model = model.to(self.device)
        history = U.read_json(unit / "pretrain" / "metrics.json", "metrics", list)
        first = seed == self.st["seeds"][0]
        res = {"no_prune": summary["final"]["test_acc"], "ticket": {},
               "no_prune_bn_recalibrated": summary["test_acc_bn_recalibrated"],
               "comm_bytes": int(summary["comm_bytes_total"] or 0), "emerged_epoch": dict(summary["emerged_epoch"]),
               "loss_curve": [r["train_loss"] for r in history], "test_curve": [r["test_acc"] for r in history],
               "epoch_seconds": [r["seconds"] for r in history], "workers": workers,
               "epoch_scale": self.epoch_scale(workers),
               "comm_curve": [int(r.get("comm_bytes_sent", 0)) * workers for r in history],
               "footrule_to_final": tracker.footrule_to(tracker.tags[-1]).total.tolist()}
        res["samples_per_epoch"] = summary["samples_per_epoch"]
        extras = {"tickets": {}}
        if method == self.st["control_source"]:
            res["controls"] = self.controls(unit, model, groups, seed)
        for ratio in self.st["ratios"]:
            key = report.ratio_key(ratio)
            pruned, kept, metrics = draw(model, groups, ratio, self.example, speed_repeats=10 if first else 0)
            res["ticket"][key] = self.finetune(unit / f"ticket-{key}", pruned, groups, kept, ratio, seed)
            extras["tickets"][key] = metrics
            self.log(f"   ticket {ratio * 100:g} %: {res['ticket'][key]:.2f}% "
                     f"(params {metrics['params_before']} -> {metrics['params_after']})")
        if self.st["draw_at"]:
            res["drawn_at"] = {str(e): self.drawn(unit, e, seed, len(history), res)
                               for e in self._draw_epochs(res["emerged_epoch"], len(history), workers)}
            self.log("   tickets drawn at epochs " + ", ".join(f"{e}: {a:.2f}%" for e, a in res["drawn_at"].items()))
        if first:
            extras["matrix"], extras["groups"] = tracker.footrule_matrix(), tracker.group_names
            samples = summary["epochs_run"] * summary["samples_per_epoch"]
            cost = functools.partial(comm_cost, model, self.example, workers=workers,
                                     batch_size=cfg.batch_size, samples=samples)
            extras["gpipe"] = self._gpipe_bytes(cost) if workers > 1 else None
            extras["ddp"] = int(cost(method="ddp").total_bytes) if workers > 1 else None
            extras["loft_model"] = int(cost(method="loft", sync_every=self.args.sync_every, state=self.args.state,
                                            groups=groups).total_bytes) if workers > 1 else None
        return res, extras

    @staticmethod
    def _gpipe_bytes(cost) -> int:
        """GPipe cut at the model's natural stages, or between blocks when it has fewer stages than workers."""
        try:
            return int(cost(method="gpipe").total_bytes)
        except ValueError:
            return int(cost(method="gpipe", balance="params").total_bytes)

    def _draw_epochs(self, emerged: dict, epochs_run: int, workers: int) -> list[int]:
        if self.st["draw_at"] != "auto":
            return [e * self.epoch_scale(workers) for e in self.st["draw_at"]]
        return sorted({0, epochs_run, *(e for e in emerged.values() if e is not None)})

    def controls(self, unit: Path, model, groups, seed: int) -> dict:
        """Control name -> {ratio key: fine-tuned accuracy} at every --ratios (see --controls)."""
        out = {}
        for name in self.st["controls"]:
            ticket = self.initial_ticket if name == "initial-weights" else functools.partial(self.random_ticket, model)
            out[name] = {report.ratio_key(r): ticket(unit, groups, seed, r) for r in self.st["ratios"]}
            self.log(f"   {name} control: " + ", ".join(f"{float(k) * 100:g} %: {a:.2f}%" for k, a in out[name].items()))
        return out

    def initial_ticket(self, unit: Path, groups, seed: int, ratio: float) -> float:
        """The ticket drawn from the initial weights (top L2 norms at initialisation), fine-tuned.

        Every method starts from the same initial weights (same seed), so this is fine-tuned once per seed and ratio.
        """
        model, groups = engine.full_model(engine.load_model_file(unit / "pretrain" / "init.pt"))
        pruned, kept, _ = draw(model.to(self.device), groups, ratio, self.example)
        target = self.out / "units" / "initial-weights" / f"seed{seed}" / f"ticket-{report.ratio_key(ratio)}"
        return self.finetune(target, pruned, groups, kept, ratio, seed)

    def random_ticket(self, model, unit: Path, groups, seed: int, ratio: float) -> float:
        """The pretrained `model` with the same number of filters per group as its ticket kept at random, fine-tuned.

        The random scores depend on the seed only, so the kept sets are nested across ratios like the tickets'.
        """
        gen = torch.Generator().manual_seed(seed)
        scores = {g.name: torch.rand(g.n, generator=gen) for g in groups}
        pruned, kept = prune(model, groups, ratio, criterion=scores)
        return self.finetune(unit / f"random-filters-{report.ratio_key(ratio)}", pruned, groups, kept, ratio, seed)

    def finetune(self, out: Path, pruned, groups, kept, ratio: float, seed: int) -> float:
        torch.manual_seed(seed)
        return engine.finetune_run(out, model=pruned, spec=self.spec, groups=groups, kept=kept, ratio=ratio,
                                   dataset=self.dataset, cfg=self.ft_cfg, seed=seed, device=self.device,
                                   resume=True, progress=self.progress)["test_acc"]

    def drawn(self, unit: Path, epoch: int, seed: int, epochs_run: int, res: dict) -> float:
        """Fine-tuned accuracy of the ticket drawn from the weights of `epoch` (0: the initial weights)."""
        key = report.ratio_key(self.st["draw_ratio"])
        if epoch == epochs_run and key in res["ticket"]:  # the end's weights: that ticket is already fine-tuned
            return res["ticket"][key]
        if epoch == 0:
            return self.initial_ticket(unit, None, seed, self.st["draw_ratio"])
        model, groups = engine.full_model(engine.load_model_file(unit / "pretrain" / f"epoch_{epoch:03d}.pt"))
        pruned, kept, _ = draw(model.to(self.device), groups, self.st["draw_ratio"], self.example)
        return self.finetune(unit / f"drawn-epoch{epoch}", pruned, groups, kept, self.st["draw_ratio"], seed)


def _dataset(args):
    """The dataset, cut to class-balanced subsets of --train-samples / --test-samples images (0: all)."""
    dataset = U.load_dataset(args)
    for split, n in (("train", args.train_samples), ("test", args.test_samples)):
        total = getattr(dataset, f"{split}_y").shape[0]
        if n > total:
            raise U.CLIError(f"--{split}-samples {n} exceeds the {total} {split} images of {args.dataset}; "
                             f"use 0 for all")
        if n:
            dataset = stratified_subset(dataset, n, seed=0, split=split)
    return dataset


def run(args) -> int:
    t_job, load_at_start = time.perf_counter(), os.getloadavg()
    st = _settings(args)
    base_cfg = train_config(args)
    ft_cfg = train_config(args, schedule="cosine", epochs=args.finetune_epochs, lr=args.finetune_lr,
                          weight_decay=args.finetune_weight_decay)
    emergence = emergence_options(args)
    out_text = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    U.check_out_free(out_text, resume=args.resume)
    device = U.resolve_device(args.device)
    dataset = _dataset(args)
    largest = max(st["methods"], key=lambda m: m[1])
    spec = U.make_spec(args, dataset, workers=largest[1], workers_option=f"--methods {largest[0]}")
    config = {"command": "run", "dataset": args.dataset, "data_dir": args.data_dir, "spec": spec,
              "train_samples": args.train_samples, "test_samples": args.test_samples, "methods": [m for m, _ in st["methods"]], "seeds": st["seeds"],
              "ratios": st["ratios"], "batch_split": args.batch_split, "loft_budget": args.loft_budget, "controls": st["controls"], "draw_at": st["draw_at"], "draw_ratio": st["draw_ratio"],
              "pretrain": base_cfg.to_dict(), "finetune": ft_cfg.to_dict(), "emergence": emergence,
              "length": st["length"], "device": str(device)}
    more_seeds = args.resume and U.check_resumed_seeds(out_text, st["seeds"])
    if args.resume:
        U.check_same_config(out_text, config, [k for k in config if k not in ("device", "length", "seeds")])
    out = U.prepare_out(out_text, resume=args.resume)
    if not args.resume or more_seeds:  # a resume with more seeds extends the run: its config says so
        U.write_config(out, config)

    job = Job(args, st, out, dataset, spec, device, emergence, ft_cfg)
    results: dict[str, dict[int, dict]] = {}
    controls: dict[str, dict[int, dict]] = {}
    extras: dict[str, dict] = {}
    wall: dict[str, float] = {}
    for method, workers in st["methods"]:
        t0 = time.perf_counter()
        for seed in st["seeds"]:
            res, ex = job.unit(method, workers, seed)
            results.setdefault(method, {})[seed] = res
            for name, accs in res.pop("controls", {}).items():
                controls.setdefault(name, {})[seed] = {"ticket": accs}
            if "matrix" in ex:
                extras[method] = ex
        wall[method] = time.perf_counter() - t0

    rep = report.build_report(args.dataset, st["seeds"], {m: {s: seed_entry(r) for s, r in per.items()}
                                                          for m, per in results.items()}, controls or None)
    info = details(results, extras, st, wall, time.perf_counter() - t_job)
    plots(out, results, extras, st, rep)
    info["wall_seconds"] = time.perf_counter() - t_job  # including the plots
    info["run"] = run_info(info["wall_seconds"], load_at_start, device)
    report.write_report(out, rep, info)
    print(report.format_table(rep, info["gpipe_bytes"], info["no_prune_bn_recalibrated"], info["ddp_bytes"]))
    if "controls" in rep:
        print(report.format_ratio_table(rep))
        print("\n".join(report.format_discrimination(rep["discrimination"])))
    if info.get("draws"):
        print(report.format_draw_table(info["draws"]))
    for note in info["notes"]:
        job.log(note)
    job.log(f"wrote {out}/report.json, report.md and plots ({info['wall_seconds']:.0f}s)")
    return 0
