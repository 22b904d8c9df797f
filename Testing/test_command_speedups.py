"""The faster steps of `ikr register` give what the slower ones gave; the command's time and memory figures."""

from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ImplicitKernelRegistrationLib.cli import main
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field, jacobian_determinant, transform_points, warp_image
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.images import read_image, write_image
from ImplicitKernelRegistrationLib.io.transforms import write_field, write_transform
from ImplicitKernelRegistrationLib.registration.memory import check_memory, estimate_peak_mb
from ImplicitKernelRegistrationLib.registration.pipeline import peak_memory_mb
from ImplicitKernelRegistrationLib.registration.refine import RefinementSession
from ImplicitKernelRegistrationLib.review.report import process_elapsed_s
from ImplicitKernelRegistrationLib.review.uncertainty import (
    CLICK_ERROR_MM,
    _click_factor,
    _click_factor_on_grid,
    expected_error_map,
    load_uncertainty_model,
)


def oblique_geometry(size: tuple = (30, 26, 22), spacing: tuple = (1.2, 1.7, 2.5)) -> Geometry:
    """A rotated, flipped, anisotropic grid."""
    direction = Rotation.from_euler("xyz", [25, -10, 40], degrees=True).as_matrix() @ np.diag([1, 1, -1])
    return Geometry(size, spacing, (12.0, -30.0, 7.0), tuple(direction.ravel()))


def random_smooth_field(geometry: Geometry, seed: int = 0, amplitude_mm: float = 6.0) -> Field:
    """A random smooth field (Gaussian-smoothed noise), large enough to fold in places."""
    from scipy import ndimage

    noise = np.random.default_rng(seed).normal(size=(*geometry.shape_zyx, 3))
    d = np.stack([ndimage.gaussian_filter(noise[..., c], 2.5) for c in range(3)], axis=-1)
    return Field((amplitude_mm * d / d.std()).astype(np.float32), geometry)


def reference_jacobian(field: Field) -> np.ndarray:
    """det(I + dD/du @ inv(direction)) with numpy.gradient and numpy.linalg.det on the whole grid."""
    d = field.displacement_mm.astype(np.float64)
    sx, sy, sz = field.geometry.spacing_mm
    du = np.stack([np.gradient(d, sx, axis=2), np.gradient(d, sy, axis=1), np.gradient(d, sz, axis=0)], axis=-1)
    return np.linalg.det(np.eye(3) + du @ np.linalg.inv(field.geometry.direction_matrix))


