"""Synthetic registration cases: a CT, a deformed copy of it, and the exact field between them.

`make_case(ct, family, seed)` draws a smooth deformation of the requested family, adds a small
rigid offset, builds the moving image, and picks landmark pairs on distinctive anatomy. The true
field `d` (fixed -> moving, ITK convention: anatomy at fixed point p sits at p + d(p) in the moving
image) is built first; its numerical inverse `u` (fields.invert) gives the moving image
M(y) = F(y + u(y)), so `warp_image(moving, true_field)` reproduces the fixed image.

Families (LPS: +z is superior; `magnitude_mm` overrides the seeded magnitude):

- breathing: cranio-caudal dominant motion (anatomy moves inferiorly, as from exhale to inhale),
  largest at the lung bases / diaphragm and fading towards the apex (Gaussian profile in z with
  sigma 90-130 mm above the base, 70-110 mm below it) and outside the body; mild anterior-posterior
  expansion (10-25 % of the amplitude) and lateral expansion (3-10 %), plus a 10 % smooth random
  perturbation. Mean displacement within the lungs 5-12 mm (seeded; `magnitude_mm` sets it, 4-15
  mm is the realistic range), maxima about 1.5-2.5 times the mean (about 30 mm at 15 mm). Without
  lungs in view the body is used and the diaphragm is taken to lie at the top of the volume.
- bspline: a cubic B-spline with random Gaussian coefficients, control spacing 35-50 mm; mean
  magnitude within the body 3-8 mm.
- local: a ball of radius 15-30 mm around a soft-tissue point (the liver when the label map names
  one) shrinks (3 cases in 4) or grows by 10-40 % of its volume: uniform scaling inside, volume-
  preserving radial displacement outside fading to zero between 2 and 4 radii; displacement at
  the ball's surface 0.5-5 mm (`magnitude_mm` sets it), plus a smooth background of mean 0.5-1.5 mm.
- sliding: the lungs and everything below them in the same cranio-caudal columns (the diaphragm,
  the upper abdomen) move along z with the breathing profile, while the chest wall and the
  mediastinum outside those columns stay still: a tangential discontinuity smoothed over about
  4 mm plus the working grid's spacing (the motion tapers over about 25 mm at the columns' tops,
  so that the field stays invertible). Mean displacement within the lungs 5-12 mm. The lungs come
  from the label map (labels whose name in `labels.meta["label_names"]` contains "lung") or from a
  threshold (< -400 HU inside the body, the largest components); without lungs the region inside
  the body deeper than 20 mm slides against the body wall.

Every case also gets (unless switched off): a rigid offset about the image centre (rotation 0.5-2
degrees about a random axis, translation 0.5-3 mm) composed after the deformation into the true
field; an intensity change in the moving image only (a smooth multiplicative change of
(HU + 1000) within +-3 % and a smooth offset within +-10 HU in tissue; for `local`, the moved ball
also turns 30-60 HU hypodense, like an ablation zone); and fresh correlated Gaussian noise
(`noise_hu` standard deviation) in each image.

The fields are drawn and inverted (fields.invert) on a working grid of about 5 mm spacing (every
k-th CT voxel) and interpolated trilinearly onto the CT's grid; that interpolated true field is the
truth. Its inverse is refined there by two fixed-point steps, and the moving image is sampled from
the CT by cubic B-spline interpolation (labels by nearest neighbour). `params` records the inverse's
residuals (mm) and the smallest Jacobian; a deformation whose Jacobian would fall below 0.25 is
redrawn (bspline) or scaled down (`shrink_factor`). Landmarks are 3D Harris corners of the CT
(structure tensor on a grid of about 2.5 mm, HU clipped to [-1000, 300]) inside the body, local
maxima at least 10 mm apart, strongest first with seeded tie-breaking, whose fixed and moving
points both lie well inside the image.

`write_case` writes fixed.nii.gz, moving.nii.gz, true_displacement.nii.gz (3-component float32
vectors, LPS mm), landmarks_fixed.csv / landmarks_moving.csv (header x,y,z; LPS mm), the label
maps when present and case.json (family, seed, params), all at once via a temporary directory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ..core.errors import IkrError
from ..core.fields import (
    Field,
    invert,
    jacobian_determinant,
    sample_field,
    transform_points,
)
from ..core.geometry import Geometry, Image
from ..io.atomic import atomic_directory

FAMILIES = ("breathing", "bspline", "local", "sliding")
WORKING_SPACING_MM = 5.0
LANDMARK_SPACING_MM = 2.5
LANDMARK_MIN_DISTANCE_MM = 10.0
AIR_HU = -1000.0
MIN_JACOBIAN = 0.25
SLIDING_SIGMA_MM = 4.0
SLIDING_TAPER_MM = 25.0
POLISH_ITERATIONS = 2


@dataclass
class SynthCase:
    """A synthetic registration case with its exact fixed -> moving field and landmark pairs."""

    fixed: Image
    moving: Image
    true_field: Field
    landmarks_fixed_lps: np.ndarray
    landmarks_moving_lps: np.ndarray
    fixed_labels: Image | None
    moving_labels: Image | None
    family: str
    seed: int
    params: dict


# ----------------------------------------------------------------------------- grids and masks


def _coarse_geometry(geometry: Geometry, target_mm: float) -> tuple[Geometry, int]:
    """A grid every `factor`-th voxel of `geometry` (same origin and direction) covering it, and the factor."""
    factor = max(1, round(target_mm / min(geometry.spacing_mm)))
    size = tuple(max(2, math.ceil((n - 1) / factor) + 1) for n in geometry.size)
    spacing = tuple(s * factor for s in geometry.spacing_mm)
    return Geometry(size, spacing, geometry.origin_lps, geometry.direction), factor


def _downsample(values: np.ndarray, factor: int, coarse: Geometry, smooth: bool = True) -> np.ndarray:
    """Every `factor`-th voxel (box-smoothed first when `smooth`), edge-padded to the coarse grid."""
    v = values
    if smooth and factor > 1:
        v = ndimage.uniform_filter(values.astype(np.float32), size=2 * (factor // 2) + 1, mode="nearest")
    v = v[::factor, ::factor, ::factor]
    return np.pad(v, [(0, n - m) for n, m in zip(coarse.shape_zyx, v.shape, strict=True)], mode="edge")


def _upsample(values: np.ndarray, factor: int, fine: Geometry) -> np.ndarray:
    """Trilinear upsampling of (z, y, x, c) values from a `factor`-times coarser grid onto `fine`."""
    if factor == 1:
        return np.ascontiguousarray(values[: fine.shape_zyx[0], : fine.shape_zyx[1], : fine.shape_zyx[2]])
    vol = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    size = [(n - 1) * factor + 1 for n in values.shape[:3]]
    out = torch.nn.functional.interpolate(vol, size=size, mode="trilinear", align_corners=True)[0]
    nz, ny, nx = fine.shape_zyx
    return np.ascontiguousarray(out[:, :nz, :ny, :nx].permute(1, 2, 3, 0).numpy())


def _sample_on_fine(
    values: np.ndarray,
    factor: int,
    fine: Geometry,
    displacement_mm: np.ndarray | None = None,
    mode: str = "bilinear",
    outside: float | None = None,
) -> np.ndarray:
    """Values (z, y, x[, c]) on a grid `factor` times coarser than `fine` (same origin and direction),
    sampled at every fine voxel centre y moved to y + displacement(y); (z, y, x, c) float32.

    Trilinear ("bilinear") or "nearest" via torch.grid_sample; beyond the grid the edge value is
    repeated, or `outside` is used where the point lies over half a voxel outside.
    """
    vol = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    vol = (vol[None] if vol.ndim == 3 else vol.permute(3, 0, 1, 2))[None]
    sizes = np.asarray(values.shape[:3][::-1], dtype=np.float64)  # x, y, z
    scale = 2.0 / (np.maximum(sizes - 1.0, 1.0) * factor)  # fine index -> normalised coordinate
    to_norm = np.linalg.inv(fine.voxel_to_mm_matrix()).T * scale[None, :]
    to_norm = torch.from_numpy(to_norm.astype(np.float32))
    limit = torch.from_numpy((1.0 + scale * factor * 0.5).astype(np.float32))  # half a voxel beyond the edge
    nz, ny, nx = fine.shape_zyx
    axes = [torch.from_numpy((np.arange(n) * scale[k] - 1.0).astype(np.float32)) for k, n in enumerate((nx, ny, nz))]
    out = np.empty((nz, ny, nx, vol.shape[1]), dtype=np.float32)
    chunk = max(1, 1_000_000 // (ny * nx))
    for z0 in range(0, nz, chunk):
        z1 = min(nz, z0 + chunk)
        grid = torch.empty((z1 - z0, ny, nx, 3), dtype=torch.float32)
        grid[..., 0] = axes[0][None, None, :]
        grid[..., 1] = axes[1][None, :, None]
        grid[..., 2] = axes[2][z0:z1, None, None]
        if displacement_mm is not None:
            grid += torch.from_numpy(np.ascontiguousarray(displacement_mm[z0:z1], dtype=np.float32)) @ to_norm
        sampled = torch.nn.functional.grid_sample(
            vol, grid[None], mode=mode, padding_mode="border", align_corners=True
        )[0]
        if outside is not None:
            sampled[:, (grid.abs() > limit).any(dim=-1)] = outside
        out[z0:z1] = sampled.permute(1, 2, 3, 0).numpy()
    return out


def _superior_axis(geometry: Geometry) -> tuple[int, int]:
    """The array axis (of z, y, x) most aligned with LPS +z, and +1/-1 if index increases superiorly."""
    column = int(np.argmax(np.abs(geometry.direction_matrix[2])))
    return 2 - column, int(np.sign(geometry.direction_matrix[2, column]) or 1)


def _in_plane_structure(axis: int) -> np.ndarray:
    """A 3x3x3 structuring element connecting voxels only within planes normal to `axis`."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    index = [slice(None)] * 3
    index[axis] = 1
    structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    return structure


