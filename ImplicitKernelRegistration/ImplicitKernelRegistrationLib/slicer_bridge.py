"""Slicer-facing conversions (pure numpy/vtk, no `slicer`): volumes, grid transforms, point lists, margin models.

Slicer works in RAS; the library in LPS. Every conversion here goes through `geometry.lps_ras`.

Grid transforms: a library Field maps fixed points to moving points (p -> p + d(p)), the ITK
resampling direction. In Slicer that is the moving volume's transform *from parent*
(`vtkMRMLTransformNode.SetAndObserveTransformFromParent`): a world (fixed) point p shows the moving
voxel at p + d(p). `vtkOrientedGridTransform` applies x -> x + d(index(x)) with
index(x) = (R S)^-1 (x - origin), the same as ITK's DisplacementFieldTransform, so the grid's origin,
direction columns and displacement vectors are all converted LPS -> RAS (x and y negated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkFloatArray
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .errors import IkrError
from .fields import Field
from .geometry import Geometry, Image, lps_ras
from .io.points import PointSet, read_points, write_points

# ----------------------------------------------------------------------------- volumes


def ijk_to_ras_matrix(geometry: Geometry) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a grid (Slicer's volume node matrix; IJK = index (x, y, z))."""
    m = geometry.index_to_lps_matrix()
    m[:3, :] = lps_ras(m[:3, :].T).T
    return m


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, size_xyz: tuple[int, int, int]) -> Geometry:
    """The Geometry of a grid given its 4x4 IJK-to-RAS matrix and its size (x, y, z)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    lps = lps_ras(m[:3, :].T).T  # 3 x 4: axis columns and origin in LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise IkrError(f"the volume's IJK-to-RAS matrix has a zero spacing ({spacing.tolist()})")
    direction = lps[:, :3] / spacing[None, :]
    return Geometry(
        size=tuple(int(v) for v in size_xyz),
        spacing_mm=tuple(float(v) for v in spacing),
        origin_lps=tuple(float(v) for v in lps[:, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def image_from_volume_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray, meta: dict | None = None) -> Image:
    """An Image from a Slicer volume's voxel array (k, j, i) = (z, y, x) and its IJK-to-RAS matrix (copied)."""
    array = np.array(array_kji, copy=True)
    if array.ndim != 3:
        raise IkrError(f"expected a scalar 3D volume, got an array of shape {array.shape}")
    size = (array.shape[2], array.shape[1], array.shape[0])
    return Image(array, geometry_from_ijk_to_ras(ijk_to_ras, size), dict(meta or {}))


# ----------------------------------------------------------------------------- grid transforms


@dataclass
class GridArrays:
    """A displacement grid in RAS: vectors (z, y, x, 3), origin, spacing and direction (columns = axes)."""

    displacement_ras: np.ndarray
    origin_ras: np.ndarray
    spacing_mm: np.ndarray
    direction_ras: np.ndarray


def grid_arrays(field: Field) -> GridArrays:
    """The field as RAS grid arrays for a vtkOrientedGridTransform used as a transform *from parent*."""
    g = field.geometry
    return GridArrays(
        displacement_ras=lps_ras(field.displacement_mm),
        origin_ras=lps_ras(np.asarray(g.origin_lps)),
        spacing_mm=np.asarray(g.spacing_mm, dtype=np.float64),
        direction_ras=lps_ras(g.direction_matrix.T).T,
    )


