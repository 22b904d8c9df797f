"""What the generator adds to a deformation: a small rigid motion, the cubic warp, intensity changes, noise."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..core.fields import (
    Field,
)
from ..core.geometry import Geometry
from .families import bspline_field
from .grids import sample_on_fine, upsample

AIR_HU = -1000.0


def random_rigid(geometry: Geometry, rng: np.random.Generator) -> dict:
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


def apply_rigid(d: np.ndarray, pts: np.ndarray, rigid: dict) -> np.ndarray:
    """Displacement of p -> R (p + d(p) - c) + c + t, the deformation followed by the rigid motion."""
    rot = Rotation.from_rotvec(np.deg2rad(rigid["angle_deg"]) * np.asarray(rigid["axis"])).as_matrix()
    centre, t = np.asarray(rigid["centre_lps"]), np.asarray(rigid["translation_mm"])
    moved = (pts + d - centre) @ rot.T + centre + t
    return (moved - pts).astype(np.float32)


def ct_noise(shape: tuple[int, ...], sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
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


def warp_cubic(values: np.ndarray, geometry: Geometry, displacement_mm: np.ndarray, outside: float) -> np.ndarray:
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
    values = bspline_field(coarse, control_mm, rng, count)
    values /= np.maximum(np.abs(values).max(axis=(0, 1, 2)), 1e-6)
    return upsample(values, factor, fine)


def change_intensity(
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


def polish_inverse(true_field: Field, inverse_mm: np.ndarray, iterations: int) -> np.ndarray:
    """Refine an interpolated inverse on the true field's grid by fixed-point steps u <- -d(y + u(y))."""
    for _ in range(iterations):
        inverse_mm = -sample_on_fine(true_field.displacement_mm, 1, true_field.geometry, inverse_mm)
    return inverse_mm


def to_ct_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer CT dtype, or keep float32."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(np.float32)