def _largest_components(mask: np.ndarray, keep: int, min_fraction: float) -> np.ndarray:
    """The `keep` largest connected components at least `min_fraction` the size of the largest."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:keep]
    chosen = [i + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]
    return np.isin(lab, chosen)


def _body_mask(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Body: > -500 HU, the largest component, holes filled slice by slice (axially)."""
    axis, _ = _superior_axis(geometry)
    mask = ndimage.binary_opening(hu > -500.0, iterations=1)
    mask = _largest_components(mask, keep=1, min_fraction=1.0)
    return ndimage.binary_fill_holes(mask, structure=_in_plane_structure(axis))


def _named_labels(labels: Image | None, word: str) -> list[int]:
    """Label values whose name in labels.meta['label_names'] contains `word`."""
    names = {} if labels is None else labels.meta.get("label_names", {})
    return [int(k) for k, v in names.items() if word in str(v).lower()]


def _lung_mask(hu: np.ndarray, body: np.ndarray, labels: np.ndarray | None, lung_values: list[int]) -> np.ndarray:
    """Lungs from named labels, else < -400 HU inside the body (the two largest components)."""
    if labels is not None and lung_values:
        mask = np.isin(labels, lung_values)
    else:
        mask = _largest_components((hu < -400.0) & body, keep=2, min_fraction=0.1)
    mask = ndimage.binary_closing(mask, iterations=2) | mask
    return ndimage.binary_fill_holes(mask)


# ----------------------------------------------------------------------------- smooth random fields


