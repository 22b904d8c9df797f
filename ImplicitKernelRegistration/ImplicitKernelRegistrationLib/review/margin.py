"""Ablation margin: how far the (warped) tumour surface lies inside the ablation zone, in mm.

Direction: the field maps FIXED (post-ablation) points to MOVING (pre-ablation) points, so the
tumour, segmented on the moving image, is pulled into fixed space by resampling it through the
field (no inversion needed).

How it is measured:
- each mask becomes an occupancy in [0, 1] (binary masks 0/1; float masks in [0, 1] are taken as
  partial-volume fractions, which carry sub-voxel information);
- the tumour's occupancy is resampled linearly through the field onto the fixed grid (a thin part
  survives: a one-voxel sheet keeps a weight >= 0.5 under any shift along its normal);
- both surfaces are the 0.5 iso-surfaces (vtkFlyingEdges3D, sub-voxel, built on a crop around
  each object), mapped to LPS mm with each grid's true spacing and direction;
- the margin of a tumour-surface vertex is its exact distance to the ablation-zone surface mesh
  (vtkDistancePolyDataFilter: point-to-triangle), positive inside the zone, negative outside;
- percentiles and surface fractions weight each vertex by its share of the surface area;
- volumes are sums of occupancy; the outside volume is sum(tumour x (1 - zone)) on the fixed grid.

Limit: a binary mask only says which voxel centres are inside, so a surface parallel to the slices
is known to +- half the slice spacing (e.g. +- 1.25 mm on 2.5 mm slices); fractional masks remove
most of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkFlyingEdges3D, vtkImplicitPolyDataDistance, vtkWindowedSincPolyDataFilter

from ..core.errors import IkrError
from ..core.fields import Field
from ..core.geometry import Geometry, Image

PAD_VOXELS = 3
LEVEL = 0.5
SMOOTHING_ITERATIONS = 20  # windowed-sinc passes on both surfaces (3D Slicer's default smoothing)


@dataclass
class Surface:
    """A triangle mesh in LPS mm: points (N, 3) and triangles (M, 3) of point indices."""

    points_lps: np.ndarray
    triangles: np.ndarray

    def point_areas_mm2(self) -> np.ndarray:
        """Each point's share of the surface area (a third of each adjacent triangle), mm^2."""
        p = self.points_lps[self.triangles]
        tri_area = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
        areas = np.zeros(len(self.points_lps))
        for k in range(3):
            np.add.at(areas, self.triangles[:, k], tri_area / 3.0)
        return areas

    def to_vtk(self) -> vtkPolyData:
        """The mesh as vtkPolyData (coordinates as stored: LPS mm)."""
        from vtkmodules.vtkCommonCore import vtkPoints
        from vtkmodules.vtkCommonDataModel import vtkCellArray

        points = vtkPoints()
        points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(self.points_lps, dtype=np.float64), deep=True))
        cells = vtkCellArray()
        offsets = np.arange(0, 3 * len(self.triangles) + 1, 3, dtype=np.int64)
        cells.SetData(
            numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
            numpy_support.numpy_to_vtkIdTypeArray(
                np.ascontiguousarray(self.triangles.ravel(), dtype=np.int64), deep=True
            ),
        )
        poly = vtkPolyData()
        poly.SetPoints(points)
        poly.SetPolys(cells)
        return poly


@dataclass
class MarginResult:
    """Every figure of margin.json plus the per-point surface margins and the warped tumour."""

    min_margin_mm: float
    margin_p5_mm: float
    margin_p25_mm: float
    margin_p50_mm: float
    surface_fractions: dict[float, float]
    outside_volume_ml: float
    coverage_percent: float
    min_margin_point_lps: np.ndarray
    tumour_volume_moving_ml: float
    tumour_volume_warped_ml: float
    ablation_volume_ml: float
    surface_area_mm2: float
    surface: Surface
    margins_mm: np.ndarray
    point_areas_mm2: np.ndarray
    warped_tumour: Image
    warped_tumour_fraction: Image
    ablation_fraction: Image
    identity_field: bool

    def figures(self) -> dict:
        """The figures of margin.json (plain Python numbers; LPS mm, ml, percent)."""
        out = {
            "min_margin_mm": self.min_margin_mm,
            "margin_p5_mm": self.margin_p5_mm,
            "margin_p25_mm": self.margin_p25_mm,
            "margin_p50_mm": self.margin_p50_mm,
        }
        for t, frac in self.surface_fractions.items():
            out[fraction_key(t)] = frac
        out.update(
            {
                "outside_volume_ml": self.outside_volume_ml,
                "coverage_percent": self.coverage_percent,
                "min_margin_point_lps": [float(v) for v in self.min_margin_point_lps],
                "tumour_volume_moving_ml": self.tumour_volume_moving_ml,
                "tumour_volume_warped_ml": self.tumour_volume_warped_ml,
                "ablation_volume_ml": self.ablation_volume_ml,
                "tumour_surface_area_mm2": self.surface_area_mm2,
                "n_surface_points": int(len(self.margins_mm)),
                "thresholds_mm": [float(t) for t in self.surface_fractions],
                "identity_field": self.identity_field,
            }
        )
        return out