@pytest.mark.parametrize("geometry", [oblique_geometry(), Geometry((28, 24, 40), (1.5, 1.5, 2.0), (0.0, 0.0, 0.0))])
def test_closed_form_jacobian_equals_numpy_det(geometry: Geometry) -> None:
    field = random_smooth_field(geometry)
    expected = reference_jacobian(field)
    got = jacobian_determinant(field, slab=7)  # slabs that do not divide the grid, halos included
    assert got.dtype == np.float32
    assert np.min(expected) < 0 < np.max(expected)  # folds and non-folds both tested
    # float32 arithmetic (the field's own type): within 1e-5 where these random fields' gradients reach several units
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_float_nifti_gz_holds_itks_own_bytes_and_reads_back(tmp_path: Path) -> None:
    field = random_smooth_field(oblique_geometry(), seed=1)
    write_field(field, tmp_path / "d.nii.gz")
    image = field.geometry.apply_to_sitk(sitk.GetImageFromArray(field.displacement_mm, isVector=True))
    sitk.WriteImage(image, str(tmp_path / "itk.nii"))  # ITK's own writer, uncompressed
    with gzip.open(tmp_path / "d.nii.gz", "rb") as f:  # a valid gzip stream of the NIfTI ITK writes
        assert f.read() == (tmp_path / "itk.nii").read_bytes()
    read = sitk.ReadImage(str(tmp_path / "d.nii.gz"))
    assert read.GetPixelID() == sitk.sitkVectorFloat32
    transform = sitk.DisplacementFieldTransform(sitk.Cast(read, sitk.sitkVectorFloat64))
    points = field.geometry.index_to_lps(np.random.default_rng(2).uniform(1, 20, size=(200, 3)))
    itk_points = np.array([transform.TransformPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(itk_points, transform_points(field, points), atol=1e-3)


def test_transform_h5_is_a_displacement_field_transform_with_the_same_points(tmp_path: Path) -> None:
    field = random_smooth_field(oblique_geometry(), seed=3)
    write_transform(field, tmp_path / "t.h5")
    transform = sitk.ReadTransform(str(tmp_path / "t.h5")).Downcast()
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0).Downcast()
    assert isinstance(transform, sitk.DisplacementFieldTransform)
    points = field.geometry.index_to_lps(np.random.default_rng(4).uniform(1, 20, size=(200, 3)))
    itk_points = np.array([transform.TransformPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(itk_points, transform_points(field, points), atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_write_image_round_trip_of_every_pixel_type(tmp_path: Path, dtype) -> None:
    array = (np.random.default_rng(5).normal(size=(9, 11, 13)) * 50).astype(dtype)
    image = Image(array, oblique_geometry((13, 11, 9)))
    write_image(image, tmp_path / "i.nii.gz")
    read = sitk.ReadImage(str(tmp_path / "i.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), array)
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_warp_image_float32_output_equals_the_float64_resample_cast() -> None:
    geometry = oblique_geometry()
    field = random_smooth_field(geometry, seed=6, amplitude_mm=2.0)
    moving = Image(np.random.default_rng(7).normal(size=geometry.shape_zyx).astype(np.float32), geometry)
    reference = sitk.Resample(
        moving.to_sitk(), geometry.reference_image(), field.to_sitk_transform(), sitk.sitkLinear,
        float(moving.array.min()), sitk.sitkFloat64,
    )  # fmt: skip
    expected = sitk.GetArrayFromImage(reference).astype(np.float32)
    np.testing.assert_array_equal(warp_image(moving, field).array, expected)


@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline"])
@pytest.mark.parametrize("slab", [1, 4, 9])
def test_warp_image_in_slabs_equals_the_whole_field_resample(interpolation: str, slab: int) -> None:
    geometry = oblique_geometry()
    field = random_smooth_field(geometry, seed=8, amplitude_mm=3.0)
    values = np.random.default_rng(9).normal(size=geometry.shape_zyx) * 100
    moving = Image(values.astype(np.int16 if interpolation == "nearest" else np.float32), geometry)
    whole = warp_image(moving, field, interpolation, slab=geometry.size[2])
    assert whole.array.dtype == moving.array.dtype
    np.testing.assert_array_equal(warp_image(moving, field, interpolation, slab=slab).array, whole.array)


def test_chunked_jacobian_statistics_equal_numpys_over_the_whole_grid(monkeypatch) -> None:
    from ImplicitKernelRegistrationLib.core import metrics

    geometry = oblique_geometry()
    field = random_smooth_field(geometry, seed=3, amplitude_mm=8.0)  # folds in places
    j = jacobian_determinant(field).astype(np.float64)
    mask = np.zeros(geometry.shape_zyx, dtype=bool)
    mask[3:-3, 4:-4, 2:-2] = True
    monkeypatch.setattr(metrics, "_CHUNK", 1000)  # many chunks
    for where in (None, mask):
        values = j.reshape(-1) if where is None else j[where]
        stats = metrics.sdlogj(field, where)
        assert stats["n_folding"] == np.count_nonzero(values <= 0) > 0
        assert stats["sdlogj"] == pytest.approx(np.std(np.log(values[values > 0])), rel=1e-12)
        assert stats["sdlogj_l2r"] == pytest.approx(np.std(np.log(np.clip(values + 3.0, 1e-9, 1e9))), rel=1e-12)
        assert stats["jacobian_min"] == pytest.approx(values.min(), rel=1e-6)


def test_click_factor_in_boxes_equals_the_whole_grid_evaluation() -> None:
    geometry = oblique_geometry((60, 50, 40), (1.0, 1.3, 1.9))
    centre = geometry.index_to_lps(np.array([[30.0, 25.0, 20.0]]))[0]
    pairs = np.array([centre, centre + [8.0, -5.0, 3.0], centre + [200.0, 0.0, 0.0], centre + [0.0, 0.0, -45.0]])
    full = _click_factor(pairs, geometry.grid_points_lps().reshape(-1, 3)).reshape(geometry.shape_zyx)
    got = _click_factor_on_grid(pairs, geometry)
    assert full.max() > 0.99
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-12)


def test_expected_error_map_with_clicks_equals_the_whole_grid_formula(phantom_case, phantom_registration) -> None:
    params = load_uncertainty_model()
    corr = phantom_registration.correspondences
    session = RefinementSession(phantom_registration.model, phantom_case.fixed.geometry, corr)
    session.add_correspondences(corr.fixed_lps[:2], corr.fixed_lps[:2] + corr.displacement_mm[:2], ["a", "b"])
    got = expected_error_map(session, params=params).array
    geometry = phantom_case.fixed.geometry
    w = _click_factor(session_pairs(session), geometry.grid_points_lps().reshape(-1, 3)).reshape(geometry.shape_zyx)
    assert w.max() > 0.9 and (w == 0).mean() > 0.5  # near the clicks and far from them both tested
    base = uncensored_map(session, params)
    np.testing.assert_array_equal(got, (base * (1.0 - w) + CLICK_ERROR_MM * w).astype(np.float32))


def session_pairs(session: RefinementSession) -> np.ndarray:
    """The clicked pairs' fixed points (U, 3)."""
    return np.array([p.fixed_lps for p in session.pairs]).reshape(-1, 3)


def uncensored_map(session: RefinementSession, params) -> np.ndarray:
    """The session's expected-error map before the click blend, computed on the whole grid at once."""
    from ImplicitKernelRegistrationLib.review.uncertainty import _control_geometry, control_features

    params = params.for_inputs(None)  # no moving image: the key-feature model, as expected_error_map(session)
    mu = params.log_error(control_features(session.model, len(session.pairs)))
    control = Image(mu.reshape(session.model.control_shape).astype(np.float32), _control_geometry(session.model))
    resampled = sitk.Resample(
        control.to_sitk(), session.target.reference_image(), sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkLinear, 0.0, sitk.sitkFloat32, True,
    )  # fmt: skip
    return params.expected_from_log(sitk.GetArrayFromImage(resampled).astype(np.float64))


def test_peak_memory_counts_children_that_ended() -> None:
    code = "x = b'\\x01' * (400 * 2**20); print(len(x))"  # 400 MB written, so resident
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    import torch

    own = peak_memory_mb(torch.device("cpu")) - resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    assert own > 0
    assert peak_memory_mb(torch.device("cpu")) >= own + 400.0


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process start from /proc (Linux)")
def test_process_elapsed_counts_from_the_process_start() -> None:
    code = (
        "import time; time.sleep(0.6); from ImplicitKernelRegistrationLib.review.report import process_elapsed_s;"
        " print(process_elapsed_s(time.time()))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert float(out) >= 0.6  # the fallback (seconds since the call) would give about 0
    assert process_elapsed_s(time.time()) > 0.0


def test_a_registration_too_large_for_memory_is_refused() -> None:
    huge = Geometry((512, 512, 600), (0.7, 0.7, 0.7), (0.0, 0.0, 0.0))
    assert estimate_peak_mb(huge, 0.1) > estimate_peak_mb(huge, 2.0) > estimate_peak_mb(oblique_geometry(), 2.0) > 0
    with pytest.raises(IkrError, match="--force-memory"):
        check_memory(huge, 0.1)  # 2.5e10 working voxels: more than any machine running this
    check_memory(oblique_geometry(), 2.0)  # a small one passes


def test_register_refuses_before_registering_and_force_memory_is_a_flag(capsys, tmp_path: Path) -> None:
    geometry = Geometry((48, 48, 48), (12.0, 12.0, 12.0), (0.0, 0.0, 0.0))  # 58 cm of body at 12 mm
    ct = np.full(geometry.shape_zyx, -1000, dtype=np.int16)
    ct[8:40, 8:40, 8:40] = 40
    write_image(Image(ct, geometry), tmp_path / "f.nii.gz")
    code = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "f.nii.gz"), "-o", str(tmp_path / "o"),
                 "--spacing", "0.1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "memory" in err and "--force-memory" in err
    assert not (tmp_path / "o").exists()
    from ImplicitKernelRegistrationLib.cli import build_parser

    args = build_parser().parse_args(["register", "a", "b", "-o", "c", "--force-memory"])
    assert args.force_memory is True


def test_report_carries_the_whole_commands_time_and_peak(capsys, tmp_path: Path, phantom_case) -> None:
    write_image(phantom_case.fixed, tmp_path / "f.nii.gz")
    write_image(phantom_case.moving, tmp_path / "m.nii.gz")
    code = main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "o"),
                 "--spacing", "4", "--kernel", "gaussian", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["command_s"] >= report["runtime_s"] > 0
    assert report["peak_memory_mb"] >= report["peak_memory_registration_mb"] > 0
    assert "whole command" in out
    assert read_image(tmp_path / "o" / "uncertainty.nii.gz").array.dtype == np.float32