def _bspline_basis(n: int, step: float, control_mm: float) -> np.ndarray:
    """Cubic B-spline weights (n samples x control points) along one axis, control grid padded by 2."""
    u = np.arange(n) * step / control_mm  # sample positions in control units, first sample at 0
    count = int(np.floor(u.max())) + 4
    t = u[:, None] - (np.arange(count)[None, :] - 1.0)
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def _bspline_field(geometry: Geometry, control_mm: float, rng: np.random.Generator, components: int) -> np.ndarray:
    """A cubic B-spline with unit-normal coefficients, control points every `control_mm` along the axes."""
    wz, wy, wx = (
        _bspline_basis(n, s, control_mm) for n, s in zip(geometry.shape_zyx, geometry.spacing_mm[::-1], strict=True)
    )
    out = np.empty((*geometry.shape_zyx, components), dtype=np.float32)
    for c in range(components):
        coeff = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1]))
        out[..., c] = np.einsum("ai,bj,ck,ijk->abc", wz, wy, wx, coeff, optimize=True)
    return out


def _min_jacobian(d: np.ndarray, geometry: Geometry) -> float:
    """The smallest Jacobian determinant of x -> x + d(x) on `geometry`."""
    return float(jacobian_determinant(Field(d, geometry)).min())


def _ensure_invertible(d: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, float]:
    """Shrink a displacement until its minimal Jacobian reaches MIN_JACOBIAN; returns it and the factor."""
    factor = 1.0
    while _min_jacobian(d * factor, geometry) < MIN_JACOBIAN and factor > 0.05:
        factor *= 0.85
    return (d * factor).astype(np.float32), factor


def _z_profile(z: np.ndarray, z_base: float, sigma_up: float, sigma_down: float) -> np.ndarray:
    """Breathing amplitude along z: 1 at the lung base, Gaussian fall-off above and below."""
    sigma = np.where(z > z_base, sigma_up, sigma_down)
    return np.exp(-0.5 * ((z - z_base) / sigma) ** 2)


def _lung_base_z(z: np.ndarray, lungs: np.ndarray, body: np.ndarray) -> float:
    """The z (mm) of the lung bases: a low percentile of lung voxels, or the top of the body."""
    if np.count_nonzero(lungs) > 0:
        return float(np.percentile(z[lungs], 10.0))
    return float(z[body].max()) if np.any(body) else float(z.max())


def _mean_norm(d: np.ndarray, mask: np.ndarray) -> float:
    """Mean displacement length (mm) over a mask (over everything if the mask is empty)."""
    norm = np.linalg.norm(d, axis=-1)
    return float(norm[mask].mean()) if np.any(mask) else float(norm.mean())


# ----------------------------------------------------------------------------- families


@dataclass
class _Context:
    """What the family builders see: the working grid, its CT, masks and the random generator."""

    geometry: Geometry
    points: np.ndarray
    hu: np.ndarray
    body: np.ndarray
    lungs: np.ndarray
    liver: np.ndarray | None
    rng: np.random.Generator


def _breathing(ctx: _Context, magnitude: float | None) -> tuple[np.ndarray, dict]:
    """Cranio-caudal dominant motion growing towards the diaphragm, with mild expansion."""
    rng, pts = ctx.rng, ctx.points
    z_base = _lung_base_z(pts[..., 2], ctx.lungs, ctx.body)
    sigma_up, sigma_down = rng.uniform(90.0, 130.0), rng.uniform(70.0, 110.0)
    ap, lateral = rng.uniform(0.10, 0.25), rng.uniform(0.03, 0.10)
    body_weight = ndimage.gaussian_filter(ctx.body.astype(np.float32), 15.0 / np.asarray(ctx.geometry.spacing_mm)[::-1])
    w = _z_profile(pts[..., 2], z_base, sigma_up, sigma_down) * body_weight
    body_pts = pts[ctx.body] if np.any(ctx.body) else pts.reshape(-1, 3)
    centre = body_pts.mean(axis=0)
    half = np.maximum(0.5 * (np.percentile(body_pts, 95, axis=0) - np.percentile(body_pts, 5, axis=0)), 10.0)
    d = np.zeros((*ctx.geometry.shape_zyx, 3), dtype=np.float32)
    d[..., 2] = -w
    d[..., 1] = ap * w * (pts[..., 1] - centre[1]) / half[1]
    d[..., 0] = lateral * w * (pts[..., 0] - centre[0]) / half[0]
    d += 0.1 * _bspline_field(ctx.geometry, 60.0, rng, 3) * body_weight[..., None] / 1.6
    region = ctx.lungs if np.any(ctx.lungs) else ctx.body
    target = float(magnitude) if magnitude is not None else rng.uniform(5.0, 12.0)
    d *= target / max(_mean_norm(d, region), 1e-6)
    params = {
        "mean_displacement_mm": target,
        "z_base_mm": z_base,
        "sigma_up_mm": sigma_up,
        "sigma_down_mm": sigma_down,
        "ap_expansion": ap,
        "lateral_expansion": lateral,
        "region": "lungs" if np.any(ctx.lungs) else "body",
    }
    return d, params


def _bspline(ctx: _Context, magnitude: float | None) -> tuple[np.ndarray, dict]:
    """A smooth random cubic B-spline displacement."""
    control = ctx.rng.uniform(35.0, 50.0)
    target = float(magnitude) if magnitude is not None else ctx.rng.uniform(3.0, 8.0)
    d, draws = np.zeros((*ctx.geometry.shape_zyx, 3), np.float32), 0
    while draws == 0 or (draws < 8 and _min_jacobian(d, ctx.geometry) < MIN_JACOBIAN):
        d = _bspline_field(ctx.geometry, control, ctx.rng, 3)  # redraw until comfortably invertible
        d *= target / max(_mean_norm(d, ctx.body), 1e-6)
        draws += 1
    return d, {"mean_displacement_mm": target, "control_spacing_mm": control, "draws": draws, "region": "body"}


