"""The Slicer-facing helpers with real vtk and SimpleITK objects: IJK-to-RAS, grid transforms, markups, models."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonTransforms import vtkGeneralTransform, vtkTransform
from vtkmodules.vtkFiltersHybrid import vtkGridTransform

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.fields import Field, transform_points
from ImplicitKernelRegistrationLib.core.geometry import Geometry, lps_ras
from ImplicitKernelRegistrationLib.io.points import PointSet, read_points, write_points
from ImplicitKernelRegistrationLib.slicer_bridge import (
    displacement_image_data,
    feedback_rows,
    field_from_grid_arrays,
    field_from_image_data,
    geometry_from_ijk_to_ras,
    grid_arrays,
    grid_direction_matrix,
    ijk_to_ras_matrix,
    image_from_volume_array,
    margin_polydata_ras,
    pairs_ras,
)


def _rotated_geometry() -> Geometry:
    """A small grid, rotated 30 degrees about z and flipped in z, with anisotropic spacing."""
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    return Geometry((14, 12, 10), (2.0, 2.5, 3.0), (-12.0, 7.0, 40.0), tuple(rot.ravel()))


def _smooth_field(geometry: Geometry) -> Field:
    """A smooth, clearly non-uniform displacement field (a few mm) on `geometry`."""
    p = geometry.grid_points_lps()
    d = np.stack(
        [
            3.0 * np.sin(p[..., 1] / 15.0),
            -2.0 + 0.05 * p[..., 0],
            1.5 * np.cos(p[..., 2] / 10.0),
        ],
        axis=-1,
    )
    return Field(d.astype(np.float32), geometry)


def _inner_points(geometry: Geometry, n: int, seed: int = 3) -> np.ndarray:
    """Random LPS points well inside the grid (at least 2 voxels from every face)."""
    rng = np.random.default_rng(seed)
    idx = rng.uniform(2.0, np.asarray(geometry.size) - 3.0, size=(n, 3))
    return geometry.index_to_lps(idx)


def _vtk_oriented_grid(field: Field) -> vtkGeneralTransform:
    """Real vtk transforms equal to vtkOrientedGridTransform(grid, direction): x -> x + d(index(x)).

    vtkGridTransform (pip vtk) ignores a grid direction, so the oriented grid is built as
    rotate-into-grid-frame, vtkGridTransform on the unrotated grid holding R^T d, rotate back:
    o + R((R^T (x - o)) + R^T d - 0) = x + d.
    """
    image = displacement_image_data(field)
    matrix = grid_direction_matrix(field)
    r = np.array([[matrix.GetElement(i, j) for j in range(3)] for i in range(3)])
    origin = np.asarray(image.GetOrigin())
    d = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(-1, 3)
    plain = vtkImageData()
    plain.SetDimensions(image.GetDimensions())
    plain.SetOrigin(image.GetOrigin())
    plain.SetSpacing(image.GetSpacing())
    plain.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(d @ r), deep=True))
    grid = vtkGridTransform()
    grid.SetDisplacementGridData(plain)
    grid.SetInterpolationModeToLinear()

    def about_origin(m: np.ndarray) -> vtkTransform:
        """The affine x -> o + m (x - o) as a vtkTransform."""
        a = np.eye(4)
        a[:3, :3] = m
        a[:3, 3] = origin - m @ origin
        t = vtkTransform()
        t.SetMatrix(a.ravel().tolist())
        return t

    chain = vtkGeneralTransform()
    chain.PostMultiply()
    chain.Concatenate(about_origin(r.T))
    chain.Concatenate(grid)
    chain.Concatenate(about_origin(r))
    return chain


def test_ijk_to_ras_matches_simpleitk_on_rotated_flipped_grid() -> None:
    g = _rotated_geometry()
    image = g.reference_image()
    m = ijk_to_ras_matrix(g)
    for index in [(0, 0, 0), (13, 0, 0), (0, 11, 9), (5, 7, 3)]:
        expected = lps_ras(np.asarray(image.TransformIndexToPhysicalPoint(index)))
        np.testing.assert_allclose(m @ np.array([*index, 1.0]), [*expected, 1.0], atol=1e-9)
    back = geometry_from_ijk_to_ras(m, g.size)
    np.testing.assert_allclose(back.index_to_lps_matrix(), g.index_to_lps_matrix(), atol=1e-12)
    np.testing.assert_allclose(back.spacing_mm, g.spacing_mm)


def test_ijk_to_ras_of_a_shared_ct_header_matches_simpleitk() -> None:
    path = shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    g = Geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    m = ijk_to_ras_matrix(g)
    corner = tuple(int(v) - 1 for v in reader.GetSize())
    ref = g.reference_image()
    for index in [(0, 0, 0), corner]:
        expected = lps_ras(np.asarray(ref.TransformIndexToPhysicalPoint(index)))
        np.testing.assert_allclose((m @ np.array([*index, 1.0]))[:3], expected, atol=1e-6)
    # A Slicer volume array is (k, j, i); the Image comes back on the same grid.
    back = image_from_volume_array(np.zeros(g.shape_zyx, np.int16), m)
    np.testing.assert_allclose(back.geometry.index_to_lps_matrix(), g.index_to_lps_matrix(), atol=1e-9)
    assert back.array.shape == g.shape_zyx


def test_grid_transform_moves_ras_points_where_the_field_says() -> None:
    field = _smooth_field(_rotated_geometry())
    p_lps = _inner_points(field.geometry, 25)
    expected_ras = lps_ras(transform_points(field, p_lps))
    chain = _vtk_oriented_grid(field)
    got = np.array([chain.TransformPoint(*p) for p in lps_ras(p_lps)])
    np.testing.assert_allclose(got, expected_ras, atol=1e-4)
    # The displacement is not trivially zero: the check above is meaningful.
    assert np.min(np.linalg.norm(expected_ras - lps_ras(p_lps), axis=1)) > 0.5


def test_grid_arrays_equal_an_itk_displacement_field_in_ras() -> None:
    """vtkOrientedGridTransform equals ITK's DisplacementFieldTransform on the same grid (Slicer's own test)."""
    field = _smooth_field(_rotated_geometry())
    grid = grid_arrays(field)
    image = sitk.GetImageFromArray(grid.displacement_ras.astype(np.float64), isVector=True)
    image.SetOrigin(tuple(grid.origin_ras))
    image.SetSpacing(tuple(grid.spacing_mm))
    image.SetDirection(tuple(grid.direction_ras.ravel()))
    transform = sitk.DisplacementFieldTransform(image)
    p_lps = _inner_points(field.geometry, 20, seed=5)
    got = np.array([transform.TransformPoint(tuple(p)) for p in lps_ras(p_lps)])
    np.testing.assert_allclose(got, lps_ras(transform_points(field, p_lps)), atol=1e-4)


def test_inverse_of_the_from_parent_transform_maps_moving_points_back() -> None:
    """Transform *to parent* (the inverse) takes a moving RAS point q = p + d(p) back to the fixed point p."""
    field = _smooth_field(_rotated_geometry())
    p_lps = _inner_points(field.geometry, 10, seed=7)
    q_ras = lps_ras(transform_points(field, p_lps))
    inverse = _vtk_oriented_grid(field).GetInverse()
    back = np.array([inverse.TransformPoint(*q) for q in q_ras])
    np.testing.assert_allclose(back, lps_ras(p_lps), atol=1e-2)


def test_field_round_trips_through_grid_arrays_and_image_data() -> None:
    field = _smooth_field(_rotated_geometry())
    again = field_from_grid_arrays(grid_arrays(field))
    np.testing.assert_allclose(again.displacement_mm, field.displacement_mm, atol=1e-6)
    assert np.allclose(again.geometry.index_to_lps_matrix(), field.geometry.index_to_lps_matrix())
    from_vtk = field_from_image_data(displacement_image_data(field), grid_direction_matrix(field))
    np.testing.assert_allclose(from_vtk.displacement_mm, field.displacement_mm, atol=1e-6)
    # RAS components: x and y negated, z kept.
    ras = grid_arrays(field).displacement_ras
    np.testing.assert_allclose(ras[..., 0], -field.displacement_mm[..., 0], atol=1e-6)
    np.testing.assert_allclose(ras[..., 2], field.displacement_mm[..., 2], atol=1e-6)


def test_markups_json_round_trip(tmp_path) -> None:
    f_lps = np.array([[-10.0, 20.0, 5.0], [-1.0, -2.0, 3.0]])
    path = write_points(PointSet(f_lps, ["a", "b"]), tmp_path / "fixed.mrk.json", "LPS")
    doc = json.loads(path.read_text())
    markup = doc["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    assert markup["controlPoints"][0]["position"] == [-10.0, 20.0, 5.0]
    back = read_points(path)
    np.testing.assert_allclose(back.points_lps, f_lps)
    assert back.labels == ["a", "b"]


def test_session_feedback_becomes_ras_markups_and_table_rows() -> None:
    feedback = [
        {"id": 3, "label": "pair 3", "fixed_lps": [1.0, 2.0, 3.0], "moving_lps": [2.0, 2.0, 3.0],
         "residual_mm": 0.0123, "warnings": []},
        {"id": 5, "label": "vessel", "fixed_lps": [-4.0, 0.0, 1.0], "moving_lps": [-4.0, 9.0, 1.0],
         "residual_mm": 1.5, "warnings": ["the field folds near this pair"]},
    ]  # fmt: skip
    fixed, moving, labels = pairs_ras(feedback)
    np.testing.assert_allclose(fixed[0], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(moving[1], [4.0, -9.0, 1.0])
    assert labels == ["pair 3", "vessel"]
    rows = feedback_rows(feedback)
    assert rows[0] == ("3", "pair 3", "0.01", "ok")
    assert rows[1][3] == "the field folds near this pair"


def test_margin_polydata_is_in_ras_with_margin_scalars() -> None:
    points = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    triangles = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    margins = np.array([-1.0, 2.0, 3.5, 0.0])
    poly = margin_polydata_ras(points, triangles, margins)
    assert poly.GetNumberOfPoints() == 4 and poly.GetNumberOfCells() == 4
    np.testing.assert_allclose(poly.GetPoint(1), [-10.0, 0.0, 0.0])
    np.testing.assert_allclose(poly.GetPoint(2), [0.0, -10.0, 0.0])
    scalars = poly.GetPointData().GetScalars()
    assert scalars.GetName() == "margin_mm"
    np.testing.assert_allclose(numpy_support.vtk_to_numpy(scalars), margins)


def test_an_initial_transform_node_becomes_the_start_alignment():
    """A linear transform that puts moving onto fixed (RAS, to parent) maps fixed LPS points to moving LPS points."""
    import SimpleITK as sitk

    from ImplicitKernelRegistrationLib.core.geometry import lps_ras
    from ImplicitKernelRegistrationLib.slicer_bridge import alignment_from_ras_to_parent

    rigid = sitk.Euler3DTransform((10.0, -20.0, 30.0), 0.1, -0.2, 0.3, (5.0, 6.0, -7.0))
    to_parent = np.eye(4)
    to_parent[:3, :3] = np.asarray(rigid.GetMatrix()).reshape(3, 3) * np.array([1.02, 0.98, 1.0])
    to_parent[:3, 3] = [12.0, -3.0, 40.0]
    start = alignment_from_ras_to_parent(to_parent)
    fixed_lps = np.random.default_rng(3).uniform(-150, 150, size=(20, 3))
    moving_lps = start.apply(fixed_lps)
    # the moving point, put under the node, lands on the fixed point
    landed_ras = lps_ras(moving_lps) @ to_parent[:3, :3].T + to_parent[:3, 3]
    np.testing.assert_allclose(lps_ras(landed_ras), fixed_lps, atol=1e-9)
