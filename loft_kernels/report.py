"""The `loft run` report: report.json (fixed schema), report.md (a table shaped like the paper's) and plots.

report.json is exactly
    {"dataset": str, "seeds": [int], "methods": {name: M}}
    M = {"no_prune": float, "ticket": {"<ratio>": float}, "per_seed": {"<seed>": {...}},
         "comm_bytes": int, "emerged_epoch": {"footrule": int | None, "mask": int | None}}
with accuracies in percent and means over seeds, plus, when the job ran control tickets,
    "controls": {name: {"ticket": {"<ratio>": float}, "per_seed": {"<seed>": {"ticket": {...}}}}}
    "discrimination": what `discrimination` derives from the rest (does the
        pretrained ticket beat the controls, does LoFT's match dense's).
`emerged_epoch` over seeds is the median of the seeds' epochs when the
criterion fired for every seed, else None (per_seed says which seeds it fired
for). Everything the table needs beyond that (GPipe bytes, wall times) comes
in a separate `details` dict.

Plots use matplotlib's Agg backend: files only, no display needed.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path
from typing import Mapping, Sequence

from ._optional import require
from .io import atomic_write_text


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported at the first plot (plots are an extra)."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")

CRITERIA = ("footrule", "mask")
SEED_KEYS = ("no_prune", "ticket", "comm_bytes", "emerged_epoch")


def ratio_key(ratio: float) -> str:
    """The JSON key of a pruning ratio: 0.5 -> "0.5", 0.8 -> "0.8"."""
    return f"{float(ratio):g}"


def _percent(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number (accuracy in percent), got {value!r}")
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{name} must be an accuracy in percent in [0, 100], got {value}")
    return float(value)


def _epoch_or_none(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return int(value)


def _check_seed_result(res, name: str, ratios: Sequence[str]) -> None:
    if not isinstance(res, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(res).__name__}")
    missing = [k for k in SEED_KEYS if k not in res]
    if missing:
        raise ValueError(f"{name} is missing {missing}")
    _percent(res["no_prune"], f"{name}['no_prune']")
    if not isinstance(res["ticket"], Mapping) or sorted(res["ticket"]) != sorted(ratios):
        raise ValueError(f"{name}['ticket'] must map the ratios {list(ratios)} to accuracies, got {res['ticket']!r}")
    for r in ratios:
        _percent(res["ticket"][r], f"{name}['ticket'][{r!r}]")
    cb = res["comm_bytes"]
    if isinstance(cb, bool) or not isinstance(cb, numbers.Integral) or cb < 0:
        raise ValueError(f"{name}['comm_bytes'] must be a non-negative int, got {cb!r}")
    if not isinstance(res["emerged_epoch"], Mapping) or set(res["emerged_epoch"]) != set(CRITERIA):
        raise ValueError(f"{name}['emerged_epoch'] must have exactly the keys {list(CRITERIA)}")
    for c in CRITERIA:
        _epoch_or_none(res["emerged_epoch"][c], f"{name}['emerged_epoch'][{c!r}]")


def summarize_method(per_seed: Mapping[int, Mapping]) -> dict:
    """One method's M from its per-seed results (each with the SEED_KEYS)."""
    if not isinstance(per_seed, Mapping) or not per_seed:
        raise ValueError("per_seed must be a non-empty dict seed -> result")
    first = next(iter(per_seed.values()))
    ratios = sorted(first["ticket"]) if isinstance(first, Mapping) and isinstance(first.get("ticket"), Mapping) else []
    for seed, res in per_seed.items():
        _check_seed_result(res, f"per_seed[{seed!r}]", ratios)
    results = list(per_seed.values())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    emerged = {}
    for c in CRITERIA:
        epochs = [r["emerged_epoch"][c] for r in results]
        emerged[c] = None if any(e is None for e in epochs) else int(sorted(epochs)[len(epochs) // 2])
    return {
        "no_prune": mean([float(r["no_prune"]) for r in results]),
        "ticket": {k: mean([float(r["ticket"][k]) for r in results]) for k in ratios},
        "per_seed": {str(s): {k: r[k] for k in SEED_KEYS} | {k: v for k, v in r.items() if k not in SEED_KEYS}
                     for s, r in per_seed.items()},
        "comm_bytes": int(round(mean([int(r["comm_bytes"]) for r in results]))),
        "emerged_epoch": emerged,
    }


def build_report(dataset: str, seeds: Sequence[int], results: Mapping[str, Mapping[int, Mapping]],
                 controls: Mapping[str, Mapping[int, Mapping]] | None = None) -> dict:
    """report.json's dict from results[method][seed] = per-seed result.

    controls[name][seed] = {"ticket": {"<ratio>": accuracy}}: control tickets
    (e.g. drawn from the initial weights, or random filters) at the methods'
    ratios; they add "controls" and "discrimination" (see `discrimination`).
    """
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty str, got {dataset!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must not be empty")
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict method -> {seed: result}")
    methods = {}
    for method, per_seed in results.items():
        if sorted(per_seed) != sorted(seeds):
            raise ValueError(f"results[{method!r}] has seeds {sorted(per_seed)}, expected {sorted(seeds)}")
        methods[method] = summarize_method({s: per_seed[s] for s in seeds})
    report = {"dataset": dataset, "seeds": seeds, "methods": methods}
    if controls:
        if not isinstance(controls, Mapping):
            raise TypeError(f"controls must be a dict name -> {{seed: result}}, got {type(controls).__name__}")
        report["controls"] = {}
        for name, per_seed in controls.items():
            if not isinstance(per_seed, Mapping) or sorted(per_seed) != sorted(seeds):
                raise ValueError(f"controls[{name!r}] must have the seeds {sorted(seeds)}")
            report["controls"][name] = {
                "ticket": {k: _mean_of(float(per_seed[s]["ticket"][k]) for s in seeds)
                           for k in sorted(per_seed[seeds[0]]["ticket"])},
                "per_seed": {str(s): {"ticket": dict(per_seed[s]["ticket"])} for s in seeds}}
        _check_controls(report)
        report["discrimination"] = discrimination(report)
    validate_report(report)
    return report


def _mean_of(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def spread(xs: Sequence[float]) -> float:
    """The seeds' spread: sample standard deviation (0 for a single seed)."""
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return 0.0
    m = _mean_of(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ticket_stats(report: Mapping) -> dict:
    """Every method's and control's ticket accuracies: name -> {"<ratio>": {"mean", "spread", "per_seed"}}."""
    rows = {**report["methods"], **report.get("controls", {})}
    return {name: {k: {"mean": m["ticket"][k], "spread": spread([r["ticket"][k] for r in m["per_seed"].values()]),
                       "per_seed": [r["ticket"][k] for r in m["per_seed"].values()]}
                   for k in m["ticket"]}
            for name, m in rows.items()}


# What "pretraining matters" and "LoFT finds dense's ticket" mean, at the highest TOP ratios of the job.
DISCRIMINATION = {"top_ratios": 2, "margin": 1.5, "within": 1.0, "reference": "dense"}


def discrimination(report: Mapping, settings: Mapping | None = None) -> dict | None:
    """Does the pretrained ticket beat the controls, and do the other methods' tickets match it?

    At each of the `top_ratios` highest ratios: the reference (dense-pretrained)
    ticket beats a control when its mean over seeds is at least `margin` points
    above the control's AND that margin exceeds the seeds' spread (the larger
    sample standard deviation of the two); another method matches the reference
    when its mean is within `within` points of the reference's (either side).
    None when the report has no controls or no reference method.
    """
    cfg = {**DISCRIMINATION, **(settings or {})}
    controls = report.get("controls") or {}
    if not controls or cfg["reference"] not in report["methods"]:
        return None
    stats = ticket_stats(report)
    ref = stats[cfg["reference"]]
    top = sorted(ref, key=float)[-int(cfg["top_ratios"]):]
    per_ratio = {}
    for k in top:
        beat = {}
        for name in controls:
            c, margin = stats[name][k], ref[k]["mean"] - stats[name][k]["mean"]
            noise = max(ref[k]["spread"], c["spread"])
            beat[name] = {"mean": c["mean"], "spread": c["spread"], "margin": margin,
                          "beaten": margin >= cfg["margin"] and margin > noise}
        match = {}
        for name in report["methods"]:
            if name != cfg["reference"]:
                gap = stats[name][k]["mean"] - ref[k]["mean"]
                match[name] = {"mean": stats[name][k]["mean"], "spread": stats[name][k]["spread"], "gap": gap,
                               "within": abs(gap) <= cfg["within"]}
        per_ratio[k] = {"reference": {"mean": ref[k]["mean"], "spread": ref[k]["spread"]},
                        "controls": beat, "methods": match}
    return {"settings": cfg, "ratios": top, "per_ratio": per_ratio,
            "pretraining_matters": all(c["beaten"] for r in per_ratio.values() for c in r["controls"].values()),
            "methods_match_reference": all(m["within"] for r in per_ratio.values() for m in r["methods"].values())}


def _check_controls(report: Mapping) -> None:
    controls = report["controls"]
    if not isinstance(controls, Mapping) or not controls:
        raise ValueError("report['controls'] must be a non-empty dict name -> control")
    ratios = sorted(next(iter(report["methods"].values()))["ticket"])
    seeds = sorted(str(s) for s in report["seeds"])
    for name, c in controls.items():
        where = f"report['controls'][{name!r}]"
        if name in report["methods"]:
            raise ValueError(f"{where}: a control must not share its name with a method")
        if not isinstance(c, Mapping) or set(c) != {"ticket", "per_seed"}:
            raise ValueError(f"{where} must have exactly the keys ticket, per_seed")
        if not isinstance(c["per_seed"], Mapping) or sorted(c["per_seed"]) != seeds:
            raise ValueError(f"{where}['per_seed'] must have one entry per seed {report['seeds']}")
        for key, t in [("ticket", c["ticket"])] + [(f"per_seed[{s!r}]['ticket']", r.get("ticket"))
                                                  for s, r in c["per_seed"].items()]:
            if not isinstance(t, Mapping) or sorted(t) != ratios:
                raise ValueError(f"{where}[{key!r}] must map the methods' ratios {ratios} to accuracies, got {t!r}")
            for r in ratios:
                _percent(t[r], f"{where}[{key!r}][{r!r}]")


def validate_report(report) -> None:
    """Raise ValueError/TypeError unless `report` has exactly report.json's schema."""
    if not isinstance(report, Mapping) or not {"dataset", "seeds", "methods"} <= set(report) <= {
            "dataset", "seeds", "methods", "controls", "discrimination"}:
        raise ValueError("report must be a dict with exactly the keys dataset, seeds, methods (and, with control "
                         "tickets, controls and discrimination)")
    if not isinstance(report["dataset"], str):
        raise TypeError("report['dataset'] must be a str")
    if not isinstance(report["seeds"], list) or not report["seeds"] or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in report["seeds"]):
        raise ValueError("report['seeds'] must be a non-empty list of ints")
    if not isinstance(report["methods"], Mapping) or not report["methods"]:
        raise ValueError("report['methods'] must be a non-empty dict")
    for name, m in report["methods"].items():
        where = f"report['methods'][{name!r}]"
        if not isinstance(m, Mapping) or set(m) != {"no_prune", "ticket", "per_seed", "comm_bytes", "emerged_epoch"}:
            raise ValueError(f"{where} must have exactly the keys no_prune, ticket, per_seed, comm_bytes, "
                             f"emerged_epoch")
        ratios = sorted(m["ticket"]) if isinstance(m["ticket"], Mapping) else []
        _check_seed_result(m, where, ratios)
        if sorted(m["per_seed"]) != sorted(str(s) for s in report["seeds"]):
            raise ValueError(f"{where}['per_seed'] must have one entry per seed {report['seeds']}")
    if ("controls" in report) != ("discrimination" in report):
        raise ValueError("report['controls'] and report['discrimination'] come together")
    if "controls" in report:
        _check_controls(report)
        d = report["discrimination"]
        settings = d.get("settings") if isinstance(d, Mapping) else None
        if d != discrimination(report, settings if isinstance(settings, Mapping) else None):
            raise ValueError("report['discrimination'] does not follow from the tickets and controls")


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def method_workers(method: str) -> int:
    """'dense' -> 1, 'loft-4' -> 4."""
    m = re.fullmatch(r"loft-(\d+)", method)
    return int(m.group(1)) if m else 1


def format_table(report: Mapping, gpipe_bytes: Mapping[str, int | None] | None = None,
                 bn_recalibrated: Mapping[str, float] | None = None,
                 ddp_bytes: Mapping[str, int | None] | None = None) -> str:
    """The paper-shaped markdown table.

    gpipe_bytes[method]: GPipe's bytes with that method's workers (improv. = GPipe / LoFT).
    bn_recalibrated[method]: no-prune accuracy with BatchNorm statistics re-estimated (an extra column).
    ddp_bytes[method]: DDP's bytes with that method's workers (an extra column when given).
    """
    validate_report(report)
    gpipe_bytes = gpipe_bytes or {}
    any_m = next(iter(report["methods"].values()))
    ratios = sorted(any_m["ticket"], key=float, reverse=True)  # the paper lists 80 % before 50 %
    head = (["method", "no-prune acc. (%)"] + (["no-prune, BN re-estimated (%)"] if bn_recalibrated else [])
            + [f"ticket {float(r) * 100:g} % (%)" for r in ratios]
            + ["comm", "GPipe comm (same workers)", "improv."] + (["DDP comm (same workers)"] if ddp_bytes else [])
            + ["emerged (footrule)", "emerged (mask)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in report["methods"].items():
        g = gpipe_bytes.get(name)
        ours = m["comm_bytes"]
        improv = f"{g / ours:.2f}x" if g and ours else "n/a"
        emerged = [("epoch " + str(m["emerged_epoch"][c])) if m["emerged_epoch"][c] is not None else "not fired"
                   for c in CRITERIA]
        recal = [f"{bn_recalibrated[name]:.2f}" if name in bn_recalibrated else "n/a"] if bn_recalibrated else []
        row = ([name, f"{m['no_prune']:.2f}"] + recal + [f"{m['ticket'][r]:.2f}" for r in ratios]
               + [_fmt_bytes(ours), _fmt_bytes(g) if g else "n/a", improv]
               + ([_fmt_bytes(ddp_bytes[name]) if ddp_bytes.get(name) else "n/a"] if ddp_bytes else []) + emerged)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def format_ratio_table(report: Mapping) -> str:
    """Markdown: fine-tuned ticket accuracy, mean +- spread over seeds, per method and control (rows) and ratio."""
    validate_report(report)
    stats = ticket_stats(report)
    ratios = sorted(next(iter(stats.values())), key=float)
    head = ["ticket from"] + [f"{float(r) * 100:g} % pruned" for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in stats.items():
        label = name if name in report["methods"] else f"control: {name}"
        lines.append("| " + " | ".join([label] + [f"{per[r]['mean']:.2f} ± {per[r]['spread']:.2f}"
                                                  for r in ratios]) + " |")
    return "\n".join(lines) + "\n"


def format_discrimination(d: Mapping | None) -> list[str]:
    """Plain-language lines: does the pretrained ticket beat each control, do the methods match it (per ratio)."""
    if not d:
        return []
    cfg, lines = d["settings"], []
    for k, r in d["per_ratio"].items():
        ref = r["reference"]
        for name, c in r["controls"].items():
            lines.append(f"- {float(k) * 100:g} %: {cfg['reference']} {ref['mean']:.2f} ± {ref['spread']:.2f} vs "
                         f"{name} {c['mean']:.2f} ± {c['spread']:.2f}: {c['margin']:+.2f} points, "
                         + ("beaten" if c["beaten"] else f"not beaten (needs >= {cfg['margin']:g} points, above "
                                                         f"the seeds' spread)"))
        for name, m in r["methods"].items():
            lines.append(f"- {float(k) * 100:g} %: {name} {m['mean']:.2f} ± {m['spread']:.2f}, {m['gap']:+.2f} "
                         f"points vs {cfg['reference']}: " + ("within" if m["within"] else "not within")
                         + f" {cfg['within']:g} point")
    lines.append(f"- verdict at {', '.join(f'{float(k) * 100:g} %' for k in d['ratios'])}: pretraining "
                 + ("matters (the pretrained ticket beats every control)" if d["pretraining_matters"] else
                    "is not shown to matter (some control is not beaten)")
                 + "; " + ("every method's ticket is within " if d["methods_match_reference"] else
                           "not every method's ticket is within ") + f"{cfg['within']:g} point of {cfg['reference']}'s")
    return lines


def format_draw_table(draws: Mapping) -> str:
    """Markdown: fine-tuned accuracy of the ticket drawn at each point (mean, then per seed acc@epoch).

    draws = {"ratio": float, "methods": {method: {"rows": {label: {"mean_acc": float | None,
    "per_seed": {seed: {"epoch": int, "acc": float} | None}}}, "savings": {...}}}}, as `loft run` builds it.
    """
    methods = draws["methods"]
    labels = list(dict.fromkeys(label for m in methods.values() for label in m["rows"]))
    lines = ["| method | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for name, m in methods.items():
        cells = []
        for label in labels:
            row = m["rows"].get(label)
            if row is None:
                cells.append("n/a")
                continue
            seeds = ", ".join("not fired" if v is None else f"{v['acc']:.2f} @{v['epoch']}"
                              for v in row["per_seed"].values())
            mean = "n/a" if row["mean_acc"] is None else f"{row['mean_acc']:.2f}"
            cells.append(f"{mean} ({seeds})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_savings(draws: Mapping) -> list[str]:
    """One line per method and criterion: what stopping at emergence saved and what it cost the ticket."""
    lines = []
    for name, m in draws["methods"].items():
        for crit, per_seed in m["savings"].items():
            got = [v for v in per_seed.values() if v is not None]
            if not got:
                lines.append(f"- {name}, {crit} criterion: did not fire for any seed")
                continue
            mean = {k: sum(v[k] for v in got) / len(got) for k in got[0]}
            steps = (f", {mean['sample_steps_saved'] / 1e3:.0f}k sample-steps "
                     f"({100 * mean['sample_steps_saved'] / mean['sample_steps_total']:.0f} % of the pretraining)"
                     if "sample_steps_saved" in mean else "")
            lines.append(f"- {name}, {crit} criterion (fired for {len(got)} of {len(per_seed)} seeds): stopping "
                         f"there saves {mean['epochs_saved']:.1f} epochs{steps}, {mean['train_seconds_saved']:.1f} s "
                         f"of training and {_fmt_bytes(mean['comm_bytes_saved'])} of communication per run; the "
                         f"ticket changes by {mean['ticket_acc_change']:+.2f} points (mean over those seeds)")
    return lines


def _per_seed_table(report: Mapping) -> str:
    ratios = sorted(next(iter(report["methods"].values()))["ticket"], key=float, reverse=True)
    head = ["method", "seed", "no-prune", "BN re-estimated"] + [f"ticket {float(r) * 100:g} %" for r in ratios] \
        + ["emerged (footrule)", "emerged (mask)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in report["methods"].items():
        for seed, r in m["per_seed"].items():
            recal = r.get("no_prune_bn_recalibrated")
            row = [name, seed, f"{r['no_prune']:.2f}", "n/a" if recal is None else f"{recal:.2f}"] \
                + [f"{r['ticket'][k]:.2f}" for k in ratios] + [str(r["emerged_epoch"][c]) for c in CRITERIA]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, report: Mapping, details: Mapping | None = None) -> None:
    """report.json, report.md (tables, per-seed numbers, draws, notes) and, if given, details.json."""
    validate_report(report)
    out = Path(out)
    details = dict(details or {})
    table = format_table(report, details.get("gpipe_bytes"), details.get("no_prune_bn_recalibrated"),
                         details.get("ddp_bytes"))
    md = [f"# LoFT tickets on {report['dataset']} (seeds {report['seeds']})", ""]
    if "controls" in report:
        md += ["## Tickets against the pruning ratio", "",
               "Fine-tuned test accuracy (%) of the ticket of each pretraining method (top L2-norm filters of the "
               "pretrained weights) and of the controls, fine-tuned exactly like the tickets: initial-weights (top "
               "L2-norm filters of the initial weights, with those weights) and random-filters (the same number of "
               "filters per group kept at random from the dense-pretrained weights). Mean ± sample standard "
               "deviation over the seeds.", "", format_ratio_table(report)]
        md += format_discrimination(report["discrimination"]) + ["", "## The paper's table", ""]
    md += ["Accuracies are test accuracy in percent, means over seeds. no-prune: the pretrained full model as "
          "trained; BN re-estimated: the same weights with BatchNorm running statistics re-measured on the "
          "training data (a LoFT worker's statistics describe its sub-model, whose partial sums over 1/S of "
          "the channels are not rescaled). ticket p %: the pretrained model with p % of the filters of every "
          "group removed (lowest L2 norm), fine-tuned. comm: bytes all LoFT ranks send over the whole "
          "pretraining (`comm_stats`; each rank receives as much); GPipe and DDP comm: the communication model "
          "(`lk.comm_cost`) for the same workers and samples; improv. = GPipe / LoFT. emerged: the epoch each "
          "criterion declared the ticket (median over seeds; 'not fired' if it did not fire for every seed).", "",
          table, "## Per seed", "", _per_seed_table(report)]
    draws = details.get("draws")
    if draws:
        md += [f"## Ticket ({draws['ratio'] * 100:g} % pruned) against the epoch it was drawn at", "",
               "Fine-tuned test accuracy of the ticket drawn from the weights of each point; mean over seeds, then "
               "each seed's accuracy @ the epoch it was drawn at (emergence epochs differ between seeds). Every method "
               "starts from the same initial weights, so their ticket is fine-tuned once per seed and appears in "
               "every row.", "",
               format_draw_table(draws)]
        md += format_savings(draws)
    if details.get("notes"):
        md += ["", "## Notes", ""] + [f"- {n}" for n in details["notes"]]
    if details.get("run"):
        md += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in details["run"].items()]
    atomic_write_text(json.dumps(report, indent=2) + "\n", out / "report.json")
    atomic_write_text("\n".join(md) + "\n", out / "report.md")
    if details:
        atomic_write_text(json.dumps(details, indent=2, default=str) + "\n", out / "details.json")


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
                    yerr=[per[r]["spread"] for r in ratios], marker="s" if control else "o", markersize=4,
                    capsize=3, linestyle="--" if control else "-", label=f"control: {name}" if control else name)
    ax.set(title=f"fine-tuned tickets on {report['dataset']} ({len(report['seeds'])} seed(s); bars: ± 1 std)",
           xlabel="filters pruned per group (%)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(path))


def plot_curves(histories: Mapping[str, Mapping[str, Sequence[float]]], path) -> Path:
    """Training loss and test accuracy per epoch, one line per method (histories[m]['train_loss'/'test_acc'])."""
    if not histories:
        raise ValueError("histories must not be empty")
    fig, (a1, a2) = _pyplot().subplots(1, 2, figsize=(11, 4))
    for name, h in histories.items():
        a1.plot(range(1, len(h["train_loss"]) + 1), h["train_loss"], label=name)
        a2.plot(range(1, len(h["test_acc"]) + 1), h["test_acc"], label=name)
    a1.set(title="pretraining: training loss", xlabel="epoch", ylabel="loss")
    a2.set(title="pretraining: test accuracy of the full model", xlabel="epoch", ylabel="accuracy (%)")
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
