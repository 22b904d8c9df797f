"""The benchmark's independent evaluation generator and clinical cases (bench/) on the project's phantom."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ImplicitKernelRegistrationLib.core.fields import Field, jacobian_determinant, transform_points, warp_image
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
from ImplicitKernelRegistrationLib.synthetic.synth import read_case

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from clinical_cases import Clinical, make_clinical_case  # noqa: E402
from eval_generator import (  # noqa: E402
    KINDS,
    draw_deformation,
    draw_velocity,
    exponentiate,
    make_eval_case,
    write_eval_case,
)


@pytest.fixture(scope="module")
def smooth_phantom():
    """The phantom (4 mm, whole body in view) smoothed by one voxel, so that interpolation barely changes it."""
    ct, _, _ = make_phantom(seed=3, size=(80, 70, 60), spacing_mm=(4.0, 4.0, 4.0))
    return ct.with_array(ndimage.gaussian_filter(ct.array.astype(np.float32), 1.0))


@pytest.fixture(scope="module")
def clean_case(smooth_phantom):
    """A 'mixed' case without the intensity model (noise, gamma, bias) on the smoothed phantom."""
    return make_eval_case(smooth_phantom, "mixed", seed=1, intensity=False)


def _mapped_inside(case, erosion: int = 2) -> np.ndarray:
    """Fixed body voxels whose true moving point lies two voxels inside the image."""
    geometry = case.true_field.geometry
    body = ndimage.binary_erosion(body_mask(case.fixed), iterations=erosion)
    mapped = (geometry.grid_points_lps() + case.true_field.displacement_mm).reshape(-1, 3)
    return body & geometry.contains_lps(mapped, margin_voxels=-2.0).reshape(body.shape)


def test_landmark_pairs_follow_the_true_field(clean_case) -> None:
    """Every moving landmark is its fixed landmark moved by the true field; up to 100, spread, in the body."""
    fixed, moving = clean_case.landmarks_fixed_lps, clean_case.landmarks_moving_lps
    assert 20 <= len(fixed) <= 100 and fixed.shape == moving.shape
    np.testing.assert_allclose(transform_points(clean_case.true_field, fixed), moving, atol=1e-6)
    index = np.rint(clean_case.fixed.geometry.lps_to_index(fixed)[:, ::-1]).astype(int)
    assert body_mask(clean_case.fixed)[tuple(index.T)].all()
    distances = np.linalg.norm(fixed[:, None] - fixed[None], axis=-1) + np.eye(len(fixed)) * 1e9
    assert distances.min() > 5.0  # farthest-point sampling spreads them out
    assert np.linalg.norm(moving - fixed, axis=1).mean() > 0.5  # they moved


def test_moving_is_the_fixed_image_warped_by_the_true_field(clean_case) -> None:
    """Warping the moving image back with the true field reproduces the fixed image; wrong fields do not."""
    inside = _mapped_inside(clean_case)
    fixed = clean_case.fixed.array.astype(np.float32)

    def error(field: Field) -> float:
        warped = warp_image(clean_case.moving, field, "bspline").array
        return float(np.median(np.abs(warped - fixed)[inside]))

    true_error = error(clean_case.true_field)
    half = Field(0.5 * clean_case.true_field.displacement_mm, clean_case.true_field.geometry)
    assert true_error < 3.0  # HU, interpolation only
    assert error(half) > 2.0 * true_error
    assert error(Field.identity(clean_case.true_field.geometry)) > 3.0 * true_error


def test_true_field_is_diffeomorphic_and_its_inverse_consistent(clean_case) -> None:
    """No folding anywhere, and exp(-v) inverts exp(v) to a small fraction of a millimetre inside the body."""
    assert float(jacobian_determinant(clean_case.true_field).min()) > 0.0
    assert clean_case.params["min_jacobian_working"] > 0.0
    assert clean_case.params["inverse_residual_mean_mm"] < 0.05
    assert clean_case.params["inverse_residual_max_mm"] < 0.5


def test_scaling_and_squaring_of_a_constant_velocity_is_a_translation(clean_case) -> None:
    """exp of a constant velocity is the same translation (a check of the integration itself)."""
    geometry = clean_case.true_field.geometry
    velocity = Field(np.broadcast_to(np.float32([1.5, -2.0, 0.5]), (*geometry.shape_zyx, 3)).copy(), geometry)
    np.testing.assert_allclose(exponentiate(velocity).displacement_mm, velocity.displacement_mm, atol=1e-4)


def test_every_kind_draws_a_smooth_velocity(smooth_phantom) -> None:
    """Each kind's velocity is finite, moves the body, and is seeded (same seed, same field)."""
    for kind in KINDS:
        velocity, params = draw_velocity(smooth_phantom, kind, np.random.default_rng(5))
        again, _ = draw_velocity(smooth_phantom, kind, np.random.default_rng(5))
        np.testing.assert_array_equal(velocity.displacement_mm, again.displacement_mm)
        norm = np.linalg.norm(velocity.displacement_mm, axis=-1)
        assert np.isfinite(norm).all() and 0.3 < norm.max() < 40.0
        assert params


