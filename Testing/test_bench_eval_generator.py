"""The benchmark's independent evaluation generator (bench/eval_generator.py) on the project's phantom."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ImplicitKernelRegistrationLib.fields import Field, jacobian_determinant, transform_points, warp_image
from ImplicitKernelRegistrationLib.phantom import make_phantom
from ImplicitKernelRegistrationLib.preprocess import body_mask
from ImplicitKernelRegistrationLib.synth import read_case

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from eval_generator import KINDS, draw_velocity, exponentiate, make_eval_case, write_eval_case  # noqa: E402


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