def _local_centre(ctx: _Context, radius: float) -> np.ndarray:
    """A seeded LPS point in soft tissue (the liver if known) deep inside the body and the image."""
    spacing = np.asarray(ctx.geometry.spacing_mm)[::-1]
    depth = ndimage.distance_transform_edt(ctx.body, sampling=spacing)
    inner = np.zeros_like(ctx.body)
    inner[1:-1, 1:-1, 1:-1] = True
    border = ndimage.distance_transform_edt(inner, sampling=spacing)
    tissue = ctx.liver if ctx.liver is not None and np.any(ctx.liver) else (ctx.hu > 0.0) & (ctx.hu < 200.0)
    for need in (radius + 10.0, radius, 0.0):
        candidates = np.argwhere(tissue & (depth > need) & (border > need))
        if len(candidates):
            break
    else:
        candidates = np.argwhere(depth >= depth.max())
    z, y, x = candidates[ctx.rng.integers(len(candidates))]
    return ctx.geometry.index_to_lps(np.array([[x, y, z]], dtype=float))[0]


def _radial_field(pts: np.ndarray, centre: np.ndarray, radius: float, scale: float) -> np.ndarray:
    """Uniform scaling by `scale` inside the ball, volume-preserving outside, faded out from 2 to 4 radii."""
    offset = pts - centre
    r = np.linalg.norm(offset, axis=-1)
    inside = r <= radius
    outer = np.cbrt(r**3 + (scale**3 - 1.0) * radius**3)
    rho = np.where(inside, scale * r, outer)
    fade = np.clip((4.0 * radius - r) / (2.0 * radius), 0.0, 1.0)
    fade = np.sin(0.5 * np.pi * fade) ** 2
    radial = (rho - r) * np.where(inside, 1.0, fade)
    unit = offset / np.maximum(r, 1e-6)[..., None]
    return (radial[..., None] * unit).astype(np.float32)


def _local(ctx: _Context, magnitude: float | None) -> tuple[np.ndarray, dict]:
    """A spherical region contracting or expanding, over a mild smooth background."""
    rng = ctx.rng
    radius = rng.uniform(15.0, 30.0)
    shrink = rng.random() < 0.75
    volume_change = rng.uniform(0.10, 0.40) * (-1.0 if shrink else 1.0)
    scale = (1.0 + volume_change) ** (1.0 / 3.0)
    if magnitude is not None:
        scale = 1.0 + (-1.0 if shrink else 1.0) * float(magnitude) / radius
        if scale <= 0.2:
            raise IkrError(f"local: a surface displacement of {magnitude} mm is too large for radius {radius:.1f} mm")
        volume_change = scale**3 - 1.0
    centre = _local_centre(ctx, radius)
    pts = ctx.points
    d = _radial_field(pts, centre, radius, scale)
    background = rng.uniform(0.5, 1.5)
    smooth = _bspline_field(ctx.geometry, 50.0, rng, 3)
    d += smooth * (background / max(_mean_norm(smooth, ctx.body), 1e-6))
    params = {
        "centre_lps": [float(v) for v in centre],
        "radius_mm": radius,
        "volume_change": float(volume_change),
        "scale": float(scale),
        "surface_displacement_mm": float(abs(scale - 1.0) * radius),
        "background_mean_mm": background,
        "region": "ball",
    }
    return d, params


def _sliding_columns(lungs: np.ndarray, body: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, str]:
    """The sliding region: lungs and everything below them along the cranio-caudal axis."""
    if not np.any(lungs):
        spacing = np.asarray(geometry.spacing_mm)[::-1]
        return ndimage.distance_transform_edt(body, sampling=spacing) > 20.0, "body_interior"
    axis, sign = _superior_axis(geometry)
    flipped = np.flip(lungs, axis=axis) if sign > 0 else lungs
    columns = np.maximum.accumulate(flipped, axis=axis)
    return (np.flip(columns, axis=axis) if sign > 0 else columns), "lung_columns"


def _sliding(ctx: _Context, magnitude: float | None) -> tuple[np.ndarray, dict]:
    """Lungs (and what lies below them) slide cranio-caudally along a still chest wall."""
    rng, pts = ctx.rng, ctx.points
    columns, kind = _sliding_columns(ctx.lungs, ctx.body, ctx.geometry)
    axis, _ = _superior_axis(ctx.geometry)
    sigma_mm = np.full(3, SLIDING_SIGMA_MM)
    sigma_mm[axis] = SLIDING_TAPER_MM  # tapers the motion at the columns' tops; the side walls stay sharp
    weight = ndimage.gaussian_filter(columns.astype(np.float32), sigma_mm / np.asarray(ctx.geometry.spacing_mm)[::-1])
    z_base = _lung_base_z(pts[..., 2], ctx.lungs, ctx.body)
    sigma_up, sigma_down = rng.uniform(90.0, 130.0), rng.uniform(70.0, 110.0)
    d = np.zeros((*ctx.geometry.shape_zyx, 3), dtype=np.float32)
    d[..., 2] = -_z_profile(pts[..., 2], z_base, sigma_up, sigma_down) * weight
    region = ctx.lungs if np.any(ctx.lungs) else columns
    target = float(magnitude) if magnitude is not None else rng.uniform(5.0, 12.0)
    d *= target / max(_mean_norm(d, region), 1e-6)
    params = {
        "mean_displacement_mm": target,
        "z_base_mm": z_base,
        "sigma_up_mm": sigma_up,
        "sigma_down_mm": sigma_down,
        "sliding_region": kind,
        "region": "lungs" if np.any(ctx.lungs) else "body_interior",
    }
    return d, params


_BUILDERS = {"breathing": _breathing, "bspline": _bspline, "local": _local, "sliding": _sliding}


# ----------------------------------------------------------------------------- rigid, intensity, noise


