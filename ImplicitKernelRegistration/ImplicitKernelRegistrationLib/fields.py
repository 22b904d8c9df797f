"""The Field type: a dense displacement field on the fixed grid, mapping fixed to moving points.

ITK convention: a fixed point `p` (LPS mm) corresponds to the moving point `p + d(p)`.
`displacement_mm` is indexed (z, y, x, c) with components c in LPS (x, y, z) order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import IkrError
from .geometry import Geometry, Image


@dataclass
class Field:
    """Dense displacement (LPS mm) on `geometry`, shape (z, y, x, 3), fixed -> moving."""

    displacement_mm: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        d = self.displacement_mm
        if d.ndim != 4 or d.shape[-1] != 3 or tuple(d.shape[:3]) != self.geometry.shape_zyx:
            raise IkrError(
                f"displacement of shape {d.shape} does not fit grid (z, y, x) {self.geometry.shape_zyx} x 3"
            )

    @staticmethod
    def identity(geometry: Geometry) -> Field:
        """A zero displacement field on `geometry`."""
        return Field(np.zeros((*geometry.shape_zyx, 3), dtype=np.float32), geometry)

    @staticmethod
    def from_sitk(image: sitk.Image) -> Field:
        """Wrap a 3-component SimpleITK vector image of displacements (LPS mm)."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
            raise IkrError("a displacement field must be a 3D image with 3 components per voxel")
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
        return Field(arr, Geometry.from_sitk(image))

    def to_sitk(self) -> sitk.Image:
        """A float64 3-component SimpleITK vector image (the form DisplacementFieldTransform takes)."""
        out = sitk.GetImageFromArray(self.displacement_mm.astype(np.float64), isVector=True)
        return self.geometry.apply_to_sitk(out)

    def to_sitk_transform(self) -> sitk.DisplacementFieldTransform:
        """A SimpleITK DisplacementFieldTransform equivalent to this field."""
        return sitk.DisplacementFieldTransform(self.to_sitk())


def sample_field(field: Field, points_lps: np.ndarray) -> np.ndarray:
    """Displacement (N, 3) at LPS points by trilinear interpolation (zero outside the grid, as ITK)."""
    pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    idx = field.geometry.lps_to_index(pts)  # (N, 3) x, y, z
    coords = idx[:, ::-1].T  # z, y, x rows for map_coordinates
    inside = field.geometry.contains_lps(pts, margin_voxels=0.0)
    out = np.zeros((pts.shape[0], 3), dtype=np.float64)
    for c in range(3):
        out[:, c] = ndimage.map_coordinates(
            field.displacement_mm[..., c].astype(np.float64), coords, order=1, mode="nearest"
        )
    out[~inside] = 0.0
    return out


def transform_points(field: Field, fixed_points_lps: np.ndarray) -> np.ndarray:
    """Map fixed-space points to moving space: p + d(p), like ITK's TransformPoint."""
    pts = np.atleast_2d(np.asarray(fixed_points_lps, dtype=np.float64))
    return pts + sample_field(field, pts)


def warp_image(
    moving: Image, field: Field, interpolation: str = "linear", default_value: float | None = None
) -> Image:
    """Resample `moving` into the field's (fixed) grid: out(p) = moving(p + d(p))."""
    interpolators = {
        "linear": sitk.sitkLinear,
        "nearest": sitk.sitkNearestNeighbor,
        "bspline": sitk.sitkBSpline,
    }
    if interpolation not in interpolators:
        raise IkrError(f"unknown interpolation {interpolation!r}; choose one of {sorted(interpolators)}")
    if default_value is None:
        default_value = float(np.min(moving.array))
    out = sitk.Resample(
        moving.to_sitk(),
        field.geometry.reference_image(),
        field.to_sitk_transform(),
        interpolators[interpolation],
        float(default_value),
        sitk.GetPixelIDValueFromString("64-bit float") if interpolation != "nearest" else sitk.sitkUnknown,
    )
    arr = sitk.GetArrayFromImage(out)
    if interpolation != "nearest":
        arr = arr.astype(np.float32)
    return Image(arr, field.geometry, dict(moving.meta))


def _sample_field_on_points_grid(field: Field, points_lps: np.ndarray) -> np.ndarray:
    """Displacement of `field` at an (..., 3) array of LPS points (trilinear, edge-clamped)."""
    shape = points_lps.shape[:-1]
    idx = field.geometry.lps_to_index(points_lps.reshape(-1, 3))
    coords = idx[:, ::-1].T
    out = np.empty((idx.shape[0], 3), dtype=np.float32)
    for c in range(3):
        out[:, c] = ndimage.map_coordinates(field.displacement_mm[..., c], coords, order=1, mode="nearest")
    return out.reshape(*shape, 3)


def compose(inner: Field, outer: Field) -> Field:
    """The field of x -> y = x + inner(x) -> y + outer(y), on inner's grid (apply inner, then outer)."""
    pts = inner.geometry.grid_points_lps() + inner.displacement_mm
    total = inner.displacement_mm + _sample_field_on_points_grid(outer, pts)
    return Field(total.astype(np.float32), inner.geometry)


def invert(field: Field, iterations: int = 30, tolerance_mm: float = 1e-3) -> tuple[Field, float]:
    """Inverse field by fixed-point iteration v(y) = -d(y + v(y)); returns it and the max residual (mm)."""
    grid = field.geometry.grid_points_lps()
    inv = -field.displacement_mm.astype(np.float32).copy()
    residual = np.inf
    for _ in range(iterations):
        new = -_sample_field_on_points_grid(field, grid + inv)
        residual = float(np.max(np.linalg.norm(new - inv, axis=-1)))
        inv = new
        if residual < tolerance_mm:
            break
    check = inv + _sample_field_on_points_grid(field, grid + inv)
    return Field(inv, field.geometry), float(np.max(np.linalg.norm(check, axis=-1)))
