"""Synthetic registration cases: exact truth, invertible fields, documented magnitudes, IO round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import jacobian_determinant, transform_points, warp_image
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
from ImplicitKernelRegistrationLib.synthetic.synth import FAMILIES, SynthCase, make_case, read_case, write_case

LUNG_LABELS = (2, 3, 8)


def _smoothed(image: Image) -> Image:
    """A float copy blurred by one voxel, so that interpolation itself adds little error."""
    return image.with_array(ndimage.gaussian_filter(image.array.astype(np.float32), 1.0))


def _sample(image: Image, points_lps: np.ndarray) -> np.ndarray:
    """Image values at LPS points (trilinear)."""
    idx = image.geometry.lps_to_index(points_lps)
    return ndimage.map_coordinates(image.array.astype(np.float32), idx[:, ::-1].T, order=1)


@pytest.fixture(scope="module")
def phantom() -> tuple[Image, Image]:
    """A coarse phantom (5 mm) with its label map; small enough for quick cases."""
    ct, labels, _ = make_phantom(0, size=(64, 56, 48), spacing_mm=(5.0, 5.0, 5.0))
    return ct, labels


@pytest.fixture(scope="module")
def liver_ct() -> Image:
    """The real 3 mm upper-abdominal slab (lung bases, liver)."""
    return Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))))


@pytest.fixture(scope="module")
def exact_cases(phantom: tuple) -> tuple[Image, dict]:
    """Per family: the smoothed phantom and a noise-free case with a rigid offset and no intensity change."""
    ct, labels = phantom
    smooth = _smoothed(ct)
    cases = {f: make_case(smooth, f, 7, labels=labels, noise_hu=0.0, intensity_change=False) for f in FAMILIES}
    return smooth, cases


def _check_exact(ct: Image, case: SynthCase, max_after_hu: float) -> None:
    """warp(moving, true) reproduces the fixed image; landmark pairs agree with the field and the anatomy."""
    field = case.true_field
    assert field.geometry == ct.geometry and case.moving.geometry == ct.geometry
    assert float(jacobian_determinant(field).min()) > 0.0
    assert case.params["inverse_residual_max_mm"] < 0.1
    assert case.params["inverse_residual_working_mm"] < 0.01

    warped = warp_image(case.moving, field).array
    preimage = ct.geometry.grid_points_lps() + field.displacement_mm
    inside = ct.geometry.contains_lps(preimage.reshape(-1, 3), margin_voxels=-2).reshape(warped.shape)
    body = ndimage.binary_erosion(ct.array > -500, iterations=2) & inside
    after = float(np.abs(warped - ct.array)[body].mean())
    before = float(np.abs(case.moving.array - ct.array)[body].mean())
    assert after < max_after_hu, (after, before)
    assert after < 0.5 * before, (after, before)

    fixed_lm, moving_lm = case.landmarks_fixed_lps, case.landmarks_moving_lps
    assert fixed_lm.shape == moving_lm.shape and len(fixed_lm) >= 30
    np.testing.assert_allclose(transform_points(field, fixed_lm), moving_lm, atol=1e-9)
    assert np.all(ct.geometry.contains_lps(fixed_lm, margin_voxels=-2))
    assert np.all(ct.geometry.contains_lps(moving_lm, margin_voxels=-1))
    assert cKDTree(fixed_lm).query(fixed_lm, k=2)[0][:, 1].min() >= 10.0 - 1e-6
    at_fixed, at_moving = _sample(ct, fixed_lm), _sample(case.moving, moving_lm)
    same = np.median(np.abs(at_fixed - at_moving))
    shuffled = np.median(np.abs(at_fixed - np.roll(at_moving, 5)))
    assert same < 0.15 * shuffled, (same, shuffled)


@pytest.mark.parametrize("family", FAMILIES)
def test_phantom_case_is_exact(exact_cases: tuple, family: str) -> None:
    """Each family on the phantom: exact warp, invertible field, consistent landmarks, small rigid part."""
    smooth, cases = exact_cases
    _check_exact(smooth, cases[family], max_after_hu=8.0)
    assert cases[family].params["rigid_params"]["angle_deg"] <= 2.0
    assert np.linalg.norm(cases[family].params["rigid_params"]["translation_mm"]) <= 3.0


@pytest.mark.parametrize("family", FAMILIES)
def test_real_ct_case_is_exact(liver_ct: Image, family: str) -> None:
    """Each family on a real 3 mm CT: the same exactness checks."""
    smooth = _smoothed(liver_ct)
    _check_exact(smooth, make_case(smooth, family, 3, noise_hu=0.0, intensity_change=False), max_after_hu=4.0)


def test_moving_labels_follow_the_anatomy(exact_cases: tuple, phantom: tuple) -> None:
    """Moving labels warped back by the true field match the fixed labels."""
    _, labels = phantom
    case = exact_cases[1]["breathing"]
    back = warp_image(case.moving_labels, case.true_field, interpolation="nearest", default_value=0).array
    lungs, lungs_back = np.isin(labels.array, LUNG_LABELS), np.isin(back, LUNG_LABELS)
    dice = 2.0 * np.sum(lungs & lungs_back) / (lungs.sum() + lungs_back.sum())
    moved = np.isin(case.moving_labels.array, LUNG_LABELS)
    assert dice > 0.95
    assert 2.0 * np.sum(lungs & moved) / (lungs.sum() + moved.sum()) < dice  # they did move


@pytest.fixture(scope="module")
def deformations(phantom: tuple) -> dict:
    """Per family: a case without rigid offset, to measure the deformation itself."""
    ct, labels = phantom
    return {f: make_case(ct, f, 11, labels=labels, noise_hu=0.0, rigid=False, intensity_change=False) for f in FAMILIES}


def _norm(case: SynthCase) -> np.ndarray:
    """Displacement length (mm) of a case's true field."""
    return np.linalg.norm(case.true_field.displacement_mm, axis=-1)


