"""The cohort summary of `ikr batch`: OUT/summary.csv (one row per case), OUT/summary.png and OUT/summary.html.

Figures come from each case's report.json (TRE, SDlogJ, folding, quality verdict, peak memory) and
margin/margin.json (minimal margin and its 5-95 % interval); status, error and runtime from the batch.
The page shows the margin distribution, TRE before and after per case and runtime per case, and links
each case to its report (the margin report where there is one, else report.json).
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from ..io.atomic import atomic_path, write_text_atomic
from ..io.outputs import OUTPUT_FILES
from .case import MARGIN_FOLDER, CaseResult
from .manifest import Case

COLUMNS = [
    "case", "status", "error", "tre_before_mm", "tre_after_mm", "sdlogj", "folding_percent", "quality_verdict",
    "min_margin_mm", "min_margin_p5_mm", "min_margin_p95_mm", "runtime_s", "peak_memory_mb", "report",
]  # fmt: skip


def _read_json(path: Path) -> dict:
    """A JSON file's content, or {} when it is absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def summary_row(case: Case, result: CaseResult, out: Path) -> dict:
    """The summary row of one case (figures left empty where the case has none)."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(case=case.name, status=result.status, error=result.error, runtime_s=round(result.runtime_s, 1))
    if result.status == "failed" and not result.registration_id:
        return row
    folder = out / case.name
    report = _read_json(folder / OUTPUT_FILES["report"])
    margin = _read_json(folder / MARGIN_FOLDER / "margin.json") if case.has_margin else {}
    if "tre_mm" in report:
        row.update(
            tre_before_mm=round(report["tre_before_mm"]["mean"], 3), tre_after_mm=round(report["tre_mm"]["mean"], 3)
        )
    for key in ("sdlogj", "folding_percent"):
        if key in report:
            row[key] = round(report[key], 5)
    row["quality_verdict"] = (report.get("quality") or {}).get("verdict", "")
    row["peak_memory_mb"] = round(report["peak_memory_mb"]) if "peak_memory_mb" in report else ""
    for key in ("min_margin_mm", "min_margin_p5_mm", "min_margin_p95_mm"):
        if key in margin:
            row[key] = round(margin[key], 2)
    page = Path(case.name) / MARGIN_FOLDER / "report.html"
    row["report"] = str(page if margin and (out / page).is_file() else Path(case.name) / OUTPUT_FILES["report"])
    return row


def write_summary(cases: list[Case], results: dict[str, CaseResult], out: Path) -> list[dict]:
    """Write summary.csv, summary.png and summary.html into OUT; return the rows."""
    rows = [summary_row(c, results[c.name], out) for c in cases]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "summary.csv", text.getvalue())
    plot_summary(rows, out / "summary.png")
    write_text_atomic(out / "summary.html", summary_html(rows))
    return rows


def plot_summary(rows: list[dict], path: Path) -> Path:
    """Three panels: the minimal-margin distribution, TRE before/after per case, runtime per case."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    ax_margin, ax_tre, ax_time = fig.subplots(1, 3)
    margins = [r for r in rows if r["min_margin_mm"] != ""]
    if margins:
        values = [r["min_margin_mm"] for r in margins]
        ax_margin.hist(values, bins=max(5, min(20, len(values))), color="tab:green", alpha=0.8)
        ax_margin.axvline(0.0, color="tab:red", lw=1, ls="--")
        ax_margin.axvline(5.0, color="tab:orange", lw=1, ls="--")
    else:
        ax_margin.text(
            0.5, 0.5, "no case gives a tumour and an ablation zone", ha="center", transform=ax_margin.transAxes
        )
    ax_margin.set(title="minimal ablative margin", xlabel="mm", ylabel="cases")
    ax_margin.yaxis.set_major_locator(MaxNLocator(integer=True))
    tre = [r for r in rows if r["tre_after_mm"] != ""]
    x = range(len(tre))
    ax_tre.bar([i - 0.2 for i in x], [r["tre_before_mm"] for r in tre], 0.4, label="before", color="tab:gray")
    ax_tre.bar([i + 0.2 for i in x], [r["tre_after_mm"] for r in tre], 0.4, label="after", color="tab:blue")
    ax_tre.set_xticks(list(x), [r["case"] for r in tre], rotation=60, ha="right", fontsize=8)
    ax_tre.set(title="landmark TRE (mean) per case", ylabel="mm")
    if tre:
        ax_tre.legend()
    colours = {"ok": "tab:blue", "skipped": "tab:gray", "failed": "tab:red"}
    ax_time.bar(range(len(rows)), [r["runtime_s"] or 0 for r in rows], color=[colours[r["status"]] for r in rows])
    failed = [i for i, r in enumerate(rows) if r["status"] == "failed"]
    ax_time.plot(failed, [0.0] * len(failed), "x", color="tab:red", markersize=9, mew=2)
    ax_time.set_xticks(range(len(rows)), [r["case"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax_time.set(title="runtime per case (red, x: failed; grey: skipped)", ylabel="s")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def summary_html(rows: list[dict]) -> str:
    """A self-standing page: counts, the plots (summary.png beside it) and the table with links to each report."""
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS if c != "report")
    body = []
    for r in rows:
        cells = []
        for c in COLUMNS:
            if c == "report":
                continue
            value = html.escape(str(r[c]))
            if c == "case" and r["report"]:
                value = f'<a href="{html.escape(r["report"])}">{value}</a>'
            cells.append(f'<td class="{html.escape(r["status"]) if c == "status" else ""}">{value}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ikr batch summary</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:3px 6px}} td.failed{{color:#b00;font-weight:bold}} td.ok{{color:#070}}
img{{max-width:100%}}</style></head><body>
<h1>ikr batch summary</h1>
<p>{len(rows)} cases: {counts["ok"]} registered, {counts["skipped"]} finished before (skipped),
{counts["failed"]} failed.
Each case name links to its report. TRE: mean landmark error (mm); margin interval: 5-95 % from the
expected-error map.</p>
<img src="summary.png" alt="margin distribution, TRE per case, runtime per case">
<table><tr>{head}</tr>
{chr(10).join(body)}
</table></body></html>
"""
