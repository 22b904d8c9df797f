"""Fields from ITK transforms, resampling fields between grids, warping images and label maps."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import (
    Field,
    field_from_transform,
    resample_field,
    warp_image,
    warp_labels,
)
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.core.metrics import dice


def rotated_geometry(size: tuple = (22, 18, 14), spacing: tuple = (1.5, 2.0, 3.0)) -> Geometry:
    """A rotated and flipped anisotropic grid."""
    direction = Rotation.from_euler("zyx", [25, 10, -20], degrees=True).as_matrix() @ np.diag([-1, 1, 1])
    return Geometry(size, spacing, (-12.0, 30.0, 7.0), tuple(direction.ravel()))


def affine_transform() -> sitk.AffineTransform:
    """A non-trivial affine transform (shear, scale, translation, off-origin centre)."""
    t = sitk.AffineTransform(3)
    t.SetMatrix((1.04, 0.05, -0.02, -0.03, 0.96, 0.04, 0.01, -0.05, 1.03))
    t.SetTranslation((3.0, -2.0, 1.5))
    t.SetCenter((5.0, 20.0, 10.0))
    return t


def itk_points(transform: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    """SimpleITK's TransformPoint of each row."""
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in pts])


def bspline_on(geometry: Geometry) -> sitk.BSplineTransform:
    """A B-spline transform over `geometry` with random coefficients (a few mm)."""
    t = sitk.BSplineTransformInitializer(geometry.reference_image(), [3, 3, 3])
    rng = np.random.default_rng(1)
    t.SetParameters(tuple(rng.normal(0.0, 2.0, t.GetNumberOfParameters())))
    return t


@pytest.mark.parametrize("kind", ["affine", "euler", "bspline", "composite"])
def test_field_from_transform_matches_transform_point(kind: str) -> None:
    g = rotated_geometry()
    euler = sitk.Euler3DTransform((0.0, 10.0, 5.0), 0.1, -0.2, 0.15, (1.0, 2.0, 3.0))
    transforms = {
        "affine": affine_transform(),
        "euler": euler,
        "bspline": bspline_on(g),
        "composite": sitk.CompositeTransform([affine_transform(), bspline_on(g)]),
    }
    t = transforms[kind]
    field = field_from_transform(t, g)
    pts = g.grid_points_lps().reshape(-1, 3)
    got = pts + field.displacement_mm.reshape(-1, 3)
    np.testing.assert_allclose(got[::11], itk_points(t, pts[::11]), atol=1e-4)
    assert np.max(np.abs(field.displacement_mm)) > 1.0


def test_resample_field_is_exact_for_a_linear_field_inside_and_follows_the_outside_rule() -> None:
    t = affine_transform()
    coarse = Geometry((24, 24, 20), (5.0, 5.0, 6.0), (-60.0, -60.0, -60.0))
    direction = rotated_geometry().direction_matrix
    half = direction @ (np.array([49, 44, 39]) * np.array([1.5, 1.8, 2.0]) / 2)
    fine = Geometry((50, 45, 40), (1.5, 1.8, 2.0), tuple(np.array([10.0, 5.0, 0.0]) - half), tuple(direction.ravel()))
    got = resample_field(field_from_transform(t, coarse), fine)
    expected = field_from_transform(t, fine)
    pts = fine.grid_points_lps()
    inside = coarse.contains_lps(pts.reshape(-1, 3), margin_voxels=0.0).reshape(fine.shape_zyx)
    assert 0.3 < inside.mean() < 1.0
    np.testing.assert_allclose(got.displacement_mm[inside], expected.displacement_mm[inside], atol=1e-3)
    zero_outside = resample_field(field_from_transform(t, coarse), fine, extrapolate=False)
    far = ~coarse.contains_lps(pts.reshape(-1, 3), margin_voxels=0.5).reshape(fine.shape_zyx)
    assert np.all(zero_outside.displacement_mm[far] == 0.0)
    assert np.all(np.linalg.norm(got.displacement_mm[far], axis=-1) > 0.1)


def test_warp_real_ct_by_whole_voxels_shifts_the_array() -> None:
    ct = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))))
    g = ct.geometry
    shift = np.array([2, -3, 1])  # voxels (x, y, z); the CT grid has identity direction
    d = np.broadcast_to(shift * np.asarray(g.spacing_mm), (*g.shape_zyx, 3)).astype(np.float32)
    out = warp_image(ct, Field(d.copy(), g), default_value=-1024).array
    expected = ct.array[1:, :-3, 2:]
    np.testing.assert_allclose(out[:-1, 3:, :-2], expected, atol=1e-3)
    assert np.all(out[-1] == -1024)


def test_warp_labels_identity_keeps_labels_exactly() -> None:
    labels = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_labels117.nii.gz"))))
    zero = Field.identity(labels.geometry)
    for method in ("onehot_linear", "nearest"):
        np.testing.assert_array_equal(warp_labels(labels, zero, method).array, labels.array)


def test_warp_real_labels_smoothly_without_new_labels() -> None:
    labels = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_labels117.nii.gz"))))
    g = labels.geometry
    p = g.grid_points_lps()
    d = np.stack([5.0 * np.sin(p[..., 1] / 40.0), 4.0 * np.cos(p[..., 0] / 35.0), 1.5 * np.sin(p[..., 0] / 50.0)], -1)
    field = Field(d.astype(np.float32), g)
    onehot = warp_labels(labels, field).array
    nearest = warp_labels(labels, field, "nearest").array
    assert set(np.unique(onehot)) <= set(np.unique(labels.array))
    assert dice(onehot, nearest, [5])[5] > 0.95  # liver: the two methods agree on large organs
    assert dice(onehot, labels.array, [5])[5] < 0.99  # and the field really moved it


def test_onehot_linear_never_mixes_labels_and_keeps_a_thin_sheet() -> None:
    g = Geometry((12, 10, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    arr = np.zeros(g.shape_zyx, dtype=np.uint8)
    arr[:, :, 2:5] = 1
    arr[:, :, 5:8] = 3  # labels 1 and 3 touch: interpolating values would invent 2
    arr[:, :, 10] = 7  # a one-voxel sheet
    labels = Image(arr, g)
    for shift in (0.3, 0.5, 0.7):
        d = np.zeros((*g.shape_zyx, 3), dtype=np.float32)
        d[..., 0] = shift
        out = warp_labels(labels, Field(d, g)).array
        assert set(np.unique(out)) <= {0, 1, 3, 7}
        assert np.all((out == 7).sum(axis=2) >= 1)  # the sheet is whole in every row


def test_warp_labels_rejects_unknown_method() -> None:
    g = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(IkrError, match="unknown label interpolation"):
        warp_labels(Image(np.zeros(g.shape_zyx, np.uint8), g), Field.identity(g), "cubic")
