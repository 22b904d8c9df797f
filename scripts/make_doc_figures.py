"""Render the user guide's pictures (docs/images/*.png) from real results of the library.

Runs the library on its procedural phantom made into a breathing-like pair (`ikr demo`'s case):
registers it, adds one clicked pair, measures a demo ablation margin, maps the expected error with
click suggestions, exports the transform and reads it back with SimpleITK, and draws coronal slices.
Usage: .venv/bin/python scripts/make_doc_figures.py [--seed 1] [--out docs/images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ImplicitKernelRegistrationLib.core.fields import sample_field, warp_image
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.io.transforms import write_transform
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.registration.refine import session_from_result
from ImplicitKernelRegistrationLib.review.margin import compute_margin
from ImplicitKernelRegistrationLib.review.uncertainty import expected_error_map, suggest_clicks
from ImplicitKernelRegistrationLib.slicer_bridge import MARGIN_CLASSES, MARGIN_TABLE_RANGE_MM
from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
from ImplicitKernelRegistrationLib.synthetic.synth import make_case
from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

WINDOW = (-200.0, 300.0)


def coronal(image: Image, y_index: int) -> np.ndarray:
    """A coronal slice (z up, x across) of an axis-aligned image."""
    return image.array[::-1, y_index, :].astype(np.float32)


def grey(slice_hu: np.ndarray) -> np.ndarray:
    """HU scaled to 0..1 in the soft-tissue window."""
    return np.clip((slice_hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0.0, 1.0)


def fusion(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Magenta-green fusion: fixed in green, moving in magenta; aligned structures look grey."""
    f, m = grey(fixed), grey(moving)
    return np.stack([m, f, m], axis=-1)


