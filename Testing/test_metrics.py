"""Metrics against analytic answers: Jacobian, SDlogJ, folding, TRE, Dice, HD95, endpoint error."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field, jacobian_determinant
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.core.metrics import dice, endpoint_error, hd95, sdlogj, tre, tre_summary

IDENTITY = Geometry((20, 18, 14), (1.5, 2.0, 3.0), (-10.0, 5.0, 20.0))


def rotated() -> Geometry:
    """A rotated, flipped, anisotropic grid."""
    direction = Rotation.from_euler("xyz", [30, -20, 40], degrees=True).as_matrix() @ np.diag([1, -1, 1])
    return Geometry((20, 18, 14), (1.5, 2.0, 3.0), (-10.0, 5.0, 20.0), tuple(direction.ravel()))


def linear_field(g: Geometry, matrix: np.ndarray) -> Field:
    """The field of x -> A (x - c) + c, written on grid `g`."""
    p = g.grid_points_lps()
    c = np.array([3.0, -4.0, 25.0])
    d = (p - c) @ (np.asarray(matrix) - np.eye(3)).T
    return Field(d.astype(np.float32), g)


def translation(g: Geometry, t: tuple) -> Field:
    """A constant displacement field."""
    return Field(np.broadcast_to(np.asarray(t, np.float32), (*g.shape_zyx, 3)).copy(), g)


@pytest.mark.parametrize("g", [IDENTITY, rotated()], ids=["identity", "rotated"])
def test_translation_has_unit_jacobian_and_zero_sdlogj(g: Geometry) -> None:
    field = translation(g, (4.0, -2.5, 1.0))
    np.testing.assert_allclose(jacobian_determinant(field), 1.0, atol=1e-6)
    stats = sdlogj(field)
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-7)
    assert stats["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-7)
    assert stats["folding_percent"] == 0.0
    assert stats["n_voxels"] == np.prod(g.size)


@pytest.mark.parametrize("g", [IDENTITY, rotated()], ids=["identity", "rotated"])
def test_linear_maps_have_jacobian_det_a(g: Geometry) -> None:
    scaling = np.diag([1.2, 0.9, 1.1])
    np.testing.assert_allclose(jacobian_determinant(linear_field(g, scaling)), 1.2 * 0.9 * 1.1, atol=1e-4)
    general = np.array([[1.1, 0.2, -0.1], [0.05, 0.95, 0.15], [-0.1, 0.1, 1.05]])
    np.testing.assert_allclose(jacobian_determinant(linear_field(g, general)), np.linalg.det(general), atol=1e-4)


def test_sdlogj_of_two_scalings_and_the_mask() -> None:
    g = IDENTITY
    left = linear_field(g, np.diag([1.2, 1.0, 1.0])).displacement_mm
    right = linear_field(g, np.diag([0.8, 1.0, 1.0])).displacement_mm
    half = g.size[2] // 2
    d = np.concatenate([left[:half], right[half:]])  # J = 1.2 in one z half, 0.8 in the other
    field = Field(d, g)
    mask = np.zeros(g.shape_zyx, bool)
    mask[1 : half - 1] = True
    assert sdlogj(field, mask)["sdlogj"] == pytest.approx(0.0, abs=1e-5)
    interior = np.zeros(g.shape_zyx, bool)
    interior[: half - 1] = interior[half + 1 :] = True  # the two halves, without the seam
    # equally many voxels with log J = log 1.2 and log 0.8: the std is half their difference
    assert sdlogj(field, interior)["sdlogj"] == pytest.approx((np.log(1.2) - np.log(0.8)) / 2, rel=1e-3)


def test_folding_is_detected() -> None:
    g = Geometry((24, 24, 24), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    p = g.grid_points_lps() - 11.5
    bump = np.exp(-np.sum(p**2, axis=-1) / 30.0)
    d = np.zeros((*g.shape_zyx, 3), np.float32)
    d[..., 0] = -3.0 * p[..., 0] * bump  # dd_x/dx = -3 at the centre: J = -2
    stats = sdlogj(Field(d, g))
    assert jacobian_determinant(Field(d, g))[12, 12, 12] < 0
    assert 0.0 < stats["folding_percent"] < 10.0
    assert stats["n_folding"] > 0 and stats["jacobian_min"] < 0
    assert np.isfinite(stats["sdlogj"]) and stats["sdlogj"] > 0


def test_tre_equals_the_residual_translation() -> None:
    g = rotated()
    field = translation(g, (4.0, -2.5, 1.0))
    rng = np.random.default_rng(3)
    fixed = g.index_to_lps(rng.uniform(0, 1, (50, 3)) * (np.asarray(g.size) - 1))
    residual = np.array([0.6, -0.8, 0.0])  # |r| = 1 mm
    out = tre(fixed, fixed + np.array([4.0, -2.5, 1.0]) + residual, field)
    assert out["n"] == 50
    for key in ("mean", "p50", "p90", "max"):
        assert out[key] == pytest.approx(1.0, abs=1e-5)
    assert out["sd"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(IkrError):
        tre(fixed, fixed[:3], field)


def test_tre_summary_statistics() -> None:
    out = tre_summary(np.arange(1, 11, dtype=float))
    assert out == pytest.approx(
        {"mean": 5.5, "sd": np.std(np.arange(1, 11)), "p50": 5.5, "p90": 9.1, "max": 10, "n": 10}
    )
    assert tre_summary(np.empty(0))["n"] == 0


def test_dice_identical_disjoint_and_half() -> None:
    a = np.zeros((10, 10, 10), np.uint8)
    a[2:6, 2:6, 2:6] = 1
    b = np.zeros_like(a)
    b[7:9, 7:9, 7:9] = 1
    c = np.zeros_like(a)
    c[4:8, 2:6, 2:6] = 1  # overlaps a in half its voxels
    assert dice(a, a) == {1: 1.0}
    assert dice(a, b) == {1: 0.0}
    assert dice(a, c)[1] == pytest.approx(0.5)
    two = a.copy()
    two[7:9, 7:9, 7:9] = 2
    assert dice(two, two) == {1: 1.0, 2: 1.0}
    assert np.isnan(dice(a, a, labels=[3])[3])


def test_hd95_of_concentric_spheres() -> None:
    spacing = (0.8, 0.9, 1.2)
    g = Geometry((80, 72, 54), spacing, (-31.6, -31.95, -31.8))
    r = np.linalg.norm(g.grid_points_lps(), axis=-1)
    inner, outer = Image((r <= 10.0).astype(np.uint8), g), Image((r <= 13.0).astype(np.uint8), g)
    assert hd95(inner, outer) == pytest.approx(3.0, abs=max(spacing))
    assert hd95(inner.array, outer.array, spacing) == hd95(inner, outer, g)
    assert hd95(inner, inner) == 0.0
    assert hd95(inner.array, np.zeros_like(inner.array), spacing) == float("inf")


def test_endpoint_error_against_true_field() -> None:
    g = rotated()
    true = linear_field(g, np.diag([1.1, 0.95, 1.0]))
    shifted = Field(true.displacement_mm + np.array([0.0, 0.3, 0.4], np.float32), g)
    out = endpoint_error(shifted, true)
    assert out["mean"] == pytest.approx(0.5, abs=1e-4)
    assert out["max"] == pytest.approx(0.5, abs=1e-4)
    assert out["n"] == np.prod(g.size)
    mask = np.zeros(g.shape_zyx, bool)
    mask[2:5] = True
    assert endpoint_error(true, true, mask)["max"] == 0.0
