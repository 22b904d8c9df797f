"""TRE against registration time (log axis), one colour per method, one marker per case.

Runs in the peers' venv (matplotlib): `python plot.py results.json plot.png`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "osD^vP*Xh<>"


def plot(results: dict, out: Path) -> None:
    """Draw the figure and write it atomically."""
    rows = [r for r in results["rows"] if r["status"] == "ok" and r["time_s"] > 0]  # not 'none', not 'truth'
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in results["rows"]))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    for i, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        own = method.startswith("ikr")
        for r in mine:
            ax.scatter(
                r["time_s"],
                r["tre"]["mean"],
                color=colours(i % 10),
                marker=MARKERS[cases.index(r["case"]) % len(MARKERS)],
                s=70 if own else 45,
                edgecolors="black" if own else "none",
                zorder=3,
            )
        ax.scatter([], [], color=colours(i % 10), marker="o", label=method)
    for j, case in enumerate(cases):
        ax.scatter([], [], facecolors="none", edgecolors="black", marker=MARKERS[j % len(MARKERS)], label=case)
    ax.set_xscale("log")
    ax.set_xlabel("registration time (s, log scale)")
    ax.set_ylabel("TRE mean (mm)")
    ax.set_title(f"TRE against time: {results['mode']} run, {results['machine']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")), Path(sys.argv[2]))
