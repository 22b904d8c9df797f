"""Composition and inversion of displacement fields, and ITK-consistent point sampling."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ImplicitKernelRegistrationLib.core.fields import (
    Field,
    compose,
    field_from_transform,
    invert,
    transform_points,
)
from ImplicitKernelRegistrationLib.core.geometry import Geometry


def rotated_geometry() -> Geometry:
    """A rotated, flipped, anisotropic grid of about 46k voxels centred near the origin."""
    direction = Rotation.from_euler("xyz", [15, 25, -10], degrees=True).as_matrix() @ np.diag([1, 1, -1])
    size, spacing = (40, 36, 32), (2.0, 2.5, 3.0)
    half = direction @ ((np.asarray(size) - 1) * np.asarray(spacing) / 2)
    return Geometry(size, spacing, tuple(-half), tuple(direction.ravel()))


def smooth_field(g: Geometry, amplitude: float = 1.0) -> Field:
    """A smooth invertible field (|grad d| < 0.5 for amplitude 1)."""
    p = g.grid_points_lps()
    d = amplitude * np.stack(
        [5.0 * np.sin(p[..., 1] / 18.0), 4.0 * np.cos(p[..., 2] / 14.0), 3.0 * np.sin(p[..., 0] / 12.0)], -1
    )
    return Field(d.astype(np.float32), g)


def interior(g: Geometry, margin_mm: float) -> np.ndarray:
    """Voxels at least `margin_mm` from the grid's border (z, y, x)."""
    idx = g.lps_to_index(g.grid_points_lps().reshape(-1, 3))
    m = np.asarray(margin_mm) / np.asarray(g.spacing_mm)
    ok = np.all((idx >= m) & (idx <= np.asarray(g.size) - 1 - m), axis=-1)
    return ok.reshape(g.shape_zyx)


def translation(g: Geometry, t: tuple) -> Field:
    """A constant displacement field."""
    return Field(np.broadcast_to(np.asarray(t, np.float32), (*g.shape_zyx, 3)).copy(), g)


def test_inverse_of_translation_is_exactly_its_negative() -> None:
    g = rotated_geometry()
    inv, residual = invert(translation(g, (3.5, -2.0, 7.25)))
    np.testing.assert_array_equal(inv.displacement_mm, -translation(g, (3.5, -2.0, 7.25)).displacement_mm)
    assert residual == 0.0


def test_compose_with_inverse_is_identity_away_from_border() -> None:
    g = rotated_geometry()
    field = smooth_field(g)
    inv, residual = invert(field)
    assert residual < 0.01
    inner = interior(g, 12.0)  # more than the largest displacement
    # y -> y + v(y) -> x + d(x): exactly what the reported residual measures
    assert np.max(np.linalg.norm(compose(inv, field).displacement_mm[inner], axis=-1)) <= residual + 1e-4
    # x -> x + d(x) -> y + v(y): v is interpolated between voxels, so ~h^2 |v''| / 8 remains
    assert np.max(np.linalg.norm(compose(field, inv).displacement_mm[inner], axis=-1)) < 0.1
    assert np.max(np.linalg.norm(field.displacement_mm, axis=-1)) > 4.0


def test_invert_reports_a_large_residual_for_a_folding_field() -> None:
    g = rotated_geometry()
    _, good = invert(smooth_field(g))
    _, bad = invert(smooth_field(g, amplitude=6.0))  # |grad d| up to ~2.5: folds
    assert good < 0.01
    assert bad > 1.0


def test_compose_of_translations_adds_them() -> None:
    g = rotated_geometry()
    total = compose(translation(g, (1.0, 2.0, 3.0)), translation(g, (-4.0, 0.5, 2.0)))
    expected = translation(g, (-3.0, 2.5, 5.0))
    np.testing.assert_allclose(total.displacement_mm, expected.displacement_mm, atol=1e-6)


def test_compose_matches_itk_composite_transform() -> None:
    g = rotated_geometry()
    first = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.05, -0.04, 0.03, (1.0, -2.0, 0.5))
    second = sitk.AffineTransform(3)
    second.SetMatrix((1.03, 0.02, 0.0, -0.01, 0.98, 0.03, 0.02, 0.0, 1.01))
    second.SetTranslation((-1.0, 0.5, 2.0))
    total = compose(field_from_transform(first, g), field_from_transform(second, g))
    both = sitk.CompositeTransform([second, first])  # ITK applies the last added first
    pts = g.grid_points_lps().reshape(-1, 3)[interior(g, 10.0).reshape(-1)][::23]
    expected = np.array([both.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(transform_points(total, pts), expected, atol=1e-3)


def test_transform_points_follows_itk_at_the_border() -> None:
    g = rotated_geometry()
    field = smooth_field(g)
    itk = field.to_sitk_transform()
    size = np.asarray(g.size, dtype=float)
    idx = np.array([[-0.4, 3.0, 2.0], [size[0] - 0.6, 1.0, 1.0], [-0.7, 3.0, 2.0], [5.0, size[1] - 0.4, 4.0]])
    pts = g.index_to_lps(idx)
    expected = np.array([itk.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(transform_points(field, pts), expected, atol=1e-4)
