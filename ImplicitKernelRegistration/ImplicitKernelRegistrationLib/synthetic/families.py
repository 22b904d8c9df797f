"""The deformation families of the synthetic generator (breathing, bspline, local, sliding), smooth random fields."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.errors import IkrError
from ..core.fields import (
    Field,
    jacobian_determinant,
)
from ..core.geometry import Geometry
from .grids import superior_axis

FAMILIES = ("breathing", "bspline", "local", "sliding")
MIN_JACOBIAN = 0.25
SLIDING_SIGMA_MM = 4.0
SLIDING_TAPER_MM = 25.0


def _bspline_basis(n: int, step: float, control_mm: float) -> np.ndarray:
    """Cubic B-spline weights (n samples x control points) along one axis, control grid padded by 2."""
    u = np.arange(n) * step / control_mm  # sample positions in control units, first sample at 0
    count = int(np.floor(u.max())) + 4
    t = u[:, None] - (np.arange(count)[None, :] - 1.0)
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def bspline_field(geometry: Geometry, control_mm: float, rng: np.random.Generator, components: int) -> np.ndarray:
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


def ensure_invertible(d: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, float]:
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
class FamilyContext:
    """What the family builders see: the working grid, its CT, masks and the random generator."""

    geometry: Geometry
    points: np.ndarray
    hu: np.ndarray
    body: np.ndarray
    lungs: np.ndarray
    liver: np.ndarray | None
    rng: np.random.Generator


def _breathing(ctx: FamilyContext, magnitude: float | None) -> tuple[np.ndarray, dict]:
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
    d += 0.1 * bspline_field(ctx.geometry, 60.0, rng, 3) * body_weight[..., None] / 1.6
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


def _bspline(ctx: FamilyContext, magnitude: float | None) -> tuple[np.ndarray, dict]:
    """A smooth random cubic B-spline displacement."""
    control = ctx.rng.uniform(35.0, 50.0)
    target = float(magnitude) if magnitude is not None else ctx.rng.uniform(3.0, 8.0)
    d, draws = np.zeros((*ctx.geometry.shape_zyx, 3), np.float32), 0
    while draws == 0 or (draws < 8 and _min_jacobian(d, ctx.geometry) < MIN_JACOBIAN):
        d = bspline_field(ctx.geometry, control, ctx.rng, 3)  # redraw until comfortably invertible
        d *= target / max(_mean_norm(d, ctx.body), 1e-6)
        draws += 1
    return d, {"mean_displacement_mm": target, "control_spacing_mm": control, "draws": draws, "region": "body"}


def _local_centre(ctx: FamilyContext, radius: float) -> np.ndarray:
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


def _local(ctx: FamilyContext, magnitude: float | None) -> tuple[np.ndarray, dict]:
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
    smooth = bspline_field(ctx.geometry, 50.0, rng, 3)
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
    axis, sign = superior_axis(geometry)
    flipped = np.flip(lungs, axis=axis) if sign > 0 else lungs
    columns = np.maximum.accumulate(flipped, axis=axis)
    return (np.flip(columns, axis=axis) if sign > 0 else columns), "lung_columns"


def _sliding(ctx: FamilyContext, magnitude: float | None) -> tuple[np.ndarray, dict]:
    """Lungs (and what lies below them) slide cranio-caudally along a still chest wall."""
    rng, pts = ctx.rng, ctx.points
    columns, kind = _sliding_columns(ctx.lungs, ctx.body, ctx.geometry)
    axis, _ = superior_axis(ctx.geometry)
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


BUILDERS = {"breathing": _breathing, "bspline": _bspline, "local": _local, "sliding": _sliding}
