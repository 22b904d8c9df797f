"""The demo tumour and ablation zone: balls with a known minimal margin, as partial-volume masks.

`ikr demo`, the Slicer module's self-test, the tests and bench/ place a spherical tumour and an
off-centre spherical ablation zone in a synthetic case, so that the measured margin (review/margin.py)
can be compared with the true one. The tumour is drawn in fixed space and pushed through the case's
true field onto the moving grid, as a segmentation of the pre-ablation CT would be.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from ..core.fields import Field, sample_field
from ..core.geometry import Geometry, Image


def _supersampled_occupancy(
    geometry: Geometry,
    lo_zyx: np.ndarray,
    hi_zyx: np.ndarray,
    inside: Callable[[np.ndarray], np.ndarray],
    step_mm: float = 0.25,
) -> np.ndarray:
    """Partial-volume occupancy of {p : inside(p)} on the index box [lo, hi) (about `step_mm` sub-samples).

    `inside(offsets_idx)` gets the continuous (x, y, z) indices of one sub-sample per voxel of the box,
    shape (N, 3), and returns booleans; sub-samples are spread evenly inside each voxel.
    """
    subs = [max(2, int(np.ceil(s / step_mm))) for s in geometry.spacing_mm]
    z, y, x = np.meshgrid(
        *(np.arange(a, b, dtype=np.float64) for a, b in zip(lo_zyx, hi_zyx, strict=True)), indexing="ij"
    )
    centres = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    occ = np.zeros(len(centres), dtype=np.float32)
    grids = [(np.arange(n) + 0.5) / n - 0.5 for n in subs]
    for ox in grids[0]:
        for oy in grids[1]:
            for oz in grids[2]:
                occ += inside(centres + [ox, oy, oz])
    return (occ / np.prod(subs)).reshape(tuple(hi_zyx - lo_zyx))


def ball_occupancy(geometry: Geometry, centre_lps: np.ndarray, radius_mm: float) -> np.ndarray:
    """Partial-volume occupancy (z, y, x) of a ball on a grid (supersampled, computed on a box around it)."""
    c = np.asarray(centre_lps, dtype=np.float64)
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
    idx = geometry.lps_to_index(c + radius_mm * corners)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)[::-1]
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, np.asarray(geometry.size))[::-1]
    out = np.zeros(geometry.shape_zyx, dtype=np.float32)
    if np.any(hi <= lo):
        return out
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = _supersampled_occupancy(
        geometry, lo, hi, lambda i: np.linalg.norm(geometry.index_to_lps(i) - c, axis=1) <= radius_mm
    )
    return out


def _pull_back(field: Field, points_lps: np.ndarray, iterations: int = 40) -> np.ndarray:
    """Preimages x of moving points y under x -> x + d(x), by fixed-point iteration x = y - d(x)."""
    x = points_lps - sample_field(field, points_lps)
    for _ in range(iterations):
        new = points_lps - sample_field(field, x)
        if np.max(np.abs(new - x)) < 1e-4:
            return new
        x = new
    return x


def _place_centre(fixed: Image, liver_mask: Image | None, clearance_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A random point (LPS) at least `clearance_mm` deep in the liver, else in soft tissue, else the grid centre."""
    g = fixed.geometry
    candidates = []
    if liver_mask is not None and liver_mask.geometry.shape_zyx == g.shape_zyx:
        candidates.append(liver_mask.array > 0)
    hu = fixed.array
    candidates.append(ndimage.binary_opening((hu > -20) & (hu < 150), iterations=2))
    spacing_zyx = g.spacing_mm[::-1]
    for region in candidates:
        depth = ndimage.distance_transform_edt(region, sampling=spacing_zyx)
        for lim in (clearance_mm, 0.6 * clearance_mm):
            zyx = np.argwhere(depth >= lim)
            if len(zyx):
                pick = zyx[rng.integers(len(zyx))]
                return g.index_to_lps(pick[::-1].astype(float)[None])[0]
    return g.index_to_lps(((np.asarray(g.size) - 1) / 2.0)[None])[0]


def demo_tumour_and_zone(fixed: Image, field: Field, liver_mask: Image | None, seed: int) -> tuple[Image, Image, float]:
    """A spherical tumour and an off-centre spherical ablation zone placed in the liver of `fixed`.

    Returns the tumour as a partial-volume mask on the MOVING grid (the fixed tumour pushed through
    the field: a moving point y is inside when its preimage x, x + d(x) = y, is), the ablation zone
    as a partial-volume mask on the fixed grid, and the true minimal margin R_zone - R_tumour -
    |offset| (mm), exact in fixed space. The moving grid is the field's grid (as in `synth` cases,
    where fixed and moving share one grid). Without a liver mask the pair goes into soft tissue.
    """
    rng = np.random.default_rng(seed)
    r_t = float(rng.uniform(8.0, 12.0))
    r_a = r_t + float(rng.uniform(5.0, 8.0))
    true_margin = float(rng.uniform(3.0, min(6.0, r_a - r_t - 0.5)))
    direction = rng.normal(size=3)
    offset = (r_a - r_t - true_margin) * direction / np.linalg.norm(direction)
    centre_a = _place_centre(fixed, liver_mask, r_a + 3.0, rng)
    centre_t = centre_a + offset
    zone = ball_occupancy(fixed.geometry, centre_a, r_a)
    tumour = _moved_ball(field, centre_t, r_t)
    meta = {"source": "ikr demo margin", "seed": int(seed)}
    return (
        Image(tumour, field.geometry, {**meta, "role": "tumour (moving)"}),
        Image(zone, fixed.geometry, {**meta, "role": "ablation zone (fixed)"}),
        true_margin,
    )


def _moved_ball(field: Field, centre_lps: np.ndarray, radius_mm: float) -> np.ndarray:
    """Partial-volume occupancy, on the field's grid, of the image of a fixed-space ball under x -> x + d(x)."""
    g = field.geometry
    dirs = np.random.default_rng(0).normal(size=(4000, 3))
    rim = centre_lps + radius_mm * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = g.lps_to_index(rim + sample_field(field, rim))
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 2, 0)[::-1]
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 3, np.asarray(g.size))[::-1]
    out = np.zeros(g.shape_zyx, dtype=np.float32)
    if np.any(hi <= lo):
        return out
    # Preimages of the box's voxel centres, then trilinear interpolation of the pull-back for sub-samples.
    z, y, x = np.meshgrid(*(np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    centres = g.index_to_lps(np.stack([x, y, z], axis=-1).reshape(-1, 3))
    back = (_pull_back(field, centres) - centres).reshape(*(hi - lo), 3)

    def inside(index_xyz: np.ndarray) -> np.ndarray:
        rel = (index_xyz[:, ::-1] - lo).T
        v = np.stack([ndimage.map_coordinates(back[..., c], rel, order=1, mode="nearest") for c in range(3)], axis=1)
        return np.linalg.norm(g.index_to_lps(index_xyz) + v - centre_lps, axis=1) <= radius_mm

    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = _supersampled_occupancy(g, lo, hi, inside)
    return out
