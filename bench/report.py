"""The results as Markdown tables (values, ratios to this project's default, convention checks)."""

from __future__ import annotations

import math

from methods import DEFAULT_METHOD, FALLBACK_REFERENCE

VALUE_COLUMNS = (
    ("TRE mean", lambda r: r["tre"]["mean"], "{:.2f}"),
    ("TRE sd", lambda r: r["tre"]["sd"], "{:.2f}"),
    ("TRE p50", lambda r: r["tre"]["p50"], "{:.2f}"),
    ("TRE p90", lambda r: r["tre"]["p90"], "{:.2f}"),
    ("TRE pleura", lambda r: r.get("tre_pleura", {}).get("mean"), "{:.2f}"),
    ("SDlogJ", lambda r: r["jacobian"]["sdlogj"], "{:.3f}"),
    ("fold %", lambda r: r["jacobian"]["folding_percent"], "{:.3f}"),
    ("time s", lambda r: r["time_s"], "{:.1f}"),
    ("command s", lambda r: r.get("command_s"), "{:.1f}"),
    ("peak MB", lambda r: r["memory_mb"], "{:.0f}"),
)


def _format(value: float | None, fmt: str) -> str:
    """A number for a table cell ('-' for None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that are set (None when none is)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _ratio(value: float | None, reference: float | None) -> str:
    """value / reference as 'x.xx' ('-' where undefined)."""
    if value is None or reference is None or reference == 0 or math.isnan(value) or math.isnan(reference):
        return "-"
    return f"{value / reference:.2f}"


def reference_name(rows: list[dict], case: str) -> str | None:
    """The row that ratios of a case are taken against: the default method, else the fallback."""
    ok = {r["method"] for r in rows if r["case"] == case and r["status"] == "ok"}
    return next((name for name in (DEFAULT_METHOD, FALLBACK_REFERENCE) if name in ok), None)


def _row_cells(row: dict) -> list[str]:
    """The value cells of one row (dashes for a run that did not finish)."""
    if row["status"] != "ok":
        return ["-"] * len(VALUE_COLUMNS)
    return [_format(get(row), fmt) for _, get, fmt in VALUE_COLUMNS]


def _table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def verdict_cell(row: dict) -> str:
    """This project's own quality verdict of a run (review/quality.py), '—' for the peers and 'none'."""
    quality = row.get("quality") or {}
    return quality.get("verdict", "—") if row["status"] == "ok" else "-"


def values_table(rows: list[dict]) -> str:
    """Every (case, method) row with its figures, quality verdict, device and status."""
    header = ["case", "unseen", "method", *(c[0] for c in VALUE_COLUMNS), "verdict", "device", "status"]
    lines = []
    for row in rows:
        status = "ok" if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}"
        cells = [row["case"], row["unseen"] or "-", row["method"], *_row_cells(row), verdict_cell(row)]
        lines.append([*cells, row.get("device", "-"), status])
    return _table(header, lines)


def ratios_table(rows: list[dict]) -> str:
    """Each figure as a ratio to the reference method of the same case."""
    header = ["case", "method", "vs", *(c[0] for c in VALUE_COLUMNS)]
    lines = []
    for row in rows:
        ref_name = reference_name(rows, row["case"])
        if row["status"] != "ok" or ref_name is None:
            continue
        ref = next(r for r in rows if r["case"] == row["case"] and r["method"] == ref_name)
        cells = [_ratio(get(row), get(ref)) for _, get, _ in VALUE_COLUMNS]
        lines.append([row["case"], row["method"], ref_name, *cells])
    return _table(header, lines)


def summary_table(rows: list[dict]) -> str:
    """Per method, the mean over the cases it finished: TRE mean and p90, SDlogJ, time, memory."""
    header = ["method", "cases", "TRE mean", "TRE p90", "SDlogJ", "fold %", "time s", "command s", "peak MB"]
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        done = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        if not done:
            continue
        columns = [c for c in VALUE_COLUMNS if c[0] in header]
        means = [_format(_mean([get(r) for r in done]), fmt) for _, get, fmt in columns]
        lines.append([method, str(len(done)), *means])
    return _table(header, lines)


def sets_table(rows: list[dict], sets: list[str]) -> str:
    """Per method, mean TRE and time over the cases of each set, the sets side by side."""
    header = ["method"]
    for name in sets:
        header += [f"{name}: cases", f"{name}: TRE mean", f"{name}: TRE p90", f"{name}: time s"]
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = [method]
        for name in sets:
            done = [r for r in rows if r["method"] == method and r.get("set", "synth") == name and r["status"] == "ok"]
            tre_mean = _mean([r["tre"]["mean"] for r in done])
            tre_p90 = _mean([r["tre"]["p90"] for r in done])
            time_s = _mean([r["time_s"] for r in done])
            cells += [
                str(len(done)),
                _format(tre_mean, "{:.2f}"),
                _format(tre_p90, "{:.2f}"),
                _format(time_s, "{:.1f}"),
            ]
        lines.append(cells)
    return _table(header, lines)


def most_accurate_peer(rows: list[dict], case: str) -> dict | None:
    """The peer (not this project, not 'none' or 'truth') with the lowest mean TRE on a case."""
    peers = [
        r
        for r in rows
        if r["case"] == case
        and r["status"] == "ok"
        and r["method"] not in ("none", "truth")
        and not r["method"].startswith("ikr")
    ]
    return min(peers, key=lambda r: r["tre"]["mean"], default=None)


def time_to_result_table(rows: list[dict]) -> str:
    """Per case: this project's registration call and whole command against the most accurate peer's time."""
    header = ["case", "ikr TRE", "ikr registration s", "ikr whole command s", "best peer", "peer TRE", "peer s",
              "peer s / ikr command s"]  # fmt: skip
    lines = []
    for row in rows:
        if row["method"] != DEFAULT_METHOD or row["status"] != "ok":
            continue
        peer = most_accurate_peer(rows, row["case"])
        command = row.get("command_s")
        cells = [row["case"], _format(row["tre"]["mean"], "{:.2f}"), _format(row["time_s"], "{:.1f}")]
        cells.append(_format(command, "{:.1f}"))
        if peer is None:
            cells += ["-", "-", "-", "-"]
        else:
            speedup = _ratio(peer["time_s"], command)
            cells += [
                peer["method"],
                _format(peer["tre"]["mean"], "{:.2f}"),
                _format(peer["time_s"], "{:.1f}"),
                speedup,
            ]
        lines.append(cells)
    return _table(header, lines)


def convention_table(checks: dict[str, dict]) -> str:
    """The translation check of every method."""
    header = ["method", "expected (mm, LPS)", "median displacement (mm)", "median pointwise error (mm)", "verdict"]
    lines = []
    for method, check in checks.items():
        if "verdict" not in check:
            lines.append([method, "-", "-", "-", f"{check['status']}: {check.get('reason', '')}"])
            continue
        expected = ", ".join(f"{v:g}" for v in check["expected_mm"])
        measured = ", ".join(f"{v:.2f}" for v in check["median_displacement_mm"])
        verdict = check["verdict"] + (f" (as {check['checked_as']})" if "checked_as" in check else "")
        lines.append([method, expected, measured, f"{check['median_error_mm']:.3f}", verdict])
    return _table(header, lines)