def checkerboard(fixed: np.ndarray, moving: np.ndarray, tile: int = 12) -> np.ndarray:
    """Alternating tiles of the fixed and moving slices."""
    zz, xx = np.indices(fixed.shape)
    mask = ((zz // tile) + (xx // tile)) % 2 == 0
    return np.where(mask, grey(fixed), grey(moving))


def save(fig: Figure, path: Path) -> None:
    """Write a figure as a small PNG."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=80)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def panels(images: list[np.ndarray], titles: list[str], path: Path, aspect: float, cmap: str | None = "gray") -> None:
    """A row of image panels with titles."""
    fig = Figure(figsize=(3.2 * len(images), 3.4))
    for i, (img, title) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(img, cmap=cmap if img.ndim == 2 else None, aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    save(fig, path)


def main() -> None:
    """Register the phantom pair, refine, measure margins, and draw every picture."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ct = make_phantom(seed=args.seed)[0]
    case = make_case(ct, "breathing", args.seed)
    fixed, moving = case.fixed, case.moving
    result = register(fixed, moving, RegistrationConfig(spacing_mm=3.0, device="cpu", seed=args.seed))
    warped = warp_image(moving, result.field)
    g = fixed.geometry
    aspect = g.spacing_mm[2] / g.spacing_mm[0]
    y = int(round(g.lps_to_index(case.landmarks_fixed_lps[:1])[0][1]))
    f, m, w = coronal(fixed, y), coronal(moving, y), coronal(warped, y)

    panels([grey(f), grey(m)], ["fixed CT", "moving CT"], out / "inputs.png", aspect)
    panels(
        [fusion(f, m), fusion(f, w)], ["before registration", "after registration"], out / "overlay_after.png", aspect
    )
    panels(
        [checkerboard(f, m), checkerboard(f, w), np.abs(f - m), np.abs(f - w)],
        ["checkerboard before", "checkerboard after", "|difference| before", "|difference| after"],
        out / "checkerboard.png",
        aspect,
    )

    # Refinement: one clicked pair moves the field locally.
    session = session_from_result(result, fixed)
    p = case.landmarks_fixed_lps[:1]
    q = case.landmarks_moving_lps[:1] + np.array([[0.0, 0.0, 6.0]])
    before = session.field.displacement_mm.copy()
    session.add_correspondences(p, q, ["pair 1"])
    change = np.linalg.norm(session.field.displacement_mm - before, axis=-1)
    idx = np.round(g.lps_to_index(p)[0]).astype(int)
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(grey(coronal(fixed, idx[1])), cmap="gray", aspect=aspect)
    ax.scatter([idx[0]], [g.size[2] - 1 - idx[2]], s=40, facecolors="none", edgecolors="yellow")
    ax.set_title("clicked point (fixed)", fontsize=9)
    ax.set_axis_off()
    ax = fig.add_subplot(1, 2, 2)
    shown = ax.imshow(change[::-1, idx[1], :], cmap="magma", aspect=aspect)
    ax.set_title("field change after the pair (mm)", fontsize=9)
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    save(fig, out / "refinement.png")
    residual = session.feedback()[0]["residual_mm"]
    moved = np.linalg.norm(sample_field(session.field, p) - sample_field(result.field, p))
    print(f"pair residual {residual:.3f} mm; field moved by {moved:.2f} mm")

    # Margins: a demo tumour and ablation zone, through the refined field.
    tumour, zone, true_margin = demo_tumour_and_zone(fixed, session.field, None, args.seed)
    margin = compute_margin(tumour, zone, session.field)
    k = np.round(g.lps_to_index(margin.min_margin_point_lps[None])[0]).astype(int)
    fig = Figure(figsize=(8.0, 3.8))
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(grey(coronal(fixed, k[1])), cmap="gray", aspect=aspect)
    ax.contour(zone.array[::-1, k[1], :], levels=[0.5], colors="lime", linewidths=1)
    ax.contour(margin.warped_tumour.array[::-1, k[1], :], levels=[0.5], colors="red", linewidths=1)
    ax.scatter([k[0]], [g.size[2] - 1 - k[2]], marker="x", color="yellow", s=40)
    ax.set_title("tumour (red), zone (green), minimum (x)", fontsize=8)
    ax.set_axis_off()
    ax = fig.add_subplot(1, 2, 2, projection="3d")
    pts = margin.surface.points_lps
    # The Slicer module's clinical classes (red < 0, yellow 0-5, green >= 5 mm), with their legend.
    lo, hi = MARGIN_TABLE_RANGE_MM
    bounds = [lo] + [c[1] for c in MARGIN_CLASSES[:-1]] + [hi]
    cmap = ListedColormap([c[3] for c in MARGIN_CLASSES])
    shown = ax.scatter(*pts.T, c=np.clip(margin.margins_mm, lo, hi), cmap=cmap, norm=BoundaryNorm(bounds, cmap.N), s=3)
    ax.set_title(f"margin map: min {margin.min_margin_mm:.1f} mm (true {true_margin:.1f})", fontsize=8)
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, fraction=0.046, label="margin (mm)", ticks=bounds).ax.tick_params(labelsize=7)
    share = [np.mean((margin.margins_mm >= c[0]) & (margin.margins_mm < c[1])) for c in MARGIN_CLASSES]
    legend = [
        Patch(color=c[3], label=f"{c[2]}: {100 * f:.0f} % of the surface")
        for c, f in zip(MARGIN_CLASSES, share, strict=True)
    ]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    save(fig, out / "margin_overlay.png")

    uncertainty_figure(result, fixed, zone, aspect, out / "uncertainty.png")
    export_figure(result, fixed, moving, warped, y, aspect, out / "export.png")


def uncertainty_figure(result, fixed: Image, near: Image, aspect: float, path: Path) -> None:
    """The expected-error map on the coronal slice of the best suggestion, with the suggested clicks.

    `near` (the ablation zone) lies on the fixed grid.
    """
    g = fixed.geometry
    emap = expected_error_map(result)
    body = Image(body_mask(fixed).astype(np.uint8), g)
    clicks = suggest_clicks(emap, 5, near_mask=near, region=body)
    idx = np.round(g.lps_to_index(clicks)).astype(int)
    y = int(idx[0, 1])
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(emap.array[::-1, y, :], cmap="viridis", vmin=0.0, vmax=max(1.0, float(emap.array.max())),
                      aspect=aspect)  # fmt: skip
    ax.contour(near.array[::-1, y, :], levels=[0.5], colors="white", linewidths=1)
    in_plane = np.abs(idx[:, 1] - y) <= 3
    ax.scatter(idx[in_plane, 0], g.size[2] - 1 - idx[in_plane, 2], marker="+", s=80, color="red")
    for number, (i, k) in enumerate(zip(idx[:, 0], idx[:, 2], strict=True), start=1):
        if in_plane[number - 1]:
            ax.annotate(str(number), (i, g.size[2] - 1 - k), color="red", fontsize=8, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
    ax.set_title("expected registration error (mm); suggested clicks (+) near the ablation zone (white)", fontsize=8)
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, fraction=0.046, label="mm")
    fig.tight_layout()
    save(fig, path)


def export_figure(result, fixed: Image, moving: Image, warped: Image, y: int, aspect: float, path: Path) -> None:
    """The exported transform.h5 read back by SimpleITK resamples the moving CT like the library does."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        h5 = write_transform(result.field, Path(tmp) / "transform.h5")
        transform = sitk.ReadTransform(str(h5))
        outside = float(moving.array.min())  # what warp_image puts where a point maps outside the moving CT
        resampled = sitk.Resample(moving.to_sitk(), fixed.to_sitk(), transform, sitk.sitkLinear, outside)
    by_sitk = Image(sitk.GetArrayFromImage(resampled), fixed.geometry)
    a, b = coronal(warped, y), coronal(by_sitk, y)
    whole = np.abs(warped.array.astype(np.float64) - by_sitk.array)
    print(f"export: |difference| median {np.median(whole):.2f} HU, max {whole.max():.2f} HU")
    panels(
        [grey(a), grey(b), np.clip(np.abs(a - b) / 50.0, 0.0, 1.0)],
        ["warped by ikr", "transform.h5 applied by SimpleITK", f"|difference| (0-50 HU; max {whole.max():.1f} HU)"],
        path,
        aspect,
    )


if __name__ == "__main__":
    main()
