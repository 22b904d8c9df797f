"""The residual fitted to the images: lowers the dissimilarity, is additive, stays in place under refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ImplicitKernelRegistrationLib.core.fields import transform_points
from ImplicitKernelRegistrationLib.core.geometry import mm_to_voxels
from ImplicitKernelRegistrationLib.registration.adam import Adam
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.refine import open_session, session_from_result
from ImplicitKernelRegistrationLib.registration.residual import (
    ResidualSettings,
    apply_map,
    channels_last,
    diffusion,
    grid_points,
    point_sampling,
    residual_shape,
    sample_at,
    sample_grid,
    sample_points,
    sample_rows,
    smooth,
    sparse_map,
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


def test_smooth_is_two_replicate_padded_box_filters():
    grid = torch.randn(1, 3, 7, 5, 6, generator=torch.Generator().manual_seed(0))
    reference = grid
    for _ in range(2):
        reference = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(reference, (1,) * 6, mode="replicate"), 3, 1)
    assert torch.allclose(smooth(grid), reference, atol=1e-6)
    single = torch.randn(1, 3, 1, 4, 5)  # an axis of one node
    thick = single.expand(1, 3, 3, 4, 5).contiguous()
    assert torch.allclose(smooth(single)[:, :, 0], smooth(thick)[:, :, 1], atol=1e-6)


def test_sample_rows_values_and_gradient_match_grid_sample():
    """sample_rows (its gradient computed in the forward pass) against grid_sample with autograd, border clamped:
    values and gradients in the points, inside the volume and beyond its edges."""
    generator = torch.Generator().manual_seed(1)
    volume = torch.randn(1, 4, 6, 7, 9, generator=generator, dtype=torch.float64)
    points = torch.rand(500, 3, generator=generator, dtype=torch.float64) * torch.tensor([12.0, 10.0, 9.0]) - 1.5
    ours = points.clone().requires_grad_()
    theirs = points.clone().requires_grad_()
    value = sample_rows(channels_last(volume), (6, 7, 9), ours)
    weights = torch.randn(value.shape, generator=generator, dtype=torch.float64)
    (value * weights).sum().backward()
    coords = (2 * theirs / torch.tensor([8.0, 6.0, 5.0], dtype=torch.float64) - 1).reshape(1, -1, 1, 1, 3)
    exact = torch.nn.functional.grid_sample(volume, coords, padding_mode="border", align_corners=True)
    exact = exact.reshape(4, -1).t()
    (exact * weights).sum().backward()
    assert torch.allclose(value, exact, atol=1e-10)
    assert torch.allclose(sample_grid(volume.float(), points, (6, 7, 9)).double(), exact, atol=1e-5)
    inside = ((points > 0.01) & (points < torch.tensor([7.99, 5.99, 4.99], dtype=torch.float64))).all(dim=1)
    assert inside.sum() > 100 and (~inside).sum() > 100
    # grid_sample's gradient at a clamped coordinate is zero, as ours; compare away from the voxel faces (kinks)
    frac = points - points.floor()
    smooth_place = ((frac > 0.01) & (frac < 0.99)).all(dim=1)
    assert torch.allclose(ours.grad[smooth_place], theirs.grad[smooth_place], atol=1e-8)
    with torch.no_grad():
        assert torch.allclose(sample_rows(channels_last(volume), (6, 7, 9), points), value)


def test_sparse_maps_match_grid_sample_and_their_transpose():
    generator = torch.Generator().manual_seed(2)
    working, shape = (9, 11, 13), (4, 5, 1)  # an axis of one node too
    grid = torch.randn(1, 3, *shape, generator=generator)
    points = torch.rand(300, 3, generator=generator) * torch.tensor([12.0, 10.0, 8.0])
    sampling = point_sampling(points, shape, working)
    assert torch.allclose(sample_at(sampling, grid), sample_grid(grid, points, working), atol=1e-5)
    rows = torch.randn(7, 2, generator=generator, requires_grad=True)
    columns = torch.randint(0, 7, (5, 3), generator=generator)
    weights = torch.rand(5, 3, generator=generator)
    linear = sparse_map(columns, weights, 7)
    out = apply_map(linear, rows)
    assert torch.allclose(out, (weights[:, :, None] * rows[columns]).sum(dim=1), atol=1e-6)
    out.sum().backward()
    expected = torch.zeros(7).index_add_(0, columns.reshape(-1), weights.reshape(-1))
    assert torch.allclose(rows.grad, expected[:, None].expand(7, 2), atol=1e-6)


def test_adam_steps_equal_torch_optim_adam():
    target = torch.linspace(-2.0, 3.0, 12).reshape(4, 3)
    ours = torch.zeros(4, 3, requires_grad=True)
    theirs = torch.zeros(4, 3, requires_grad=True)
    optimiser, reference = Adam(ours, lr=0.05), torch.optim.Adam([theirs], lr=0.05)
    for _ in range(30):
        for param in (ours, theirs):
            ((param - target) ** 4).sum().backward()  # a gradient that changes scale along the way
        optimiser.step()
        reference.step()
        reference.zero_grad(set_to_none=True)
        assert ours.grad is None
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert float((ours.detach() - target).abs().max()) < float(target.abs().max())  # it moved towards the target


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
