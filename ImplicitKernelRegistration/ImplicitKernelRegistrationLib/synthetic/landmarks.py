"""Landmark pairs of a synthetic case: corner-like anatomy in the fixed image, mapped through the true field."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..core.fields import (
    Field,
    transform_points,
)
from ..core.geometry import Geometry, Image
from .grids import coarse_body_mask, coarse_geometry, downsample

LANDMARK_SPACING_MM = 2.5
LANDMARK_MIN_DISTANCE_MM = 10.0


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


def landmark_pairs(ct: Image, field: Field, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Landmark pairs on corner-like anatomy whose fixed and moving points both lie well inside the image."""
    grid, factor = coarse_geometry(ct.geometry, LANDMARK_SPACING_MM)
    hu = downsample(ct.array, factor, grid)
    candidates = _landmark_candidates(hu, coarse_body_mask(hu, grid), grid, rng)
    candidates = _spread(candidates, LANDMARK_MIN_DISTANCE_MM, 4 * n + 20)
    if len(candidates) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    moving = transform_points(field, candidates)
    margin = max(3.0, 5.0 / min(ct.geometry.spacing_mm))
    keep = ct.geometry.contains_lps(moving, margin_voxels=-margin)
    fixed = candidates[keep][:n]
    return fixed, transform_points(field, fixed)