def test_breathing_magnitude_and_shape(deformations: dict, phantom: tuple) -> None:
    """Breathing: 4-15 mm mean in the lungs, cranio-caudal, larger at the bases, small outside."""
    ct, labels = phantom
    d = deformations["breathing"].true_field.displacement_mm
    norm = np.linalg.norm(d, axis=-1)
    lungs = np.isin(labels.array, LUNG_LABELS)
    assert 4.0 <= norm[lungs].mean() <= 15.0
    assert norm.max() <= 35.0
    assert np.abs(d[..., 2])[lungs].mean() > 2.0 * np.abs(d[..., 1])[lungs].mean()  # cranio-caudal dominant
    assert np.abs(d[..., 2])[lungs].mean() > 2.0 * np.abs(d[..., 0])[lungs].mean()
    z = ct.geometry.grid_points_lps()[..., 2]
    low, high = np.percentile(z[lungs], [20, 80])
    assert norm[lungs & (z < low)].mean() > 1.5 * norm[lungs & (z > high)].mean()  # bases move more than apex
    assert norm[labels.array == 0].mean() < 0.5 * norm[lungs].mean()  # little outside the body
    assert np.mean(d[..., 2][lungs] < 0) > 0.95  # the lungs move inferiorly


def test_bspline_magnitude(deformations: dict, phantom: tuple) -> None:
    """B-spline: mean magnitude in the body within 3-8 mm, control spacing 35-50 mm."""
    _, labels = phantom
    case = deformations["bspline"]
    mean = _norm(case)[labels.array > 0].mean()
    assert 2.7 <= mean <= 8.5
    assert 35.0 <= case.params["family_params"]["control_spacing_mm"] <= 50.0


def test_local_volume_change(deformations: dict, phantom: tuple) -> None:
    """Local: the ball's volume changes by the recorded 10-40 %, and the motion stays local."""
    ct, _ = phantom
    case = deformations["local"]
    p = case.params["family_params"]
    assert 15.0 <= p["radius_mm"] <= 30.0 and 0.1 <= abs(p["volume_change"]) <= 0.4
    assert 0.5 <= p["surface_displacement_mm"] <= 5.0
    r = np.linalg.norm(ct.geometry.grid_points_lps() - np.asarray(p["centre_lps"]), axis=-1)
    jac = jacobian_determinant(case.true_field)
    assert abs(float(jac[r < 0.8 * p["radius_mm"]].mean()) - (1.0 + p["volume_change"])) < 0.06
    assert _norm(case)[r > 5.0 * p["radius_mm"]].mean() < 2.0  # confined: only the mild background far away


def test_sliding_lungs_move_chest_wall_stays(deformations: dict, phantom: tuple) -> None:
    """Sliding: lateral lungs move several mm while the body wall beside them stays."""
    ct, labels = phantom
    case = deformations["sliding"]
    norm = _norm(case)
    x = np.abs(ct.geometry.grid_points_lps()[..., 0])
    lungs = np.isin(labels.array, LUNG_LABELS)
    assert 4.0 <= norm[lungs].mean() <= 15.0
    z = ct.geometry.grid_points_lps()[..., 2]
    zlo, zhi = np.percentile(z[lungs], [5, 60])
    band = (z > zlo) & (z < zhi)
    wall = (labels.array == 1) & (x > 128.0) & band
    lateral_lung = lungs & (x > 95.0) & band
    assert norm[wall].mean() < 0.5
    assert norm[lateral_lung].mean() > 3.0


def test_sliding_finds_lungs_without_labels(phantom: tuple) -> None:
    """Without labels the lungs come from the threshold and the field stays invertible."""
    ct, _ = phantom
    case = make_case(ct, "sliding", 2, noise_hu=0.0, n_landmarks=10)
    assert case.params["family_params"]["sliding_region"] == "lung_columns"
    assert float(jacobian_determinant(case.true_field).min()) > 0.0