def fraction_key(threshold_mm: float) -> str:
    """The margin.json key of a surface fraction: surface_fraction_ge_5mm, ..._ge_2.5mm, ..._ge_-1mm."""
    return f"surface_fraction_ge_{float(threshold_mm):g}mm"


# ----------------------------------------------------------------------------- masks and crops


def occupancy(mask: Image, what: str, name: str | None = None) -> np.ndarray:
    """The mask as float32 occupancy in [0, 1]: floats in [0, 1] are fractions, anything else nonzero = 1."""
    arr = mask.array
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise IkrError(f"the {what} mask contains NaN or infinite voxels", name)
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            occ = arr.astype(np.float32)
        else:
            occ = (arr > 0).astype(np.float32)
    else:
        occ = (arr > 0).astype(np.float32)
    if not np.any(occ >= LEVEL):
        raise IkrError(f"the {what} mask is empty (no voxel is inside the {what})", name)
    return occ


def _crop_box(occ: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Index bounds (z, y, x) lo (inclusive) and hi (exclusive) of occ > 0, padded (may pass the grid)."""
    nz = np.nonzero(occ > 0)
    lo = np.array([a.min() for a in nz]) - pad
    hi = np.array([a.max() for a in nz]) + 1 + pad
    return lo, hi


def _sub_geometry(geometry: Geometry, lo_zyx: np.ndarray, hi_zyx: np.ndarray) -> Geometry:
    """The geometry of the index box [lo, hi) (z, y, x) of `geometry` (it may extend past the grid)."""
    origin = geometry.index_to_lps(np.asarray(lo_zyx[::-1], dtype=np.float64)[None])[0]
    size = tuple(int(v) for v in (hi_zyx - lo_zyx)[::-1])
    return Geometry(size, geometry.spacing_mm, tuple(float(v) for v in origin), geometry.direction)


def _crop(array: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """array[lo:hi] with zeros where the box passes the array's edges."""
    shape = np.asarray(array.shape)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    out = np.zeros(tuple(hi - lo), dtype=array.dtype)
    dst = tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi, strict=True))
    out[dst] = array[tuple(slice(a, c) for a, c in zip(src_lo, src_hi, strict=True))]
    return out


def cropped_occupancy(occ: np.ndarray, geometry: Geometry, pad: int = PAD_VOXELS) -> Image:
    """The occupancy on a crop around the object (padded with empty voxels, also past the grid)."""
    lo, hi = _crop_box(occ, pad)
    return Image(_crop(occ, lo, hi), _sub_geometry(geometry, lo, hi))


# ----------------------------------------------------------------------------- warping


