"""The `loft run` report: report.json (fixed schema), report.md (a table shaped like the paper's) and plots.

report.json is exactly
    {"dataset": str, "seeds": [int], "methods": {name: M}}
    M = {"no_prune": float, "ticket": {"<ratio>": float}, "per_seed": {"<seed>": {...}},
         "comm_bytes": int, "emerged_epoch": {"footrule": int | None, "mask": int | None}}
with accuracies in percent and means over seeds, plus, when the job ran control tickets,
    "controls": {name: {"ticket": {"<ratio>": float}, "per_seed": {"<seed>": {"ticket": {...}}}}}
    "discrimination": what `discrimination` derives from the rest (does the
        pretrained ticket beat the controls, does LoFT's match dense's).
`emerged_epoch` over seeds is the (lower) median of the seeds' epochs when the
criterion fired for every seed, else None (per_seed says which seeds it fired
for). Everything the table needs beyond that (GPipe bytes, wall times) comes
in a separate `details` dict.

Plots use matplotlib's Agg backend: files only, no display needed.

results.py holds the data and its checks, tables.py the text (report.md), plots.py the figures.
"""
from .plots import plot_curves, plot_heatmaps, plot_lines, plot_ticket_vs_ratio, safe_name
from .results import (
                      CRITERIA,
                      DISCRIMINATION,
                      SEED_KEYS,
                      build_report,
                      discrimination,
                      ratio_key,
                      spread,
                      summarize_method,
                      ticket_stats,
                      validate_report,
)
from .tables import (
                      format_discrimination,
                      format_draw_table,
                      format_ratio_table,
                      format_savings,
                      format_table,
                      method_workers,
                      write_report,
)

__all__ = ["CRITERIA", "DISCRIMINATION", "SEED_KEYS", "build_report", "discrimination", "ratio_key", "spread",
           "summarize_method", "ticket_stats", "validate_report", "format_discrimination", "format_draw_table",
           "format_ratio_table", "format_savings", "format_table", "method_workers", "write_report", "plot_curves",
           "plot_heatmaps", "plot_lines", "plot_ticket_vs_ratio", "safe_name"]
