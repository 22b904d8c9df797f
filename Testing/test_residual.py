"""The residual fitted to the images: lowers the dissimilarity, is additive, stays in place under refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ImplicitKernelRegistrationLib.core.fields import transform_points
from ImplicitKernelRegistrationLib.core.geometry import mm_to_voxels
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.refine import open_session, session_from_result
from ImplicitKernelRegistrationLib.registration.residual import (
    ResidualSettings,
    diffusion,
    grid_points,
    residual_shape,
    sample_grid,
    sample_points,
    smooth,
)


@pytest.fixture(scope="module")
def liver_pair(liver_case):
    """The liver case registered at 3 mm with the residual off and on (the default; same settings otherwise)."""
    # no alignment: the residual's mechanics alone (SimpleITK's threads may vary the alignment in the last bits)
    off = register(
        liver_case.fixed, liver_case.moving, RegistrationConfig(spacing_mm=3.0, alignment="none", residual_iterations=0)
    )
    on = register(liver_case.fixed, liver_case.moving, RegistrationConfig(spacing_mm=3.0, alignment="none"))
    assert RegistrationConfig().residual_iterations > 0
    return off, on


def test_grid_helpers_agree():
    working = (9, 11, 13)
    shape = residual_shape(working, 2)
    assert shape == (5, 6, 7)
    nodes = grid_points(shape, working)
    grid = torch.randn(1, 3, *shape)
    assert torch.allclose(sample_grid(grid, nodes, working), grid.reshape(3, -1).t(), atol=1e-5)
    constant = torch.ones(1, 3, *shape)
    assert torch.allclose(smooth(constant), constant)
    assert float(diffusion(constant, 2.0)) == 0.0


def test_sample_points_are_mask_voxels_and_seeded():
    mask = torch.zeros(1, 1, 6, 7, 8, dtype=torch.bool)
    mask[0, 0, 1:4, 2:5, 3:7] = True
    points = sample_points(mask, 20, seed=1)
    assert points.shape == (20, 3)
    x, y, z = points.long().t()
    assert bool(mask[0, 0, z, y, x].all())
    assert torch.equal(points, sample_points(mask, 20, seed=1))
    assert sample_points(mask, 1000, seed=1).shape[0] == int(mask.sum())


def test_residual_lowers_dissimilarity_and_tre_on_real_ct(liver_case, liver_pair):
    off, on = liver_pair
    summary = on.report["residual"]
    assert off.report["residual"] is None
    assert summary["dissimilarity_after"] < 0.95 * summary["dissimilarity_before"]
    p, q = liver_case.landmarks_fixed_lps, liver_case.landmarks_moving_lps
    tre = [np.linalg.norm(transform_points(r.field, p) - q, axis=1) for r in (off, on)]
    assert tre[1].mean() < tre[0].mean()


def test_setting_off_reproduces_the_kernel_field(liver_case, liver_pair):
    off, on = liver_pair
    assert off.model.residual is None
    assert on.model.residual is not None
    # the residual is purely additive: the same keys give the same kernel field, with or without it
    assert torch.equal(off.model.values, on.model.values)
    residual = on.model.residual
    try:
        on.model.residual = None
        kernel_only = on.model.field_on(liver_case.fixed.geometry)
    finally:
        on.model.residual = residual
    assert np.array_equal(kernel_only.displacement_mm, off.field.displacement_mm)
    assert not np.allclose(on.field.displacement_mm, off.field.displacement_mm, atol=1e-3)


def test_refinement_leaves_the_residual_in_place_and_is_exact(liver_case, liver_pair):
    _, on = liver_pair
    session = session_from_result(on, liver_case.fixed)
    assert np.array_equal(session.field.displacement_mm, on.field.displacement_mm)
    residual = on.model.residual.clone()
    start = session.field.displacement_mm.copy()
    p = liver_case.landmarks_fixed_lps[:3]
    q = liver_case.landmarks_moving_lps[:3] + np.array([1.5, -1.0, 2.0])
    session.add_correspondences(p, q)
    assert torch.equal(session.model.residual, residual)
    assert np.abs(transform_points(session.field, p) - q).max() < 1e-3
    # the user keys carry (q - p) minus the residual at p (working voxels)
    working = session.model.working
    user_disp = session.model.disp[-3:].cpu().numpy()
    residual = session.model.residual_at(torch.tensor(working.lps_to_index(p), dtype=torch.float32)).cpu().numpy()
    assert np.allclose(user_disp + residual, mm_to_voxels(q - p, working), atol=1e-4)
    for _ in range(3):
        session.undo()
    assert np.array_equal(session.field.displacement_mm, start)


def test_reopened_session_refits_the_same_residual(liver_case, liver_pair):
    _, on = liver_pair
    saved = {"config": on.report["config"], "working_geometry": on.working_geometry.to_dict()}
    reopened = open_session(liver_case.fixed, saved, on.correspondences, liver_case.moving)
    assert reopened.model.residual is not None
    assert np.abs(reopened.field.displacement_mm - on.field.displacement_mm).max() < 0.05


def test_residual_settings_follow_the_config():
    config = RegistrationConfig(residual_iterations=7, residual_step_vox=3, residual_robust=0.5)
    assert config.residual_settings() == ResidualSettings(
        7, 3, config.residual_learning_rate, config.residual_smoothness, config.residual_points, 0.5
    )
    assert RegistrationConfig.from_dict(config.to_dict()) == config
