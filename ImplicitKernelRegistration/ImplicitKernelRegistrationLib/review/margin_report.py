"""`ikr margin`: read the masks and the transform, measure the margins, write the report folder.

Outputs (written together through io/atomic.atomic_directory: all or nothing):
- `margin.json`: the figures (see margin.MarginResult.figures), the inputs' file names, the
  software version; patient name/ID only with include_phi;
- `report.html`: self-contained (PNG images embedded as base64): axial, coronal and sagittal
  overlays through the point of minimal margin, a histogram of the surface margins, the numbers;
- `margin_points.csv`: one row per tumour-surface point, columns x,y,z (LPS mm) and margin_mm
  (readable by io.points.read_points; the margin lands in `extra`);
- `tumour_surface_margin.vtp`: the warped tumour surface with point scalars `margin_mm`, points in
  LPS mm and the field-data string array SPACE = "LPS", which is how 3D Slicer (>= 4.11) marks the
  coordinate system of a .vtp model (vtkMRMLModelStorageNode reads that field; files without it
  are also taken as LPS by current Slicer);
- `tumour_warped.nii.gz`: the warped tumour mask (uint8) on the post-ablation (fixed) grid.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..core.errors import IkrError
from ..core.fields import Field
from ..core.geometry import Geometry, Image
from ..io.atomic import atomic_directory, write_text_atomic
from ..io.images import image_format, read_image, write_image
from ..io.segmentations import read_labels
from ..io.transforms import read_field
from .margin import MarginResult, compute_margin, fraction_key

OUTPUT_FILES = {
    "json": "margin.json",
    "html": "report.html",
    "points": "margin_points.csv",
    "surface": "tumour_surface_margin.vtp",
    "warped": "tumour_warped.nii.gz",
}
MARGIN_RANGE_MM = (-5.0, 10.0)
UNCERTAINTY_LEVELS_MM = (1.0, 2.0, 4.0)  # isolines of the expected registration error on the overlays


# ----------------------------------------------------------------------------- reading


def _grids_match(a: Geometry, b: Geometry, tol: float = 1e-3) -> bool:
    """Whether two geometries describe the same voxel grid (size, spacing, origin, direction)."""
    return (
        a.size == b.size
        and np.allclose(a.spacing_mm, b.spacing_mm, atol=tol)
        and np.allclose(a.origin_lps, b.origin_lps, atol=10 * tol)
        and np.allclose(a.direction, b.direction, atol=tol)
    )


def _grid_text(g: Geometry) -> str:
    """A short description of a grid for error messages."""
    spacing = tuple(round(s, 4) for s in g.spacing_mm)
    return f"size {g.size}, spacing {spacing}, origin {tuple(round(o, 2) for o in g.origin_lps)}"


def read_mask(path: str | os.PathLike, reference: Image | None, label: int | None, what: str) -> Image:
    """Read a tumour/ablation mask: label map, .seg.nrrd, DICOM-SEG (needs `reference`) or a float fraction image.

    With `label`, only that label is the object; else every nonzero voxel. With a `reference`, the
    mask must lie on the reference image's grid (a DICOM-SEG is placed on it).
    """
    path = Path(path)
    is_dicom = path.is_dir() or (path.is_file() and image_format(path) is None)
    try:
        mask, _ = read_labels(path, reference if is_dicom else None)
    except IkrError as err:
        if "not integers" not in err.problem:
            raise
        mask = read_image(path)  # a fractional (partial-volume) mask in [0, 1]
        if mask.array.min() < 0 or mask.array.max() > 1:
            raise IkrError(f"the {what} mask is neither a label map nor a fraction image in [0, 1]", path) from err
    if reference is not None and not _grids_match(mask.geometry, reference.geometry):
        raise IkrError(
            f"the {what} mask's grid ({_grid_text(mask.geometry)}) does not match its image's grid "
            f"({_grid_text(reference.geometry)})",
            path,
        )
    if label is not None:
        if not np.any(mask.array == label):
            raise IkrError(f"the {what} mask has no voxel with label {label}", path)
        mask = mask.with_array((mask.array == label).astype(np.uint8))
    return mask


def _read_transform(path: str | os.PathLike | None, fixed: Geometry) -> Field | None:
    """The displacement field from a vector image or ITK transform file (None: identity)."""
    return None if path is None else read_field(path, reference_geometry=fixed)


# ----------------------------------------------------------------------------- writing


def points_csv(result: MarginResult) -> str:
    """margin_points.csv: x,y,z (LPS mm) and margin_mm per tumour-surface point."""
    lines = ["x,y,z,margin_mm"]
    for (x, y, z), m in zip(result.surface.points_lps, result.margins_mm, strict=True):
        lines.append(f"{x:.3f},{y:.3f},{z:.3f},{m:.3f}")
    return "\n".join(lines) + "\n"


def write_surface_vtp(result: MarginResult, path: Path) -> None:
    """The tumour surface with point scalars `margin_mm`, LPS mm, field data SPACE=LPS (Slicer's tag)."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import vtkStringArray
    from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter

    poly = result.surface.to_vtk()
    scalars = numpy_support.numpy_to_vtk(result.margins_mm.astype(np.float32), deep=True)
    scalars.SetName("margin_mm")
    poly.GetPointData().SetScalars(scalars)
    space = vtkStringArray()
    space.SetName("SPACE")
    space.InsertNextValue("LPS")
    poly.GetFieldData().AddArray(space)
    writer = vtkXMLPolyDataWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(poly)
    writer.SetDataModeToBinary()
    if writer.Write() != 1:
        raise IkrError("cannot write the surface file", path)


# ----------------------------------------------------------------------------- figures


def _png(figure: object) -> str:
    """A matplotlib Figure as base64 PNG text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plane(centre: np.ndarray, half_mm: float, step_mm: float, normal_axis: int) -> Geometry:
    """A one-voxel-thick axis-aligned LPS grid through `centre`, normal to LPS axis `normal_axis`."""
    n = int(np.ceil(2 * half_mm / step_mm)) + 1
    size = [n, n, n]
    size[normal_axis] = 1
    origin = centre - half_mm
    origin[normal_axis] = centre[normal_axis]
    return Geometry(tuple(size), (step_mm,) * 3, tuple(float(v) for v in origin))


def _slice(image: Image, plane: Geometry, default: float) -> np.ndarray:
    """`image` resampled linearly on a plane grid, as a 2D array (rows, cols)."""
    src = image.geometry.apply_to_sitk(sitk.GetImageFromArray(image.array.astype(np.float32)))
    out = sitk.Resample(src, plane.reference_image(), sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    return np.squeeze(sitk.GetArrayFromImage(out))


VIEWS = (  # name, normal LPS axis, horizontal axis, vertical axis, vertical flipped (superior up)
    ("axial", 2, 0, 1, False),
    ("coronal", 1, 0, 2, True),
    ("sagittal", 0, 1, 2, True),
)
AXIS_NAMES = ("x (L+) mm", "y (P+) mm", "z (S+) mm")


def _overlay(result: MarginResult, background: Image | None, view: tuple, uncertainty: Image | None = None) -> str:
    """One overlay (base64 PNG) through the minimal-margin point: CT, zone, tumour contour, margins.

    With an expected-error map, its 1, 2 and 4 mm isolines are drawn too (dotted, labelled).
    """
    from matplotlib.figure import Figure

    name, normal, h_axis, v_axis, superior_up = view
    m = result.min_margin_point_lps
    extent_pts = result.surface.points_lps
    half = float(max(np.max(np.abs(extent_pts - m)) + 15.0, 30.0))
    step = max(min(0.5, half / 150.0), half / 300.0)
    plane = _plane(m.copy(), half, step, normal)
    zone = _slice(result.ablation_fraction, plane, 0.0)
    tumour = _slice(result.warped_tumour_fraction, plane, 0.0)
    lo = m - half
    extent = (lo[h_axis], lo[h_axis] + 2 * half, lo[v_axis], lo[v_axis] + 2 * half)
    fig = Figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    origin = "lower" if superior_up else "upper"
    if superior_up:
        extent = (extent[0], extent[1], extent[2], extent[3])
    else:
        extent = (extent[0], extent[1], extent[3], extent[2])
    if background is not None:
        ax.imshow(_slice(background, plane, -1000.0), cmap="gray", vmin=-160, vmax=240, extent=extent, origin=origin)
    else:
        ax.set_facecolor("black")
    ax.imshow(np.ma.masked_less(zone, 0.5), cmap="autumn", alpha=0.3, extent=extent, origin=origin)
    ax.contour(zone, levels=[0.5], colors="orange", linewidths=1.2, extent=extent, origin=origin)
    ax.contour(tumour, levels=[0.5], colors="cyan", linewidths=1.2, extent=extent, origin=origin)
    if uncertainty is not None:
        error = _slice(uncertainty, plane, 0.0)
        levels = [v for v in UNCERTAINTY_LEVELS_MM if error.min() < v < error.max()]
        if levels:
            lines = ax.contour(error, levels=levels, colors="white", linewidths=0.8, linestyles="dotted",
                               extent=extent, origin=origin)  # fmt: skip
            ax.clabel(lines, fmt="%g mm", fontsize=7)
    near = np.abs(extent_pts[:, normal] - m[normal]) <= max(step, 0.75)
    sc = ax.scatter(
        extent_pts[near, h_axis], extent_pts[near, v_axis], c=result.margins_mm[near], s=6,
        cmap="RdYlGn", vmin=MARGIN_RANGE_MM[0], vmax=MARGIN_RANGE_MM[1],
    )  # fmt: skip
    ax.plot([m[h_axis]], [m[v_axis]], marker="x", color="magenta", markersize=10, mew=2)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(f"{name} through the minimal margin")
    ax.set_xlabel(AXIS_NAMES[h_axis])
    ax.set_ylabel(AXIS_NAMES[v_axis])
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label="margin (mm)")
    fig.tight_layout()
    return _png(fig)


def _histogram(result: MarginResult) -> str:
    """Area-weighted histogram of the surface margins (base64 PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    share = 100.0 * result.point_areas_mm2 / np.sum(result.point_areas_mm2)
    ax.hist(result.margins_mm, bins=40, weights=share, color="steelblue")
    for t in result.surface_fractions:
        ax.axvline(t, color="gray", linestyle="--", linewidth=1)
    ax.axvline(result.min_margin_mm, color="magenta", linewidth=1.5, label="minimum")
    ax.set_xlabel("surface margin (mm; positive inside the ablation zone)")
    ax.set_ylabel("% of tumour surface")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _rows(items: dict) -> str:
    """HTML table rows (escaped) of a dict."""
    return "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())


def report_html(
    result: MarginResult,
    info: dict,
    background: Image | None,
    uncertainty: Image | None = None,
    interval: dict | None = None,
) -> str:
    """The self-contained HTML report: overlays, histogram, figures (with the margin's interval), inputs."""
    figures = result.figures()
    rows = [
        ("Minimal ablative margin", f"{figures['min_margin_mm']:.2f} mm"),
        ("Margin 5th / 25th / 50th percentile", "{:.2f} / {:.2f} / {:.2f} mm".format(
            figures["margin_p5_mm"], figures["margin_p25_mm"], figures["margin_p50_mm"])),
    ]  # fmt: skip
    if interval:
        rows += [
            ("Minimal margin, 5th-95th percentile over the registration's uncertainty",
             f"{interval['min_margin_p5_mm']:.2f} .. {interval['min_margin_p95_mm']:.2f} mm"),
            ("Probability that the minimal margin is below 0 mm / 5 mm",
             f"{interval['p_min_margin_below_0mm']:.2f} / {interval['p_min_margin_below_5mm']:.2f}"),
        ]  # fmt: skip
    for t, frac in result.surface_fractions.items():
        rows.append((f"Tumour surface with margin &ge; {t:g} mm", f"{100 * frac:.1f} %"))
    p = figures["min_margin_point_lps"]
    rows += [
        ("Tumour volume outside the zone", f"{figures['outside_volume_ml']:.3f} ml"),
        ("Coverage", f"{figures['coverage_percent']:.1f} %"),
        ("Minimal margin at (LPS)", f"({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) mm"),
        ("Tumour volume before / after warping", "{:.2f} / {:.2f} ml".format(
            figures["tumour_volume_moving_ml"], figures["tumour_volume_warped_ml"])),
        ("Ablation zone volume", f"{figures['ablation_volume_ml']:.2f} ml"),
    ]  # fmt: skip
    table = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    inputs = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info["inputs"].items()
    )
    patient = ""
    if info.get("patient"):
        patient = (
            "<h2>Patient</h2><table>"
            + "\n".join(
                f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info["patient"].items()
            )
            + "</table>"
        )
    overlays = "".join(
        f'<img alt="{v[0]}" src="data:image/png;base64,{_overlay(result, background, v, uncertainty)}">' for v in VIEWS
    )
    legend = " Dotted white lines: expected registration error (mm)." if uncertainty is not None else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Ablation margin report</title>
<style>body{{font-family:sans-serif;margin:2em}} th{{text-align:left;padding-right:1.5em}} img{{margin:4px}}</style>
</head><body>
<h1>Ablation margin report</h1>
<p>Margins are signed distances (mm) from the warped tumour surface to the ablation-zone boundary:
positive inside the zone, negative outside. Coordinates are LPS mm. Tumour contour: cyan; ablation
zone: orange; minimal margin: magenta cross.{legend}</p>
<table>{table}</table>
<h2>Overlays</h2>{overlays}
<h2>Surface margins</h2><img alt="histogram" src="data:image/png;base64,{_histogram(result)}">
<h2>Inputs</h2><table>{inputs}</table>
{patient}
<p>ImplicitKernelRegistration {html.escape(__version__)}</p>
</body></html>
"""


# ----------------------------------------------------------------------------- the command


def _check_outdir(outdir: Path) -> None:
    """Refuse an output folder that holds other things than an earlier margin report."""
    if outdir.exists() and not outdir.is_dir():
        raise IkrError("the output path exists and is not a folder", outdir)
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / OUTPUT_FILES["json"]).is_file():
        raise IkrError("the output folder exists and holds other files; choose a new or empty folder", outdir)


def _patient(*images: Image | None) -> dict:
    """PatientName/PatientID found in the images' meta (present only when read with include_phi)."""
    for image in images:
        if image is not None and ("PatientName" in image.meta or "PatientID" in image.meta):
            return {k: image.meta.get(k, "") for k in ("PatientName", "PatientID")}
    return {}


def run_margin(
    tumour_path: str | os.PathLike,
    ablation_path: str | os.PathLike,
    transform_path: str | os.PathLike | None,
    outdir: str | os.PathLike,
    thresholds_mm: tuple[float, ...] = (0.0, 5.0),
    include_phi: bool = False,
    pre_image_path: str | os.PathLike | None = None,
    post_image_path: str | os.PathLike | None = None,
    tumour_label: int | None = None,
    ablation_label: int | None = None,
    uncertainty_path: str | os.PathLike | None = None,
) -> dict:
    """Measure the margins and write the report folder; returns the content of margin.json.

    With `uncertainty_path` (the registration's expected-error map, uncertainty.nii.gz) the minimal
    margin gets a 5th-95th percentile interval and probabilities (uncertainty.margin_interval), and the
    overlays show the expected error.

    `pre_image_path` (the CT the tumour was segmented on) and `post_image_path` (the CT of the
    ablation zone, also the overlays' background) are optional; when given, each mask must lie on
    its image's grid. Patient name and ID (DICOM images only) are reported only with include_phi.
    """
    outdir = Path(outdir)
    _check_outdir(outdir)
    pre = read_image(pre_image_path, include_phi=include_phi) if pre_image_path else None
    post = read_image(post_image_path, include_phi=include_phi) if post_image_path else None
    tumour = read_mask(tumour_path, pre, tumour_label, "tumour")
    ablation = read_mask(ablation_path, post, ablation_label, "ablation-zone")
    field = _read_transform(transform_path, ablation.geometry)
    if uncertainty_path is not None and field is None:
        raise IkrError("an uncertainty map needs the transform it belongs to (--transform)", uncertainty_path)
    names = (str(tumour_path), str(ablation_path), None if transform_path is None else str(transform_path))
    result = compute_margin(tumour, ablation, field, tuple(thresholds_mm), names)
    inputs = {
        "tumour": Path(tumour_path).name,
        "ablation": Path(ablation_path).name,
        "transform": Path(transform_path).name if transform_path else "identity (none given)",
    }
    if pre_image_path:
        inputs["pre_image"] = Path(pre_image_path).name
    if post_image_path:
        inputs["post_image"] = Path(post_image_path).name
    info = {"inputs": inputs}
    uncertainty = interval = None
    if uncertainty_path is not None:
        from .uncertainty import margin_interval

        uncertainty = read_image(uncertainty_path)
        interval = margin_interval(tumour, ablation, field, uncertainty, point=result)
        interval.pop("sampled_min_margins_mm", None)
        inputs["uncertainty"] = Path(uncertainty_path).name
    if include_phi:
        info["patient"] = _patient(pre, post)
    return write_margin_report(outdir, result, info, post, uncertainty, interval)


def write_margin_report(
    outdir: str | os.PathLike,
    result: MarginResult,
    info: dict,
    background: Image | None = None,
    uncertainty: Image | None = None,
    interval: dict | None = None,
) -> dict:
    """Write report.html, margin.json, margin_points.csv, the surface and the warped tumour (all or nothing).

    `info` holds the inputs' names (and the patient, when asked); `interval` the minimal margin's interval
    over the expected error `uncertainty` (uncertainty.margin_interval). Returns margin.json's content.
    """
    outdir = Path(outdir)
    _check_outdir(outdir)
    summary = {
        **result.figures(),
        **(interval or {}),
        "software": "ImplicitKernelRegistration",
        "software_version": __version__,
        "coordinate_system": "LPS",
        **info,
        "files": OUTPUT_FILES,
    }
    page = report_html(result, info, background, uncertainty, interval)
    with atomic_directory(outdir) as tmp:
        write_text_atomic(tmp / OUTPUT_FILES["json"], json.dumps(summary, indent=2))
        write_text_atomic(tmp / OUTPUT_FILES["html"], page)
        write_text_atomic(tmp / OUTPUT_FILES["points"], points_csv(result))
        write_surface_vtp(result, tmp / OUTPUT_FILES["surface"])
        write_image(result.warped_tumour, tmp / OUTPUT_FILES["warped"])
    return summary


__all__ = [
    "run_margin",
    "write_margin_report",
    "read_mask",
    "report_html",
    "points_csv",
    "write_surface_vtp",
    "fraction_key",
]