def _fixed_region(moving_crop: Geometry, fixed: Geometry, reach_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Index box (z, y, x) of the fixed grid that can map into `moving_crop` when |d| <= reach_mm."""
    corners = moving_crop.corners_lps()
    lo_lps, hi_lps = corners.min(axis=0) - reach_mm, corners.max(axis=0) + reach_mm
    box = np.array(
        [[x, y, z] for x in (lo_lps[0], hi_lps[0]) for y in (lo_lps[1], hi_lps[1]) for z in (lo_lps[2], hi_lps[2])]
    )
    idx = fixed.lps_to_index(box)
    lo = np.floor(idx.min(axis=0)).astype(int) - 1
    hi = np.ceil(idx.max(axis=0)).astype(int) + 2
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(fixed.size))
    if np.any(hi <= lo):
        return None
    return lo[::-1], hi[::-1]


def _crop_field(field: Field, lo_zyx: np.ndarray, hi_zyx: np.ndarray) -> Field:
    """The field restricted to an index box of its own grid."""
    sl = tuple(slice(a, b) for a, b in zip(lo_zyx, hi_zyx, strict=True))
    return Field(np.ascontiguousarray(field.displacement_mm[sl]), _sub_geometry(field.geometry, lo_zyx, hi_zyx))


def _resample(image: Image, reference: Geometry, transform: sitk.Transform) -> np.ndarray:
    """Linear resampling of a float image onto `reference` through `transform` (0 outside), float32."""
    src = image.geometry.apply_to_sitk(sitk.GetImageFromArray(image.array.astype(np.float32)))
    out = sitk.Resample(src, reference.reference_image(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _touches_edge(occ: np.ndarray, lo_zyx: np.ndarray, hi_zyx: np.ndarray, full_zyx: tuple) -> bool:
    """Whether occupancy >= 0.5 reaches a face of the crop that is also a face of the full grid."""
    inside = occ >= LEVEL
    for axis in range(3):
        first = np.take(inside, 0, axis=axis)
        last = np.take(inside, -1, axis=axis)
        if (lo_zyx[axis] == 0 and first.any()) or (hi_zyx[axis] == full_zyx[axis] and last.any()):
            return True
    return False


def warp_tumour(
    tumour_crop: Image, fixed: Geometry, field: Field | None, names: tuple[str | None, str | None] = (None, None)
) -> Image:
    """Pull the tumour occupancy (moving crop) onto a crop of the fixed grid through the field."""
    tumour_name, field_name = names
    if field is None:
        transform, reach = sitk.Transform(3, sitk.sitkIdentity), 0.0
    else:
        reach = float(np.sqrt(np.max(np.sum(field.displacement_mm.astype(np.float32) ** 2, axis=-1))))
    region = _fixed_region(tumour_crop.geometry, fixed, reach + 2.0 * max(fixed.spacing_mm))
    if region is None:
        raise IkrError("the tumour lies outside the post-ablation field of view after warping", tumour_name)
    lo, hi = region
    crop_geometry = _sub_geometry(fixed, lo, hi)
    if field is not None:
        if field.geometry == fixed:
            transform = _crop_field(field, lo, hi).to_sitk_transform()
        else:
            if not np.any(field.geometry.contains_lps(crop_geometry.corners_lps())):
                raise IkrError("the displacement field's grid does not cover the tumour region", field_name)
            transform = field.to_sitk_transform()
    warped = _resample(tumour_crop, crop_geometry, transform)
    if not np.any(warped >= LEVEL):
        raise IkrError("the tumour lies outside the post-ablation field of view after warping", tumour_name)
    if _touches_edge(warped, lo, hi, fixed.shape_zyx):
        raise IkrError(
            "the warped tumour reaches the edge of the post-ablation field of view: part of it is outside "
            "the image, so its margin cannot be assessed",
            tumour_name,
        )
    return Image(warped, crop_geometry)


# ----------------------------------------------------------------------------- surfaces and distances


def iso_surface(occ: Image, smoothing_iterations: int = 0) -> Surface:
    """The 0.5 iso-surface of an occupancy image as a triangle mesh in LPS mm (optionally sinc-smoothed)."""
    image = vtkImageData()
    nz, ny, nx = occ.array.shape
    image.SetDimensions(nx, ny, nz)
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(occ.array, np.float32).ravel(), deep=True)
    )
    contour = vtkFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, LEVEL)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    contour.ComputeScalarsOff()
    contour.Update()
    poly = contour.GetOutput()
    if poly.GetNumberOfPoints() == 0:
        return Surface(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    idx = numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
    triangles = numpy_support.vtk_to_numpy(poly.GetPolys().GetConnectivityArray()).reshape(-1, 3).astype(np.int64)
    surface = Surface(occ.geometry.index_to_lps(idx), triangles)
    if smoothing_iterations > 0:
        surface = _smooth(surface, smoothing_iterations)
    return surface


def _smooth(surface: Surface, iterations: int) -> Surface:
    """Windowed-sinc smoothing (non-shrinking) of a mesh, as 3D Slicer smooths closed surfaces."""
    smoother = vtkWindowedSincPolyDataFilter()
    smoother.SetInputData(surface.to_vtk())
    smoother.SetNumberOfIterations(iterations)
    smoother.SetPassBand(0.01)
    smoother.NormalizeCoordinatesOn()
    smoother.BoundarySmoothingOff()
    smoother.FeatureEdgeSmoothingOff()
    smoother.NonManifoldSmoothingOn()
    smoother.Update()
    pts = numpy_support.vtk_to_numpy(smoother.GetOutput().GetPoints().GetData()).astype(np.float64)
    return Surface(pts, surface.triangles)


def distances_to_surface(points_lps: np.ndarray, surface: Surface) -> np.ndarray:
    """Unsigned distance (mm) of each point to the nearest point of a triangle mesh (point-to-triangle).

    Points are evaluated one by one: VTK's batch evaluation runs threads over a cell locator that is
    not thread-safe (it crashes at random).
    """
    implicit = vtkImplicitPolyDataDistance()
    implicit.SetInput(surface.to_vtk())
    evaluate = implicit.EvaluateFunction
    return np.abs(np.fromiter((evaluate(p) for p in points_lps.tolist()), dtype=np.float64, count=len(points_lps)))


def sample_occupancy(occ: Image, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear occupancy at LPS points (0 outside the image)."""
    idx = occ.geometry.lps_to_index(points_lps)
    return ndimage.map_coordinates(occ.array, idx[:, ::-1].T, order=1, mode="constant", cval=0.0)


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The q-th percentile (0-100) of `values` with non-negative `weights` (inverted weighted CDF, midpoints)."""
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cdf = (np.cumsum(w) - 0.5 * w) / np.sum(w)
    return float(np.interp(q / 100.0, cdf, v))


# ----------------------------------------------------------------------------- the whole measurement


def _fixed_on(crop: Image, full: Geometry) -> Image:
    """A uint8 mask (occupancy >= 0.5) on the full fixed grid from an occupancy on a crop of it."""
    out = np.zeros(full.shape_zyx, dtype=np.uint8)
    lo = np.rint(full.lps_to_index(np.asarray(crop.geometry.origin_lps)[None])[0][::-1]).astype(int)
    hi = lo + np.asarray(crop.array.shape)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(full.shape_zyx))
    dst = tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    src = tuple(slice(a - o, b - o) for a, b, o in zip(src_lo, src_hi, lo, strict=True))
    out[dst] = crop.array[src] >= LEVEL
    return Image(out, full)


def compute_margin(
    tumour_moving: Image,
    ablation_fixed: Image,
    field: Field | None,
    thresholds_mm: tuple[float, ...] = (0.0, 5.0),
    names: tuple[str | None, str | None, str | None] = (None, None, None),
    smoothing_iterations: int = SMOOTHING_ITERATIONS,
) -> MarginResult:
    """Margins of the tumour (moving grid) warped through `field` (fixed -> moving; None = identity)
    to the ablation zone (fixed grid). `names` (tumour, ablation, field) name the inputs in errors."""
    tumour_name, ablation_name, field_name = names
    occ_t = occupancy(tumour_moving, "tumour", tumour_name)
    occ_a = occupancy(ablation_fixed, "ablation-zone", ablation_name)
    fixed = ablation_fixed.geometry
    tumour_crop = cropped_occupancy(occ_t, tumour_moving.geometry)
    ablation_crop = cropped_occupancy(occ_a, fixed)
    warped = warp_tumour(tumour_crop, fixed, field, (tumour_name, field_name))

    surface = iso_surface(warped, smoothing_iterations)
    zone = iso_surface(ablation_crop, smoothing_iterations)
    if len(surface.points_lps) == 0 or len(zone.points_lps) == 0:
        raise IkrError("the warped tumour has no surface to measure (too small for the grid)", tumour_name)
    inside = sample_occupancy(ablation_crop, surface.points_lps) >= LEVEL
    margins = distances_to_surface(surface.points_lps, zone) * np.where(inside, 1.0, -1.0)
    areas = surface.point_areas_mm2()

    zone_on_tumour = _resample(ablation_crop, warped.geometry, sitk.Transform(3, sitk.sitkIdentity))
    fixed_voxel_ml = fixed.voxel_volume_ml()
    warped_ml = float(np.sum(warped.array, dtype=np.float64)) * fixed_voxel_ml
    outside_ml = float(np.sum(warped.array * (1.0 - zone_on_tumour), dtype=np.float64)) * fixed_voxel_ml
    k = int(np.argmin(margins))
    total_area = float(np.sum(areas))
    return MarginResult(
        min_margin_mm=float(margins[k]),
        margin_p5_mm=weighted_percentile(margins, areas, 5),
        margin_p25_mm=weighted_percentile(margins, areas, 25),
        margin_p50_mm=weighted_percentile(margins, areas, 50),
        surface_fractions={float(t): float(np.sum(areas[margins >= t]) / total_area) for t in thresholds_mm},
        outside_volume_ml=outside_ml,
        coverage_percent=100.0 * (1.0 - outside_ml / warped_ml),
        min_margin_point_lps=surface.points_lps[k].copy(),
        tumour_volume_moving_ml=float(np.sum(occ_t, dtype=np.float64)) * tumour_moving.geometry.voxel_volume_ml(),
        tumour_volume_warped_ml=warped_ml,
        ablation_volume_ml=float(np.sum(occ_a, dtype=np.float64)) * fixed_voxel_ml,
        surface_area_mm2=total_area,
        surface=surface,
        margins_mm=margins,
        point_areas_mm2=areas,
        warped_tumour=_fixed_on(warped, fixed),
        warped_tumour_fraction=warped,
        ablation_fraction=ablation_crop,
        identity_field=field is None,
    )
