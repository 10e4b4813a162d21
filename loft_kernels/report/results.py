"""The report's data: per-method summaries over seeds, the controls, the discrimination verdict, validation."""
from __future__ import annotations

import math
import numbers
import statistics
from typing import Mapping, Sequence

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
        # the lower median: with an even number of seeds, still an epoch at which a seed's criterion fired
        emerged[c] = None if any(e is None for e in epochs) else int(statistics.median_low(epochs))
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


def spread(xs: Sequence[float]) -> float | None:
    """The seeds' spread: sample standard deviation (None for a single seed: one value has no spread)."""
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return None
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
    sample standard deviation of the two; with one seed there is none, so no
    control counts as beaten); another method matches the reference
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
            noise = None if ref[k]["spread"] is None else max(ref[k]["spread"], c["spread"])
            beat[name] = {"mean": c["mean"], "spread": c["spread"], "margin": margin,
                          "beaten": noise is not None and margin >= cfg["margin"] and margin > noise}
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
            # None when the job ran no method besides the reference: nothing was compared
            "methods_match_reference": all(m["within"] for r in per_ratio.values() for m in r["methods"].values())
            if len(report["methods"]) > 1 else None}


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
