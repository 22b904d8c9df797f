"""Render the module icon (128 x 128 PNG): a deformed grid with a few matched keypoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OUT = (
    Path(__file__).resolve().parents[1]
    / "ImplicitKernelRegistration"
    / "Resources"
    / "Icons"
    / "ImplicitKernelRegistration.png"
)


def warp(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A smooth swirl, the icon's 'deformation'."""
    r2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
    a = 0.9 * np.exp(-r2 / 0.08)
    c, s = np.cos(a), np.sin(a)
    return 0.5 + c * (x - 0.5) - s * (y - 0.5), 0.5 + s * (x - 0.5) + c * (y - 0.5)


def main() -> None:
    """Draw the icon and write it."""
    fig = Figure(figsize=(1.28, 1.28), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    t = np.linspace(0, 1, 60)
    for v in np.linspace(0.05, 0.95, 8):
        ax.plot(*warp(t, np.full_like(t, v)), color="#2b6cb0", lw=1.2)
        ax.plot(*warp(np.full_like(t, v), t), color="#2b6cb0", lw=1.2)
    pts = np.array([[0.3, 0.35], [0.65, 0.3], [0.5, 0.7], [0.75, 0.68]])
    wx, wy = warp(pts[:, 0], pts[:, 1])
    for (x0, y0), x1, y1 in zip(pts, wx, wy, strict=True):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "#c53030", "lw": 1.6})
    ax.scatter(wx, wy, s=28, color="#c53030", zorder=3)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=100, transparent=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