def _rigid(geometry: Geometry, rng: np.random.Generator) -> dict:
    """A small random rigid motion about the image centre (rotation <= 2 deg, translation <= 3 mm)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0.5, 2.0)
    direction = rng.normal(size=3)
    translation = direction / np.linalg.norm(direction) * rng.uniform(0.5, 3.0)
    centre = geometry.index_to_lps((np.asarray(geometry.size, dtype=float)[None] - 1.0) / 2.0)[0]
    return {
        "angle_deg": float(angle),
        "axis": [float(v) for v in axis],
        "translation_mm": [float(v) for v in translation],
        "centre_lps": [float(v) for v in centre],
    }


def _apply_rigid(d: np.ndarray, pts: np.ndarray, rigid: dict) -> np.ndarray:
    """Displacement of p -> R (p + d(p) - c) + c + t, the deformation followed by the rigid motion."""
    rot = Rotation.from_rotvec(np.deg2rad(rigid["angle_deg"]) * np.asarray(rigid["axis"])).as_matrix()
    centre, t = np.asarray(rigid["centre_lps"]), np.asarray(rigid["translation_mm"])
    moved = (pts + d - centre) @ rot.T + centre + t
    return (moved - pts).astype(np.float32)


def _noise(shape: tuple[int, ...], sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Slightly correlated Gaussian noise with standard deviation `sigma_hu` (zeros if 0)."""
    if sigma_hu <= 0:
        return np.zeros(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.6)
    return smooth * (sigma_hu / max(float(smooth.std()), 1e-6))


