"""Displacement fields on disk: round trips, plain-SimpleITK interoperability, NIfTI layout, errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field, field_from_transform, transform_points, warp_image
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.transforms import read_field, write_field, write_transform


def rotated_geometry(size: tuple, spacing: tuple, centre_lps: np.ndarray) -> Geometry:
    """A rotated and flipped grid (det(direction) = -1), anisotropic, centred on `centre_lps`."""
    direction = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix() @ np.diag([1, -1, 1])
    half = direction @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    return Geometry(size, spacing, tuple(np.asarray(centre_lps) - half), tuple(direction.ravel()))


def smooth_field(geometry: Geometry) -> Field:
    """A smooth, invertible, non-trivial field (a few mm) defined in physical coordinates."""
    p = geometry.grid_points_lps()
    d = np.stack(
        [4.0 * np.sin(p[..., 1] / 15.0), 3.0 * np.cos(p[..., 2] / 11.0), 2.5 * np.sin(p[..., 0] / 17.0)],
        axis=-1,
    )
    return Field(d.astype(np.float32), geometry)


@pytest.fixture
def field() -> Field:
    """A small smooth field on a rotated, flipped, anisotropic grid."""
    return smooth_field(rotated_geometry((24, 20, 16), (1.5, 2.0, 3.0), np.array([10.0, -20.0, 35.0])))


def random_points(geometry: Geometry, n: int, seed: int = 0) -> np.ndarray:
    """n random LPS points whose continuous indices lie within the grid's voxel centres."""
    rng = np.random.default_rng(seed)
    idx = rng.uniform(0, 1, size=(n, 3)) * (np.asarray(geometry.size) - 1)
    return geometry.index_to_lps(idx)


def sitk_transform_from_file(path: Path) -> sitk.Transform:
    """Build the transform from a written file with plain SimpleITK only."""
    if path.suffix in (".h5", ".tfm"):
        return sitk.ReadTransform(str(path))
    image = sitk.ReadImage(str(path))
    return sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))


@pytest.mark.parametrize("name", ["f.nii.gz", "f.nii", "f.mha", "f.nrrd", "t.h5", "t.tfm"])
def test_round_trip_keeps_values_and_geometry(tmp_path: Path, field: Field, name: str) -> None:
    path = tmp_path / name
    (write_transform if name.startswith("t.") else write_field)(field, path)
    back = read_field(path)
    np.testing.assert_array_equal(back.displacement_mm, field.displacement_mm)
    assert back.geometry.size == field.geometry.size
    np.testing.assert_allclose(back.geometry.spacing_mm, field.geometry.spacing_mm, atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin_lps, field.geometry.origin_lps, atol=1e-4)
    np.testing.assert_allclose(back.geometry.direction, field.geometry.direction, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


@pytest.mark.parametrize("name", ["f.nii.gz", "f.mha", "t.h5"])
def test_plain_simpleitk_reads_the_same_transform(tmp_path: Path, field: Field, name: str) -> None:
    path = tmp_path / name
    (write_transform if name.startswith("t.") else write_field)(field, path)
    transform = sitk_transform_from_file(path)
    pts = np.vstack([random_points(field.geometry, 100), field.geometry.corners_lps() + 0.3, [[500.0, 500.0, 500.0]]])
    ours = transform_points(read_field(path), pts)
    theirs = np.array([transform.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_warping_real_ct_matches_simpleitk_resample(tmp_path: Path) -> None:
    ct = sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz")), sitk.sitkFloat32)
    moving = Image.from_sitk(ct)
    centre = moving.geometry.index_to_lps((np.asarray(moving.geometry.size)[None] - 1) / 2)[0]
    field = smooth_field(rotated_geometry((60, 50, 20), (4.0, 3.5, 4.0), centre))
    path = write_transform(field, tmp_path / "warp.h5")
    default = float(np.min(moving.array))
    ours = warp_image(moving, read_field(path), default_value=default).array
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(ct, field.geometry.reference_image(), sitk.ReadTransform(str(path)), sitk.sitkLinear, default)
    )
    value_range = float(np.ptp(moving.array))
    assert np.ptp(ours) > 0.5 * value_range  # the CT really lands in the warped grid
    assert np.max(np.abs(ours - theirs)) <= 1e-3 * value_range


def test_nifti_is_an_itk_vector_field_with_lps_components(tmp_path: Path, field: Field) -> None:
    path = write_field(field, tmp_path / "f.nii.gz")
    raw = gzip.open(path).read()
    dims = struct.unpack("<8h", raw[40:56])
    intent = struct.unpack("<h", raw[68:70])[0]
    offset = int(struct.unpack("<f", raw[108:112])[0])
    nx, ny, nz = field.geometry.size
    assert dims[:6] == (5, nx, ny, nz, 1, 3)
    assert intent == 1007  # NIFTI_INTENT_VECTOR: components stored in ITK's LPS, as ANTs and Slicer expect
    data = np.frombuffer(raw[offset:], dtype="<f4").reshape(3, nz, ny, nx)
    np.testing.assert_array_equal(np.moveaxis(data, 0, -1), field.displacement_mm)


def test_affine_transform_file_needs_and_uses_a_reference_grid(tmp_path: Path, field: Field) -> None:
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.02, 0.0, -0.03, 0.97, 0.01, 0.0, 0.04, 1.02))
    affine.SetTranslation((2.0, -1.0, 3.5))
    path = tmp_path / "affine.tfm"
    sitk.WriteTransform(affine, str(path))
    with pytest.raises(IkrError, match="reference grid"):
        read_field(path)
    got = read_field(path, reference_geometry=field.geometry)
    pts = field.geometry.grid_points_lps().reshape(-1, 3)[::37]
    expected = np.array([affine.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(pts + got.displacement_mm.reshape(-1, 3)[::37], expected, atol=1e-4)
    np.testing.assert_array_equal(got.displacement_mm, field_from_transform(affine, field.geometry).displacement_mm)


def test_bad_files_raise_ikr_error_naming_the_file(tmp_path: Path, field: Field) -> None:
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkFloat32), str(scalar))
    two = tmp_path / "two.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 2), str(two))
    corrupt_h5 = tmp_path / "corrupt.h5"
    corrupt_h5.write_bytes(b"not an hdf5 file" * 8)
    good = write_field(field, tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:600])
    cases = {
        tmp_path / "missing.nii.gz": "not found",
        scalar: "3 components",
        two: "got 2",
        corrupt_h5: "transform",
        truncated: "cannot be read",
        tmp_path / "field.png": "unsupported",
    }
    (tmp_path / "field.png").write_bytes(b"x")
    for path, problem in cases.items():
        with pytest.raises(IkrError, match=problem) as info:
            read_field(path)
        assert str(path) in str(info.value)


def test_writers_refuse_unknown_suffixes_without_writing(tmp_path: Path, field: Field) -> None:
    with pytest.raises(IkrError, match="unsupported"):
        write_field(field, tmp_path / "f.h5")
    with pytest.raises(IkrError, match="unsupported"):
        write_transform(field, tmp_path / "f.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_file(tmp_path: Path, field: Field) -> None:
    path = tmp_path / "f.h5"
    write_transform(Field.identity(field.geometry), path)
    write_transform(field, path)
    np.testing.assert_array_equal(read_field(path).displacement_mm, field.displacement_mm)