def test_realistic_case_writes_files_the_bench_reads(smooth_phantom, tmp_path: Path) -> None:
    """With the intensity model: int16 images, gamma/bias/noise recorded, seeded, and the files read back."""
    case = make_eval_case(smooth_phantom, "local", seed=0)
    again = make_eval_case(smooth_phantom, "local", seed=0)
    np.testing.assert_array_equal(case.moving.array, again.moving.array)
    assert case.moving.array.dtype == np.int16
    assert set(case.params["intensity_params"]) >= {"gamma", "bias_coefficients", "noise_sigma_moving_hu"}
    assert float(jacobian_determinant(case.true_field).min()) > 0.0
    folder = write_eval_case(case, tmp_path / "case")
    names = {p.name for p in folder.iterdir()}
    assert {"fixed.nii.gz", "moving.nii.gz", "true_displacement.nii.gz", "case.json"} <= names
    assert {"landmarks_fixed.csv", "landmarks_moving.csv"} <= names
    back = read_case(folder)
    np.testing.assert_allclose(back.landmarks_moving_lps, case.landmarks_moving_lps, atol=1e-9)
    np.testing.assert_allclose(back.true_field.displacement_mm, case.true_field.displacement_mm, atol=1e-5)
    assert back.params["kind"] == "local"


@pytest.fixture(scope="module")
def clinical_case(smooth_phantom):
    """A repositioned (15 deg, 40 mm), cut (60 %), resampled (3 x 3 x 6 mm), contrast-changed case with an ablation."""
    clinical = Clinical(15.0, 40.0, (3.0, 3.0, 6.0), 0.6, contrast=True, ablation=True)
    return make_clinical_case(smooth_phantom, "breathing", 2, clinical)


def test_clinical_true_field_includes_the_rigid_motion(smooth_phantom, clinical_case) -> None:
    """T(x) = R(x + d(x)): the true field is the generator's exp(v) followed by the recorded rigid motion."""
    params = clinical_case.params["clinical"]
    matrix = np.asarray(params["rigid_matrix"]).reshape(3, 3)
    centre, shift = np.asarray(params["rigid_centre_lps"]), np.asarray(params["rigid_translation_mm"])
    assert np.isclose(np.degrees(np.arccos((np.trace(matrix) - 1) / 2)), 15.0)
    assert np.isclose(np.linalg.norm(shift), 40.0)
    forward = draw_deformation(smooth_phantom, "breathing", 2).forward
    points = clinical_case.landmarks_fixed_lps
    deformed = transform_points(forward, points)
    expected = (deformed - centre) @ matrix.T + centre + shift
    np.testing.assert_allclose(transform_points(clinical_case.true_field, points), expected, atol=1e-3)
    assert float(jacobian_determinant(clinical_case.true_field).min()) > 0.0


def test_clinical_moving_scan_has_its_own_cut_grid_and_landmarks_where_it_has_data(clinical_case) -> None:
    """The moving grid has the asked spacing and 60 % of the z extent; every moving landmark lies inside it."""
    geometry, fixed_geometry = clinical_case.moving.geometry, clinical_case.fixed.geometry
    assert geometry.spacing_mm == (3.0, 3.0, 6.0)
    moving_z = (geometry.size[2] - 1) * 6.0
    assert moving_z < 0.75 * (fixed_geometry.size[2] - 1) * fixed_geometry.spacing_mm[2]
    moving = clinical_case.landmarks_moving_lps
    assert len(moving) >= 10
    assert geometry.contains_lps(moving, margin_voxels=-1.0).all()
    np.testing.assert_allclose(transform_points(clinical_case.true_field, clinical_case.landmarks_fixed_lps), moving)
    ablation = clinical_case.params["intensity_params"]["ablation"]
    far = np.linalg.norm(moving - np.asarray(ablation["centre_lps"]), axis=1)
    assert far.min() > min(ablation["semi_axes_mm"])