def _cubic_weights(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cubic B-spline interpolation as two linear lookups per axis: (g0, h0, g1, h1) at index positions t."""
    i = torch.floor(t)
    a = t - i
    w0, w3 = (1.0 - a) ** 3 / 6.0, a**3 / 6.0
    w1 = (3.0 * a**3 - 6.0 * a**2 + 4.0) / 6.0
    w2 = 1.0 - w0 - w1 - w3
    g0, g1 = w0 + w1, w2 + w3
    return g0, i - 1.0 + w1 / g0, g1, i + 1.0 + w3 / g1


def _warp_cubic(values: np.ndarray, geometry: Geometry, displacement_mm: np.ndarray, outside: float) -> np.ndarray:
    """values(y + displacement(y)) on the same grid by cubic B-spline interpolation (float32, (z, y, x)).

    The B-spline coefficients come from scipy's spline_filter; each cubic sample is eight trilinear
    torch.grid_sample lookups (Sigg and Hadwiger's trick). `outside` beyond half a voxel past the edge.
    """
    coeff = ndimage.spline_filter(values.astype(np.float32), order=3, output=np.float32, mode="mirror")
    vol = torch.from_numpy(coeff)[None, None]
    sizes = np.asarray(values.shape[::-1], dtype=np.float64)
    to_index = torch.from_numpy(np.linalg.inv(geometry.voxel_to_mm_matrix()).T.astype(np.float32))
    norm = torch.from_numpy((2.0 / np.maximum(sizes - 1.0, 1.0)).astype(np.float32))
    upper = torch.from_numpy((sizes - 0.5).astype(np.float32))
    nz, ny, nx = values.shape
    out = np.empty(values.shape, dtype=np.float32)
    chunk = max(1, 500_000 // (ny * nx))
    for z0 in range(0, nz, chunk):
        z1 = min(nz, z0 + chunk)
        idx = torch.empty((z1 - z0, ny, nx, 3), dtype=torch.float32)
        idx[..., 0] = torch.arange(nx, dtype=torch.float32)[None, None, :]
        idx[..., 1] = torch.arange(ny, dtype=torch.float32)[None, :, None]
        idx[..., 2] = torch.arange(z0, z1, dtype=torch.float32)[:, None, None]
        idx += torch.from_numpy(np.ascontiguousarray(displacement_mm[z0:z1], dtype=np.float32)) @ to_index
        g0, h0, g1, h1 = _cubic_weights(idx)
        total = torch.zeros((z1 - z0, ny, nx), dtype=torch.float32)
        for bx in (0, 1):
            for by in (0, 1):
                for bz in (0, 1):
                    pick = [(g0, h0), (g1, h1)]
                    gx, hx = pick[bx][0][..., 0], pick[bx][1][..., 0]
                    gy, hy = pick[by][0][..., 1], pick[by][1][..., 1]
                    gz, hz = pick[bz][0][..., 2], pick[bz][1][..., 2]
                    grid = torch.stack([hx, hy, hz], dim=-1) * norm - 1.0
                    lookup = torch.nn.functional.grid_sample(
                        vol, grid[None], mode="bilinear", padding_mode="border", align_corners=True
                    )[0, 0]
                    total += gx * gy * gz * lookup
        total[((idx < -0.5) | (idx > upper)).any(dim=-1)] = outside
        out[z0:z1] = total.numpy()
    return out


def _smooth_scalars(
    fine: Geometry, coarse: Geometry, factor: int, control_mm: float, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` smooth random scalar fields in about [-1, 1], drawn on `coarse`, on `fine` (z, y, x, count)."""
    values = _bspline_field(coarse, control_mm, rng, count)
    values /= np.maximum(np.abs(values).max(axis=(0, 1, 2)), 1e-6)
    return _upsample(values, factor, fine)


def _intensity_change(
    moving: np.ndarray, fine: Geometry, coarse: Geometry, factor: int, rng: np.random.Generator, ablation: dict | None
) -> tuple[np.ndarray, dict]:
    """A smooth gain/offset change in tissue, plus a hypodense ball for an ablation-like case."""
    gain, offset = rng.uniform(0.01, 0.03), rng.uniform(3.0, 10.0)
    tissue = np.clip((moving + 900.0) / 100.0, 0.0, 1.0)
    smooth = _smooth_scalars(fine, coarse, factor, 80.0, 2, rng)
    out = (moving - AIR_HU) * (1.0 + gain * smooth[..., 0]) + AIR_HU
    out += offset * smooth[..., 1] * tissue
    del smooth
    params = {"gain_max": float(gain), "offset_max_hu": float(offset)}
    if ablation is not None:
        drop = rng.uniform(30.0, 60.0)
        out -= drop * _ball_weight(fine, np.asarray(ablation["centre_lps"]), ablation["radius_mm"]) * tissue
        params.update({"ablation_drop_hu": float(drop), "ablation_centre_lps": ablation["centre_lps"]})
        params["ablation_radius_mm"] = float(ablation["radius_mm"])
    return out.astype(np.float32), params


def _ball_weight(geometry: Geometry, centre: np.ndarray, radius: float) -> np.ndarray:
    """A soft ball indicator (1 inside, 0 beyond radius + 3 mm) on `geometry`, float32 (z, y, x)."""
    out = np.zeros(geometry.shape_zyx, dtype=np.float32)
    reach = radius + 3.0
    lo_hi = geometry.lps_to_index(centre[None] + np.array([[-reach] * 3, [reach] * 3]))
    lo = np.clip(np.floor(lo_hi.min(axis=0)).astype(int), 0, np.asarray(geometry.size))
    hi = np.clip(np.ceil(lo_hi.max(axis=0)).astype(int) + 1, 0, np.asarray(geometry.size))
    if np.any(hi <= lo):
        return out
    zz, yy, xx = np.meshgrid(*(np.arange(lo[k], hi[k]) for k in (2, 1, 0)), indexing="ij")
    pts = geometry.index_to_lps(np.stack([xx, yy, zz], axis=-1).reshape(-1, 3)).reshape(*xx.shape, 3)
    r = np.linalg.norm(pts - centre, axis=-1)
    out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = np.clip((reach - r) / 3.0, 0.0, 1.0)
    return out


def _polish_inverse(true_field: Field, inverse_mm: np.ndarray, iterations: int) -> np.ndarray:
    """Refine an interpolated inverse on the true field's grid by fixed-point steps u <- -d(y + u(y))."""
    for _ in range(iterations):
        inverse_mm = -_sample_on_fine(true_field.displacement_mm, 1, true_field.geometry, inverse_mm)
    return inverse_mm


def _to_ct_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer CT dtype, or keep float32."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(np.float32)


# ----------------------------------------------------------------------------- landmarks


def _harris_response(hu: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """3D Harris corner measure det(S) - k tr(S)^3 of the structure tensor S (HU clipped to [-1000, 300])."""
    img = np.clip(hu, -1000.0, 300.0).astype(np.float32)
    sigma_d = 1.0 * spacing_zyx.min() / spacing_zyx
    sigma_i = 2.0 * spacing_zyx.min() / spacing_zyx
    grads = []
    for axis in range(3):
        order = [0, 0, 0]
        order[axis] = 1
        grads.append(ndimage.gaussian_filter(img, sigma_d, order=order) / spacing_zyx[axis])
    s = {}
    for i in range(3):
        for j in range(i, 3):
            s[i, j] = ndimage.gaussian_filter(grads[i] * grads[j], sigma_i)
    det = (
        s[0, 0] * (s[1, 1] * s[2, 2] - s[1, 2] ** 2)
        - s[0, 1] * (s[0, 1] * s[2, 2] - s[1, 2] * s[0, 2])
        + s[0, 2] * (s[0, 1] * s[1, 2] - s[1, 1] * s[0, 2])
    )
    trace = s[0, 0] + s[1, 1] + s[2, 2]
    return det - 0.005 * trace**3


def _landmark_candidates(hu: np.ndarray, body: np.ndarray, grid: Geometry, rng: np.random.Generator) -> np.ndarray:
    """LPS points of local Harris maxima inside the body, away from the border, strongest first."""
    response = _harris_response(hu, np.asarray(grid.spacing_mm)[::-1])
    spacing = np.asarray(grid.spacing_mm)[::-1]
    inside = ndimage.binary_erosion(body, iterations=2)
    border = np.ones(hu.shape, dtype=bool)
    margin = np.ceil(np.maximum(LANDMARK_MIN_DISTANCE_MM / spacing, 3)).astype(int)
    border[margin[0] : -margin[0], margin[1] : -margin[1], margin[2] : -margin[2]] = False
    peaks = (response == ndimage.maximum_filter(response, size=5)) & (response > 0) & inside & ~border
    idx = np.argwhere(peaks)
    order = np.lexsort((rng.random(len(idx)), -response[peaks]))
    zyx = idx[order]
    return grid.index_to_lps(zyx[:, ::-1].astype(float))


def _spread(points: np.ndarray, min_distance: float, limit: int) -> np.ndarray:
    """Greedy selection in the given order keeping points at least `min_distance` apart."""
    chosen: list[int] = []
    taken = np.zeros(len(points), dtype=bool)
    tree = cKDTree(points) if len(points) else None
    for i in range(len(points)):
        if taken[i]:
            continue
        chosen.append(i)
        taken[tree.query_ball_point(points[i], min_distance)] = True
        if len(chosen) >= limit:
            break
    return points[chosen]


def _landmarks(ct: Image, field: Field, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Landmark pairs on corner-like anatomy whose fixed and moving points both lie well inside the image."""
    grid, factor = _coarse_geometry(ct.geometry, LANDMARK_SPACING_MM)
    hu = _downsample(ct.array, factor, grid)
    candidates = _landmark_candidates(hu, _body_mask(hu, grid), grid, rng)
    candidates = _spread(candidates, LANDMARK_MIN_DISTANCE_MM, 4 * n + 20)
    if len(candidates) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    moving = transform_points(field, candidates)
    margin = max(3.0, 5.0 / min(ct.geometry.spacing_mm))
    keep = ct.geometry.contains_lps(moving, margin_voxels=-margin)
    fixed = candidates[keep][:n]
    return fixed, transform_points(field, fixed)


# ----------------------------------------------------------------------------- make / write / read


def _array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (identifies the source CT without naming it)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _check_inputs(ct: Image, family: str, labels: Image | None, n_landmarks: int, noise_hu: float) -> None:
    """Raise IkrError for an unknown family, a label map off the CT's grid or bad counts."""
    if family not in FAMILIES:
        raise IkrError(f"unknown deformation family {family!r}; choose one of {', '.join(FAMILIES)}")
    if labels is not None and labels.geometry.shape_zyx != ct.geometry.shape_zyx:
        raise IkrError(f"the label map's grid {labels.geometry.size} differs from the CT's {ct.geometry.size}")
    if n_landmarks < 0 or noise_hu < 0:
        raise IkrError("n_landmarks and noise_hu must not be negative")
    from ..registration.preprocess import check_looks_like_ct

    check_looks_like_ct(ct, str(ct.meta.get("path") or "the CT"))


MAX_MAGNITUDE_MM = 50.0  # larger mean displacements are not breathing, positioning or organ motion


def check_magnitude(magnitude_mm: float | None) -> None:
    """Refuse a mean displacement that is not a finite number in (0, MAX_MAGNITUDE_MM] mm."""
    if magnitude_mm is None:
        return
    if not np.isfinite(magnitude_mm) or not 0 < magnitude_mm <= MAX_MAGNITUDE_MM:
        raise IkrError(f"--magnitude {magnitude_mm} mm: the mean displacement must lie in (0, {MAX_MAGNITUDE_MM:g}] mm")


def _inverse_check(true_field: Field, inverse: Field, rng: np.random.Generator) -> dict:
    """Residual |u(y) + d(y + u(y))| (mm) at up to 100000 random voxels whose preimage is in the grid."""
    geo = true_field.geometry
    count = min(20_000, int(np.prod(geo.size)))
    flat = rng.choice(int(np.prod(geo.size)), size=count, replace=False)
    zyx = np.stack(np.unravel_index(flat, geo.shape_zyx), axis=-1)
    pts = geo.index_to_lps(zyx[:, ::-1].astype(float))
    pre = pts + sample_field(inverse, pts)
    inside = geo.contains_lps(pre, margin_voxels=0.0)
    err = np.linalg.norm(pre - pts + sample_field(true_field, pre), axis=-1)[inside]
    if err.size == 0:
        return {"inverse_residual_max_mm": 0.0, "inverse_residual_mean_mm": 0.0}
    return {"inverse_residual_max_mm": float(err.max()), "inverse_residual_mean_mm": float(err.mean())}


def make_case(
    ct: Image,
    family: str,
    seed: int,
    labels: Image | None = None,
    magnitude_mm: float | None = None,
    n_landmarks: int = 100,
    noise_hu: float = 10.0,
    rigid: bool = True,
    intensity_change: bool = True,
) -> SynthCase:
    """A synthetic case from `ct`: deformed moving image, exact fixed -> moving field, landmark pairs."""
    check_magnitude(magnitude_mm)
    _check_inputs(ct, family, labels, n_landmarks, noise_hu)
    rng = np.random.default_rng([int(seed), FAMILIES.index(family)])
    fine = ct.geometry
    coarse, factor = _coarse_geometry(fine, WORKING_SPACING_MM)
    hu_c = _downsample(ct.array, factor, coarse)
    body_c = _body_mask(hu_c, coarse)
    labels_c = None if labels is None else _downsample(labels.array, factor, coarse, smooth=False)
    lungs_c = _lung_mask(hu_c, body_c, labels_c, _named_labels(labels, "lung"))
    liver_values = _named_labels(labels, "liver")
    liver_c = np.isin(labels_c, liver_values) if labels_c is not None and liver_values else None
    pts_c = coarse.grid_points_lps()
    ctx = _Context(coarse, pts_c, hu_c, body_c, lungs_c, liver_c, rng)

    deformation, family_params = _BUILDERS[family](ctx, magnitude_mm)
    deformation, family_params["shrink_factor"] = _ensure_invertible(deformation, coarse)
    rigid_params = _rigid(fine, rng) if rigid else None
    total = _apply_rigid(deformation, pts_c, rigid_params) if rigid_params else deformation
    inverse_c, residual_c = invert(Field(total, coarse), iterations=100)
    both = _upsample(np.concatenate([total, inverse_c.displacement_mm], axis=-1), factor, fine)
    true_field, inverse = Field(np.ascontiguousarray(both[..., :3]), fine), np.ascontiguousarray(both[..., 3:])
    del both
    inverse = _polish_inverse(true_field, inverse, POLISH_ITERATIONS)

    clean = ct.array.astype(np.float32)
    outside = float(min(clean.min(), AIR_HU))
    moving_clean = _warp_cubic(clean, fine, inverse, outside)
    moving_labels = None
    if labels is not None:
        warped = _sample_on_fine(labels.array, 1, fine, inverse, mode="nearest", outside=0.0)[..., 0]
        moving_labels = labels.with_array(np.rint(warped).astype(labels.array.dtype))
    intensity_params = None
    if intensity_change:
        ablation = None
        if family == "local":
            moved_centre = transform_points(true_field, np.asarray(family_params["centre_lps"])[None])[0]
            ablation = {"centre_lps": [float(v) for v in moved_centre]}
            ablation["radius_mm"] = 0.9 * family_params["scale"] * family_params["radius_mm"]
        moving_clean, intensity_params = _intensity_change(moving_clean, fine, coarse, factor, rng, ablation)
    lm_fixed, lm_moving = _landmarks(ct, true_field, n_landmarks, rng)

    fixed_arr = _to_ct_dtype(clean + _noise(clean.shape, noise_hu, rng), ct.array.dtype)
    moving_arr = _to_ct_dtype(moving_clean + _noise(clean.shape, noise_hu, rng), ct.array.dtype)
    jac = jacobian_determinant(Field(total, coarse))
    deform_norm = np.linalg.norm(deformation, axis=-1)
    params = {
        "family": family,
        "seed": int(seed),
        "magnitude_mm": None if magnitude_mm is None else float(magnitude_mm),
        "n_landmarks": int(n_landmarks),
        "noise_hu": float(noise_hu),
        "rigid": bool(rigid),
        "intensity_change": bool(intensity_change),
        "family_params": _jsonable(family_params),
        "rigid_params": rigid_params,
        "intensity_params": _jsonable(intensity_params),
        "working_spacing_mm": [float(v) for v in coarse.spacing_mm],
        "inverse_residual_working_mm": float(residual_c),
        **_inverse_check(true_field, Field(inverse, fine), rng),
        "min_jacobian_working": float(jac.min()),
        "max_deformation_mm": float(deform_norm.max()),
        "landmarks_found": int(len(lm_fixed)),
        "ct_size": [int(v) for v in fine.size],
        "ct_spacing_mm": [float(v) for v in fine.spacing_mm],
        "ct_sha256": _array_digest(ct.array),
        "labels_sha256": None if labels is None else _array_digest(labels.array),
    }
    meta = {"source": "ikr synth", "family": family, "seed": int(seed)}
    return SynthCase(
        fixed=Image(fixed_arr, fine, {**meta, "role": "fixed"}),
        moving=Image(moving_arr, fine, {**meta, "role": "moving"}),
        true_field=true_field,
        landmarks_fixed_lps=lm_fixed,
        landmarks_moving_lps=lm_moving,
        fixed_labels=labels,
        moving_labels=moving_labels,
        family=family,
        seed=int(seed),
        params=params,
    )


def _jsonable(value: object) -> object:
    """Plain-Python copy of nested dicts/lists of numpy scalars (for json)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


_FILES = {
    "fixed": "fixed.nii.gz",
    "moving": "moving.nii.gz",
    "field": "true_displacement.nii.gz",
    "lm_fixed": "landmarks_fixed.csv",
    "lm_moving": "landmarks_moving.csv",
    "fixed_labels": "fixed_labels.nii.gz",
    "moving_labels": "moving_labels.nii.gz",
    "params": "case.json",
}


def _write_points(path: Path, points: np.ndarray) -> None:
    """Write (N, 3) LPS points as CSV with an x,y,z header."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "z"])
        writer.writerows([[repr(float(v)) for v in p] for p in points])


def _read_points(path: Path) -> np.ndarray:
    """Read an x,y,z CSV of LPS points into an (N, 3) array."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip().lower() for c in rows[0]] != ["x", "y", "z"]:
            raise IkrError("expected a CSV with the header x,y,z", path)
        return np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64).reshape(-1, 3)
    except (OSError, ValueError) as exc:
        raise IkrError(f"cannot read landmarks: {exc}", path) from exc


def write_case(case: SynthCase, outdir: str | os.PathLike) -> None:
    """Write a case atomically: images, true field, landmark CSVs, labels and case.json."""
    with atomic_directory(outdir) as tmp:
        sitk.WriteImage(case.fixed.to_sitk(), str(tmp / _FILES["fixed"]), True)
        sitk.WriteImage(case.moving.to_sitk(), str(tmp / _FILES["moving"]), True)
        vector = sitk.GetImageFromArray(case.true_field.displacement_mm.astype(np.float32), isVector=True)
        sitk.WriteImage(case.true_field.geometry.apply_to_sitk(vector), str(tmp / _FILES["field"]), True)
        _write_points(tmp / _FILES["lm_fixed"], case.landmarks_fixed_lps)
        _write_points(tmp / _FILES["lm_moving"], case.landmarks_moving_lps)
        for key, image in (("fixed_labels", case.fixed_labels), ("moving_labels", case.moving_labels)):
            if image is not None:
                sitk.WriteImage(image.to_sitk(), str(tmp / _FILES[key]), True)
        record = {"family": case.family, "seed": case.seed, "params": _jsonable(case.params)}
        (tmp / _FILES["params"]).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _read_image(path: Path, required: bool = True) -> sitk.Image | None:
    """Read an image file, or None when it is absent and optional."""
    if not path.exists():
        if required:
            raise IkrError("missing file of a synthetic case", path)
        return None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise IkrError("cannot read image", path) from exc


def read_case(outdir: str | os.PathLike) -> SynthCase:
    """Read a case written by `write_case`."""
    root = Path(outdir)
    params_path = root / _FILES["params"]
    try:
        record = json.loads(params_path.read_text(encoding="utf-8"))
        family, seed, params = record["family"], int(record["seed"]), record["params"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IkrError(f"not a synthetic case description ({exc.__class__.__name__})", params_path) from exc
    field_path = root / _FILES["field"]
    try:
        true_field = Field.from_sitk(_read_image(field_path))
    except IkrError as exc:
        raise IkrError(exc.problem, field_path) from exc
    labels = [_read_image(root / _FILES[k], required=False) for k in ("fixed_labels", "moving_labels")]
    return SynthCase(
        fixed=Image.from_sitk(_read_image(root / _FILES["fixed"])),
        moving=Image.from_sitk(_read_image(root / _FILES["moving"])),
        true_field=true_field,
        landmarks_fixed_lps=_read_points(root / _FILES["lm_fixed"]),
        landmarks_moving_lps=_read_points(root / _FILES["lm_moving"]),
        fixed_labels=None if labels[0] is None else Image.from_sitk(labels[0]),
        moving_labels=None if labels[1] is None else Image.from_sitk(labels[1]),
        family=family,
        seed=seed,
        params=params,
    )


def case_from_files(
    ct_path: str | os.PathLike,
    family: str,
    seed: int,
    labels_path: str | os.PathLike | None = None,
    magnitude_mm: float | None = None,
) -> SynthCase:
    """`ikr synth`: a case made from a CT file (and a label map carried along, on the CT's grid or resampled)."""
    from ..io.images import read_image
    from ..io.segmentations import read_labels

    check_magnitude(magnitude_mm)
    ct = read_image(Path(ct_path))
    ct.meta["path"] = str(ct_path)
    labels = read_labels(Path(labels_path), reference=ct)[0] if labels_path else None
    return make_case(ct, family, seed, labels=labels, magnitude_mm=magnitude_mm)
