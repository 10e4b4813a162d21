"""The report as text: the paper-shaped table, the ratio table and verdicts, draws, and report.md/json."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from ..io import atomic_write_text
from .results import CRITERIA, DISCRIMINATION, spread, ticket_stats, validate_report


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
        lines.append("| " + " | ".join([label] + [_pm(per[r]) for r in ratios]) + " |")
    return "\n".join(lines) + "\n"


def _pm(stat: Mapping) -> str:
    """"mean ± spread", or the mean alone where one seed gives no spread."""
    return f"{stat['mean']:.2f}" + ("" if stat["spread"] is None else f" ± {stat['spread']:.2f}")


def format_discrimination(d: Mapping | None) -> list[str]:
    """Plain-language lines: does the pretrained ticket beat each control, do the methods match it (per ratio)."""
    if not d:
        return []
    cfg, lines = d["settings"], []
    for k, r in d["per_ratio"].items():
        ref = r["reference"]
        for name, c in r["controls"].items():
            why = ("one seed: no spread to hold the margin against" if ref["spread"] is None else
                   f"needs >= {cfg['margin']:g} points, above the seeds' spread")
            lines.append(f"- {float(k) * 100:g} %: {cfg['reference']} {_pm(ref)} vs {name} {_pm(c)}: "
                         f"{c['margin']:+.2f} points, " + ("beaten" if c["beaten"] else f"not beaten ({why})"))
        for name, m in r["methods"].items():
            lines.append(f"- {float(k) * 100:g} %: {name} {_pm(m)}, {m['gap']:+.2f} "
                         f"points vs {cfg['reference']}: " + ("within" if m["within"] else "not within")
                         + f" {cfg['within']:g} point")
    lines.append(f"- verdict at {', '.join(f'{float(k) * 100:g} %' for k in d['ratios'])}: pretraining "
                 + ("matters (the pretrained ticket beats every control)" if d["pretraining_matters"] else
                    "is not shown to matter (some control is not beaten)")
                 + "; " + (f"no other method ran to compare with {cfg['reference']}"
                           if d["methods_match_reference"] is None else
                           ("every method's ticket is within " if d["methods_match_reference"] else
                            "not every method's ticket is within ") + f"{cfg['within']:g} point of {cfg['reference']}'s"))
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


# The ticket drawn where a criterion fired should be as good as the end's: within this many points (mean over seeds).
EMERGED_WITHIN = 0.5


def _ticket_change(changes: list[float]) -> str:
    """How the ticket drawn at emergence differs from the end's, against EMERGED_WITHIN and the seeds' noise.

    One fine-tuned ticket moves by about a point from one epoch's weights to the next, so a mean over a few seeds
    can miss the goal by chance: the standard error says whether the seeds can tell the change from none.
    """
    mean = sum(changes) / len(changes)
    verdict = f"{'within' if abs(mean) <= EMERGED_WITHIN else 'not within'} {EMERGED_WITHIN:g} point of the " \
              f"end-of-pretraining ticket"
    if len(changes) < 2:
        return f"{mean:+.2f} points (one seed): {verdict}"
    err = spread(changes) / len(changes) ** 0.5
    if abs(mean) > EMERGED_WITHIN:
        verdict += (", and more than two standard errors from it" if abs(mean) > 2 * err else
                    ", but within two standard errors of it (the seeds cannot tell the change from none)")
    return f"{mean:+.2f} ± {err:.2f} points (mean ± standard error over those seeds): {verdict}"


def format_savings(draws: Mapping) -> list[str]:
    """One line per method and criterion: what stopping at emergence saved and what it cost the ticket."""
    lines = []
    for name, m in draws["methods"].items():
        for crit, per_seed in m["savings"].items():
            got = [v for v in per_seed.values() if v is not None]
            if not got:
                lines.append(f"- {name}, {crit} criterion: did not fire for any seed")
                continue
            mean = {k: sum(v[k] for v in got) / len(got) for k in got[0] if k != "ticket_acc_change"}
            steps = ""
            if "sample_steps_saved" in mean:
                saved = mean["sample_steps_saved"]
                count = f"{saved / 1e3:.0f}k" if saved >= 1e4 else f"{saved:,.0f}"  # 512 is not "1k"
                steps = (f", {count} sample-steps ({100 * saved / mean['sample_steps_total']:.0f} % of the "
                         f"pretraining)")
            lines.append(f"- {name}, {crit} criterion (fired for {len(got)} of {len(per_seed)} seeds): stopping "
                         f"there saves {mean['epochs_saved']:.1f} epochs{steps}, {mean['train_seconds_saved']:.1f} s "
                         f"of training and {_fmt_bytes(mean['comm_bytes_saved'])} of communication per run; the "
                         f"ticket changes by {_ticket_change([v['ticket_acc_change'] for v in got])}")
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
                + [f"{r['ticket'][k]:.2f}" for k in ratios] \
                + ["not fired" if r["emerged_epoch"][c] is None else str(r["emerged_epoch"][c]) for c in CRITERIA]
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
        source = "dense" if "dense" in report["methods"] else next(iter(report["methods"]))
        described = {"initial-weights": "initial-weights (top L2-norm filters of the initial weights, with those "
                                        "weights)",
                     "random-filters": f"random-filters (the same number of filters per group kept at random from "
                                       f"the {source}-pretrained weights)"}
        kinds = " and ".join(described.get(name, name) for name in report["controls"])
        md += ["## Tickets against the pruning ratio", "",
               "Fine-tuned test accuracy (%) of the ticket of each pretraining method (top L2-norm filters of the "
               f"pretrained weights) and of the controls, fine-tuned exactly like the tickets: {kinds}. Mean ± "
               "sample standard deviation over the seeds.", "", format_ratio_table(report)]
        if report["discrimination"] is None:
            md += [f"- no verdict: the job did not pretrain {DISCRIMINATION['reference']}, the method the "
                   f"controls and the other methods are compared with"]
        md += format_discrimination(report["discrimination"]) + ["", "## The paper's table", ""]
    md += ["Accuracies are test accuracy in percent, means over seeds. no-prune: the pretrained full model as "
          "trained; BN re-estimated: the same weights with BatchNorm running statistics re-measured on the "
          "training data (a LoFT worker's statistics describe its sub-model, whose partial sums over 1/S of "
          "the channels are not rescaled). ticket p %: the pretrained model with p % of the filters of every "
          "group removed (lowest L2 norm), fine-tuned. comm: bytes all LoFT ranks send over the whole "
          "pretraining (`comm_stats`; each rank receives as much); GPipe and DDP comm: the communication model "
          "(`lk.comm_cost`) for the same workers and samples; improv. = GPipe / LoFT. emerged: the epoch each "
          "criterion declared the ticket (median over seeds, the lower middle one for an even count; 'not "
          "fired' if it did not fire for every seed).", "",
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