def test_clinical_moving_image_shows_the_anatomy_where_the_true_field_says(clinical_case) -> None:
    """Smoothed HU at landmark pairs agree far better than at mismatched pairs (contrast and noise aside)."""

    def smoothed_at(image, points: np.ndarray) -> np.ndarray:
        smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image.to_sitk(), sitk.sitkFloat32), 4.0)
        return np.array([smooth.EvaluateAtPhysicalPoint([float(v) for v in p], sitk.sitkLinear) for p in points])

    fixed_hu = smoothed_at(clinical_case.fixed, clinical_case.landmarks_fixed_lps)
    moving_hu = smoothed_at(clinical_case.moving, clinical_case.landmarks_moving_lps)
    matched = np.median(np.abs(fixed_hu - moving_hu))
    shuffled = np.median(np.abs(fixed_hu - np.roll(moving_hu, len(moving_hu) // 2)))
    assert matched < 0.3 * shuffled


def test_sliding_moves_the_lungs_along_a_still_chest_wall(smooth_phantom) -> None:
    """Inside the lungs near their side walls the motion is large and craniocaudal; just outside it is small
    (a tangential jump at the pleura); landmarks lie near the pleura on both sides and are listed."""
    from eval_generator import anatomy, generator_lungs, signed_distance_mm

    case = make_eval_case(smooth_phantom, "sliding", seed=0, intensity=False)
    deformation = draw_deformation(smooth_phantom, "sliding", 0)
    a = anatomy(smooth_phantom)
    signed = signed_distance_mm(generator_lungs(a), a.geometry.spacing_mm[0])
    gradient = np.stack(np.gradient(ndimage.gaussian_filter(signed, 1.0)), axis=-1)  # z, y, x
    side_wall = np.abs(gradient[..., 0]) < 0.3 * np.linalg.norm(gradient, axis=-1)  # boundary normal not along z
    dz = np.abs(deformation.forward.displacement_mm[..., 2])
    inside = side_wall & (signed > 2.0) & (signed < 9.0)
    outside = side_wall & (signed < -2.0) & (signed > -9.0) & a.body
    assert dz[inside].mean() > 3.0 * dz[outside].mean()
    assert deformation.params["min_jacobian_working"] > 0.0
    near = case.params["pleura_landmarks"]
    sides = case.params["pleura_side"]
    assert len(near) == len(sides) and {"lung", "wall"} <= set(sides)
    assert max(near) < len(case.landmarks_fixed_lps)
    np.testing.assert_allclose(
        transform_points(case.true_field, case.landmarks_fixed_lps), case.landmarks_moving_lps, atol=1e-6
    )


def test_sliding_needs_lungs(smooth_phantom) -> None:
    """Without lungs in view the sliding kind refuses with a clear error."""
    from ImplicitKernelRegistrationLib.core.errors import IkrError

    body = body_mask(smooth_phantom)
    solid = smooth_phantom.with_array(np.where(body & (smooth_phantom.array < -300), 40.0, smooth_phantom.array))
    with pytest.raises(IkrError, match="needs lungs"):
        draw_velocity(solid, "sliding", np.random.default_rng(0))


def test_truth_row_scores_the_true_field(clean_case) -> None:
    """The bench's 'truth' row: the true field's own TRE (zero: the landmarks follow it) and its SDlogJ in the body."""
    from types import SimpleNamespace

    from run import truth_row

    from ImplicitKernelRegistrationLib.core.metrics import sdlogj

    spec = SimpleNamespace(name="clean", set="independent", unseen="generator")
    row = truth_row(spec, clean_case)
    assert row["method"] == "truth" and row["status"] == "ok" and row["case"] == "clean"
    assert row["tre"]["mean"] < 1e-3
    expected = sdlogj(clean_case.true_field, body_mask(clean_case.fixed))["sdlogj"]
    assert row["jacobian"]["sdlogj"] == pytest.approx(expected) and expected > 0.01
