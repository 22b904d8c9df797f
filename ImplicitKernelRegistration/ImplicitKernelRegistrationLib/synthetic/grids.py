"""The synthetic generator's grids and masks: coarse working grids, resampling between grids, body and lung masks."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from ..core.geometry import Geometry, Image


def coarse_geometry(geometry: Geometry, target_mm: float) -> tuple[Geometry, int]:
    """A grid every `factor`-th voxel of `geometry` (same origin and direction) covering it, and the factor."""
    factor = max(1, round(target_mm / min(geometry.spacing_mm)))
    size = tuple(max(2, math.ceil((n - 1) / factor) + 1) for n in geometry.size)
    spacing = tuple(s * factor for s in geometry.spacing_mm)
    return Geometry(size, spacing, geometry.origin_lps, geometry.direction), factor


def downsample(values: np.ndarray, factor: int, coarse: Geometry, smooth: bool = True) -> np.ndarray:
    """Every `factor`-th voxel (box-smoothed first when `smooth`), edge-padded to the coarse grid."""
    v = values
    if smooth and factor > 1:
        v = ndimage.uniform_filter(values.astype(np.float32), size=2 * (factor // 2) + 1, mode="nearest")
    v = v[::factor, ::factor, ::factor]
    return np.pad(v, [(0, n - m) for n, m in zip(coarse.shape_zyx, v.shape, strict=True)], mode="edge")


def upsample(values: np.ndarray, factor: int, fine: Geometry) -> np.ndarray:
    """Trilinear upsampling of (z, y, x, c) values from a `factor`-times coarser grid onto `fine`."""
    if factor == 1:
        return np.ascontiguousarray(values[: fine.shape_zyx[0], : fine.shape_zyx[1], : fine.shape_zyx[2]])
    vol = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    size = [(n - 1) * factor + 1 for n in values.shape[:3]]
    out = torch.nn.functional.interpolate(vol, size=size, mode="trilinear", align_corners=True)[0]
    nz, ny, nx = fine.shape_zyx
    return np.ascontiguousarray(out[:, :nz, :ny, :nx].permute(1, 2, 3, 0).numpy())


def sample_on_fine(
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


def superior_axis(geometry: Geometry) -> tuple[int, int]:
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


def coarse_body_mask(hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Body: > -500 HU, the largest component, holes filled slice by slice (axially)."""
    axis, _ = superior_axis(geometry)
    mask = ndimage.binary_opening(hu > -500.0, iterations=1)
    mask = _largest_components(mask, keep=1, min_fraction=1.0)
    return ndimage.binary_fill_holes(mask, structure=_in_plane_structure(axis))


def named_labels(labels: Image | None, word: str) -> list[int]:
    """Label values whose name in labels.meta['label_names'] contains `word`."""
    names = {} if labels is None else labels.meta.get("label_names", {})
    return [int(k) for k, v in names.items() if word in str(v).lower()]


def lung_mask(hu: np.ndarray, body: np.ndarray, labels: np.ndarray | None, lung_values: list[int]) -> np.ndarray:
    """Lungs from named labels, else < -400 HU inside the body (the two largest components)."""
    if labels is not None and lung_values:
        mask = np.isin(labels, lung_values)
    else:
        mask = _largest_components((hu < -400.0) & body, keep=2, min_fraction=0.1)
    mask = ndimage.binary_closing(mask, iterations=2) | mask
    return ndimage.binary_fill_holes(mask)
