"""The Image type: a voxel array with its geometry in ITK's LPS millimetres.

Conventions used throughout the library:
- arrays are indexed (z, y, x), as SimpleITK's GetArrayFromImage returns them;
- indices, sizes, spacings and points are given in (x, y, z) order;
- `direction` is the 3x3 matrix whose columns are the physical directions of the
  x, y and z index axes (ITK's convention; SimpleITK's flat tuple is its row-major form);
- physical points are LPS millimetres; RAS appears only through `lps_ras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .errors import IkrError


def lps_ras(points: np.ndarray) -> np.ndarray:
    """Convert points or vectors between LPS and RAS (the map is its own inverse): negate x and y."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., 0] *= -1.0
    out[..., 1] *= -1.0
    return out


@dataclass(frozen=True)
class Geometry:
    """Grid geometry: size (x, y, z), spacing (mm), origin (LPS mm), direction (columns = axes)."""

    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3x3 direction matrix (columns are the index axes in LPS)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The numpy array shape (z, y, x) of an image on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def voxel_to_mm_matrix(self) -> np.ndarray:
        """The 3x3 matrix taking a step in voxels (x, y, z) to a vector in LPS mm (direction times spacing)."""
        return self.direction_matrix * np.asarray(self.spacing_mm)[None, :]

    def index_to_lps_matrix(self) -> np.ndarray:
        """The 4x4 affine that maps continuous (x, y, z) indices to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.voxel_to_mm_matrix()
        m[:3, 3] = self.origin_lps
        return m

    def index_to_lps(self, index_xyz: np.ndarray) -> np.ndarray:
        """Map (N, 3) continuous indices (x, y, z) to LPS mm."""
        idx = np.asarray(index_xyz, dtype=np.float64)
        a = self.index_to_lps_matrix()
        return idx @ a[:3, :3].T + a[:3, 3]

    def lps_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """Map (N, 3) LPS mm points to continuous indices (x, y, z)."""
        p = np.asarray(points_lps, dtype=np.float64)
        a = self.index_to_lps_matrix()
        return (p - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T

    def contains_lps(self, points_lps: np.ndarray, margin_voxels: float = 0.5) -> np.ndarray:
        """Boolean mask: which points lie inside the grid (voxel centres +- margin)."""
        idx = self.lps_to_index(points_lps)
        size = np.asarray(self.size, dtype=np.float64)
        return np.all((idx >= -margin_voxels) & (idx <= size - 1 + margin_voxels), axis=-1)

    def voxel_volume_ml(self) -> float:
        """The volume of one voxel in millilitres."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def grid_points_lps(self) -> np.ndarray:
        """LPS mm of every voxel centre, shape (z, y, x, 3)."""
        z, y, x = np.meshgrid(*(np.arange(n) for n in self.shape_zyx), indexing="ij")
        idx = np.stack([x, y, z], axis=-1).reshape(-1, 3)
        return self.index_to_lps(idx).reshape(*self.shape_zyx, 3)

    def centre_lps(self) -> np.ndarray:
        """The LPS mm point at the middle of the grid."""
        return self.index_to_lps((np.asarray(self.size, dtype=np.float64) - 1.0)[None] / 2.0)[0]

    def corners_lps(self) -> np.ndarray:
        """The 8 corner voxel centres in LPS mm, shape (8, 3)."""
        s = np.asarray(self.size) - 1
        idx = np.array([[i, j, k] for i in (0, s[0]) for j in (0, s[1]) for k in (0, s[2])], dtype=float)
        return self.index_to_lps(idx)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "size": list(self.size),
            "spacing_mm": list(self.spacing_mm),
            "origin_lps": list(self.origin_lps),
            "direction": list(self.direction),
        }

    @staticmethod
    def from_dict(data: dict) -> Geometry:
        """Inverse of to_dict."""
        return Geometry(
            size=tuple(int(v) for v in data["size"]),
            spacing_mm=tuple(float(v) for v in data["spacing_mm"]),
            origin_lps=tuple(float(v) for v in data["origin_lps"]),
            direction=tuple(float(v) for v in data["direction"]),
        )

    @staticmethod
    def from_sitk(image: sitk.Image) -> Geometry:
        """Read the geometry of a 3D SimpleITK image."""
        return Geometry(
            size=tuple(int(v) for v in image.GetSize()),
            spacing_mm=tuple(float(v) for v in image.GetSpacing()),
            origin_lps=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to_sitk(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's spacing, origin and direction on a SimpleITK image (in place)."""
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(self.direction)
        return image

    def reference_image(self) -> sitk.Image:
        """An empty SimpleITK image on this grid, for use as a Resample reference."""
        ref = sitk.Image(list(self.size), sitk.sitkUInt8)
        return self.apply_to_sitk(ref)


@dataclass
class Image:
    """A 3D scalar image: `array` indexed (z, y, x) plus its `geometry`; `meta` holds non-PHI facts."""

    array: np.ndarray
    geometry: Geometry
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise IkrError(f"expected a 3D image, got an array with {self.array.ndim} dimensions")
        if tuple(self.array.shape) != self.geometry.shape_zyx:
            raise IkrError(
                f"array shape {self.array.shape} does not match geometry size (x, y, z) {self.geometry.size}"
            )

    @staticmethod
    def from_sitk(image: sitk.Image, meta: dict | None = None) -> Image:
        """Wrap a 3D scalar SimpleITK image (the array is copied)."""
        if image.GetDimension() != 3:
            raise IkrError(f"expected a 3D image, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise IkrError(f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components")
        return Image(sitk.GetArrayFromImage(image), Geometry.from_sitk(image), dict(meta or {}))

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels and geometry."""
        out = sitk.GetImageFromArray(self.array, isVector=False)
        return self.geometry.apply_to_sitk(out)

    def with_array(self, array: np.ndarray) -> Image:
        """A new Image on the same grid with other voxels (meta is shallow-copied)."""
        return Image(array, self.geometry, dict(self.meta))


def voxels_to_mm(displacement_vox: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacements (..., 3) in working voxels (x, y, z) -> LPS mm (direction and spacing applied)."""
    return np.asarray(displacement_vox, dtype=np.float64) @ geometry.voxel_to_mm_matrix().T


def mm_to_voxels(displacement_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacements (..., 3) in LPS mm -> working voxels (x, y, z)."""
    return np.asarray(displacement_mm, dtype=np.float64) @ np.linalg.inv(geometry.voxel_to_mm_matrix()).T