def test_abdomen_breathing_case(shared: Callable) -> None:
    """The real abdomen CT gives an invertible case with all landmarks and the CT's dtype."""
    ct = Image.from_sitk(sitk.ReadImage(str(shared("ct", "abdomen_ts_example_ct_3mm.nii.gz"))))
    case = make_case(ct, "breathing", 0, n_landmarks=50)
    assert float(jacobian_determinant(case.true_field).min()) > 0.0
    assert len(case.landmarks_fixed_lps) == 50
    assert case.fixed.array.dtype == ct.array.dtype == case.moving.array.dtype


def test_seed_reproduces_case(liver_ct: Image) -> None:
    """The same seed reproduces a case exactly; another seed changes the field."""
    a = make_case(liver_ct, "bspline", 5, n_landmarks=20)
    b = make_case(liver_ct, "bspline", 5, n_landmarks=20)
    np.testing.assert_array_equal(a.fixed.array, b.fixed.array)
    np.testing.assert_array_equal(a.moving.array, b.moving.array)
    np.testing.assert_array_equal(a.true_field.displacement_mm, b.true_field.displacement_mm)
    np.testing.assert_array_equal(a.landmarks_fixed_lps, b.landmarks_fixed_lps)
    assert a.params == b.params
    c = make_case(liver_ct, "bspline", 6, n_landmarks=20)
    assert np.abs(a.true_field.displacement_mm - c.true_field.displacement_mm).mean() > 1.0


def test_noise_and_intensity_change_only_in_images(phantom: tuple) -> None:
    """Noise and intensity change alter the images only, not the field; ablation zone darker."""
    ct, labels = phantom
    plain = make_case(ct, "local", 4, labels=labels, noise_hu=0.0, intensity_change=False)
    full = make_case(ct, "local", 4, labels=labels, noise_hu=12.0, intensity_change=True)
    np.testing.assert_array_equal(plain.true_field.displacement_mm, full.true_field.displacement_mm)
    noise = full.fixed.array.astype(np.float64) - ct.array
    assert 9.0 < noise.std() < 15.0
    p = full.params["intensity_params"]
    centre, radius = np.asarray(p["ablation_centre_lps"]), p["ablation_radius_mm"]
    r = np.linalg.norm(ct.geometry.grid_points_lps() - centre, axis=-1)
    change = full.moving.array.astype(np.float64) - plain.moving.array
    assert change[r < 0.7 * radius].mean() < -20.0  # the ablation-like zone is hypodense
    assert abs(change[(r > radius + 10.0) & (ct.array > -500)].mean()) < 15.0
    assert json.loads(json.dumps(full.params)) == full.params


def test_write_read_round_trip(tmp_path: Path, exact_cases: tuple, phantom: tuple) -> None:
    """write_case/read_case round-trip every array, point and parameter; rewriting replaces whole."""
    case = exact_cases[1]["local"]
    out = tmp_path / "case"
    write_case(case, out)
    names = {p.name for p in out.iterdir()}
    assert names == {
        "fixed.nii.gz",
        "moving.nii.gz",
        "true_displacement.nii.gz",
        "landmarks_fixed.csv",
        "landmarks_moving.csv",
        "fixed_labels.nii.gz",
        "moving_labels.nii.gz",
        "case.json",
    }
    assert (out / "landmarks_fixed.csv").read_text().splitlines()[0] == "x,y,z"
    back = read_case(out)
    np.testing.assert_array_equal(back.fixed.array, case.fixed.array)
    np.testing.assert_array_equal(back.moving.array, case.moving.array)
    np.testing.assert_array_equal(back.true_field.displacement_mm, case.true_field.displacement_mm)
    np.testing.assert_array_equal(back.landmarks_fixed_lps, case.landmarks_fixed_lps)
    np.testing.assert_array_equal(back.landmarks_moving_lps, case.landmarks_moving_lps)
    np.testing.assert_array_equal(back.moving_labels.array, case.moving_labels.array)
    assert back.fixed.geometry == case.fixed.geometry == back.true_field.geometry
    assert (back.family, back.seed, back.params) == (case.family, case.seed, case.params)
    write_case(exact_cases[1]["bspline"], out)  # replaces the directory whole
    assert read_case(out).family == "bspline"
    assert [p.name for p in tmp_path.iterdir()] == ["case"]  # no temporary leftovers


def test_bad_input_raises_ikr_error(tmp_path: Path, phantom: tuple) -> None:
    """Unknown family, labels on another grid and a missing case.json raise IkrError."""
    ct, labels = phantom
    with pytest.raises(IkrError, match="unknown deformation family"):
        make_case(ct, "twist", 0)
    small = Image(np.zeros((4, 4, 4), np.uint8), make_phantom(0, size=(4, 4, 4))[0].geometry)
    with pytest.raises(IkrError, match="label map"):
        make_case(ct, "bspline", 0, labels=small)
    with pytest.raises(IkrError, match="case.json"):
        read_case(tmp_path)