def field_from_grid_arrays(grid: GridArrays) -> Field:
    """Inverse of grid_arrays: a Field (LPS, fixed -> moving) from RAS grid arrays."""
    d = np.asarray(grid.displacement_ras)
    direction = lps_ras(np.asarray(grid.direction_ras, dtype=np.float64).T).T
    geometry = Geometry(
        size=(d.shape[2], d.shape[1], d.shape[0]),
        spacing_mm=tuple(float(v) for v in grid.spacing_mm),
        origin_lps=tuple(float(v) for v in lps_ras(np.asarray(grid.origin_ras))),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return Field(lps_ras(d).astype(np.float32), geometry)


def displacement_image_data(field: Field) -> vtkImageData:
    """The RAS displacement grid as vtkImageData (origin, spacing, 3 double components; no direction).

    The grid's direction goes to vtkOrientedGridTransform.SetGridDirectionMatrix (see
    `grid_direction_matrix`), as Slicer's own DICOM plugins do.
    """
    grid = grid_arrays(field)
    image = vtkImageData()
    image.SetDimensions(*field.geometry.size)
    image.SetOrigin(*grid.origin_ras)
    image.SetSpacing(*grid.spacing_mm)
    vectors = numpy_support.numpy_to_vtk(
        np.ascontiguousarray(grid.displacement_ras.reshape(-1, 3), dtype=np.float64), deep=True
    )
    vectors.SetName("displacement")
    image.GetPointData().SetScalars(vectors)
    return image


def grid_direction_matrix(field: Field) -> vtkMatrix4x4:
    """The 4x4 grid direction matrix (RAS; upper 3x3 = axis directions) for SetGridDirectionMatrix."""
    matrix = vtkMatrix4x4()
    direction = grid_arrays(field).direction_ras
    for row in range(3):
        for col in range(3):
            matrix.SetElement(row, col, float(direction[row, col]))
    return matrix


def field_from_image_data(image: vtkImageData, direction: vtkMatrix4x4) -> Field:
    """Read a grid transform's RAS displacement vtkImageData and direction matrix back as a Field."""
    scalars = image.GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 3:
        raise IkrError("the grid transform holds no 3-component displacement grid")
    nx, ny, nz = image.GetDimensions()
    d = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx, 3).astype(np.float64)
    r = np.array([[direction.GetElement(i, j) for j in range(3)] for i in range(3)])
    return field_from_grid_arrays(GridArrays(d, np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()), r))


# ----------------------------------------------------------------------------- point lists and pairs


def complete_pairs(fixed_ras: np.ndarray, moving_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair point i of the fixed list with point i of the moving list (RAS in), as LPS arrays (N, 3) each.

    A fixed point still waiting for its moving match (or the reverse) is left out.
    """
    f = np.asarray(fixed_ras, dtype=np.float64).reshape(-1, 3)
    m = np.asarray(moving_ras, dtype=np.float64).reshape(-1, 3)
    n = min(len(f), len(m))
    return lps_ras(f[:n]), lps_ras(m[:n])


def pairs_ras(feedback: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fixed and moving RAS points (N, 3) and labels of a session's user pairs (from `feedback()`)."""
    fixed = np.asarray([p["fixed_lps"] for p in feedback], dtype=np.float64).reshape(-1, 3)
    moving = np.asarray([p["moving_lps"] for p in feedback], dtype=np.float64).reshape(-1, 3)
    return lps_ras(fixed), lps_ras(moving), [str(p["label"]) for p in feedback]


def feedback_rows(feedback: list[dict]) -> list[tuple[str, str, str, str]]:
    """Table rows (id, label, residual mm, warnings) for the refinement pair table."""
    return [
        (str(p["id"]), str(p["label"]), f"{p['residual_mm']:.2f}", "; ".join(p["warnings"]) or "ok") for p in feedback
    ]


def write_markups(points_lps: np.ndarray, labels: list[str], path: str | os.PathLike) -> Path:
    """Write a point list as a Slicer markups file (.mrk.json, .fcsv) or CSV, atomically (LPS in the file)."""
    return write_points(PointSet(points_lps, labels), path, "LPS")


def read_markups(path: str | os.PathLike) -> PointSet:
    """Read a Slicer markups file (.mrk.json, .fcsv) or point CSV as LPS points with labels."""
    return read_points(path)


# ----------------------------------------------------------------------------- margins and weights


def margin_polydata_ras(points_lps: np.ndarray, triangles: np.ndarray, margins_mm: np.ndarray) -> vtkPolyData:
    """The tumour surface in RAS with point scalars `margin_mm`, ready for a Slicer model node."""
    from .margin import Surface

    poly = Surface(lps_ras(points_lps), np.asarray(triangles)).to_vtk()
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(margins_mm, dtype=np.float32), deep=True)
    if not isinstance(scalars, vtkFloatArray):
        raise IkrError("could not convert the margins to a vtk float array")
    scalars.SetName("margin_mm")
    poly.GetPointData().SetScalars(scalars)
    return poly
