"""Instance optimisation of the key displacements: the kernel as a linear map, a better fit, exact clicks and undo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ImplicitKernelRegistrationLib.core.fields import transform_points
from ImplicitKernelRegistrationLib.core.geometry import Geometry
from ImplicitKernelRegistrationLib.core.metrics import sdlogj
from ImplicitKernelRegistrationLib.registration.dense import DenseModel
from ImplicitKernelRegistrationLib.registration.features import sample_features
from ImplicitKernelRegistrationLib.registration.kernel import (
    GaussianKernel,
    KernelConfig,
    LearnedKernel,
    gather_neighbours,
)
from ImplicitKernelRegistrationLib.registration.key_optimisation import (
    KeyOptimisationSettings,
    control_jacobian,
)
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.registration.refine import open_session, session_from_result


def _random_keys(seed: int) -> tuple[torch.Tensor, ...]:
    """Queries, keys, displacements, features and confidences on a 40-voxel cube."""
    g = torch.Generator().manual_seed(seed)
    keys, queries = torch.rand(1, 150, 3, generator=g) * 40, torch.rand(1, 400, 3, generator=g) * 40
    disp = torch.randn(1, 150, 3, generator=g)
    k_feat, q_feat = torch.rand(1, 150, 12, generator=g), torch.rand(1, 400, 12, generator=g)
    return queries, q_feat, keys, disp, k_feat, torch.rand(1, 150, generator=g)


@pytest.mark.parametrize("local_linear", [False, True])
def test_learned_kernel_is_its_neighbour_weights(local_linear):
    torch.manual_seed(3)
    kernel = LearnedKernel(KernelConfig(local_linear=local_linear)).eval()
    for p in kernel.parameters():  # away from the untrained start, where the heads contribute nothing
        p.data += 0.05 * torch.randn_like(p)
    q, qf, keys, disp, kf, conf = _random_keys(1)
    with torch.no_grad():
        out = kernel(q, qf, keys, disp, kf, conf)
        index, weights = kernel.neighbour_weights(q, qf, keys, disp, kf, conf)
    assert index.shape == weights.shape == (1, 400, 30)
    linear = (weights.unsqueeze(-1) * gather_neighbours(disp, index)).sum(dim=2)
    assert torch.allclose(out, linear, atol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 400), atol=1e-4)  # a constant field is reproduced


def test_gaussian_kernel_is_its_neighbour_weights():
    kernel = GaussianKernel(3.0, 20)
    q, _, keys, disp, _, conf = _random_keys(2)
    index, weights = kernel.neighbour_weights(q, None, keys, disp, None, conf)
    linear = (weights.unsqueeze(-1) * gather_neighbours(disp, index)).sum(dim=2)
    assert torch.allclose(kernel(q, None, keys, disp, None, conf), linear, atol=1e-5)


def test_point_weights_give_the_kernel_at_points():
    torch.manual_seed(4)
    kernel = LearnedKernel(KernelConfig(local_linear=True)).eval()
    features = torch.rand(1, 12, 30, 32, 34)
    model = DenseModel(kernel, features, Geometry((34, 32, 30), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), 4)
    g = torch.Generator().manual_seed(5)
    keys = torch.rand(80, 3, generator=g) * torch.tensor([33.0, 31.0, 29.0])
    disp, conf = torch.randn(80, 3, generator=g), torch.rand(80, generator=g)
    points = torch.rand(200, 3, generator=g) * torch.tensor([33.0, 31.0, 29.0])
    index, weights = model.point_weights(points, keys, disp, conf)
    assert torch.equal(model.keys, keys) and model.disp.shape == (80, 3)
    with torch.no_grad():
        direct = kernel(points[None], sample_features(features, points)[None], keys[None], disp[None],
                        model.key_features[None], conf[None])[0]  # fmt: skip
    assert torch.allclose((weights.unsqueeze(-1) * disp[index]).sum(dim=1), direct, atol=1e-4)


def test_control_jacobian_of_known_fields():
    shape = (4, 5, 6)
    assert torch.allclose(control_jacobian(torch.zeros(1, 3, *shape), (2.0, 2.0, 2.0)), torch.ones(3, 4, 5))
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) * 2.0 for n in shape), indexing="ij")
    stretch = torch.stack([0.5 * xx, torch.zeros_like(yy), -0.25 * zz])[None]  # u = (0.5 x, 0, -0.25 z)
    assert torch.allclose(control_jacobian(stretch, (2.0, 2.0, 2.0)), torch.full((3, 4, 5), 1.5 * 0.75))


def test_settings_follow_the_config():
    config = RegistrationConfig(key_iterations=9, key_points=100)
    assert config.key_optimisation_settings() == KeyOptimisationSettings(
        9, config.key_learning_rate, 100, config.key_smoothness, config.key_anchor, config.key_robust
    )
    assert RegistrationConfig.from_dict(config.to_dict()) == config


@pytest.fixture(scope="module")
def liver_pair(liver_case):
    """The liver case registered at 3 mm without and with the key optimisation (same settings otherwise)."""
    common = {"spacing_mm": 3.0, "alignment": "none", "residual_iterations": 0}  # the stage's mechanics alone
    off = register(liver_case.fixed, liver_case.moving, RegistrationConfig(**common, key_iterations=0))
    on = register(liver_case.fixed, liver_case.moving, RegistrationConfig(**common))
    assert RegistrationConfig().key_iterations > 0
    return off, on


def test_optimisation_lowers_the_image_term_and_the_tre(liver_case, liver_pair):
    off, on = liver_pair
    summary = on.report["key_optimisation"]
    assert off.report["key_optimisation"] is None
    assert summary["dissimilarity_after"] < summary["dissimilarity_before"]
    assert 0 < summary["key_change_vox_mean"] < 1.5
    p, q = liver_case.landmarks_fixed_lps, liver_case.landmarks_moving_lps
    tre = [np.linalg.norm(transform_points(r.field, p) - q, axis=1).mean() for r in (off, on)]
    assert tre[1] < tre[0]
    body = body_mask(liver_case.fixed)
    assert sdlogj(on.field, body)["folding_percent"] == 0.0
    # the keys are the same points with the same confidences; only their displacements moved
    assert np.array_equal(on.correspondences.fixed_lps, off.correspondences.fixed_lps)
    assert np.array_equal(on.correspondences.confidence, off.correspondences.confidence)
    assert not np.allclose(on.correspondences.displacement_mm, off.correspondences.displacement_mm)


def test_field_is_the_kernel_of_the_optimised_keys(liver_case, liver_pair):
    _, on = liver_pair
    # a session rebuilds the field from the correspondences alone: the same field, so the keys carry it all
    session = session_from_result(on, liver_case.fixed)
    assert np.abs(session.field.displacement_mm - on.field.displacement_mm).max() < 1e-4
    saved = {"config": on.report["config"], "working_geometry": on.working_geometry.to_dict()}
    reopened = open_session(liver_case.fixed, saved, on.correspondences)
    assert np.abs(reopened.field.displacement_mm - on.field.displacement_mm).max() < 1e-4


def test_clicks_stay_exact_and_undo_is_exact(liver_case, liver_pair):
    _, on = liver_pair
    session = session_from_result(on, liver_case.fixed)
    start = session.field.displacement_mm.copy()
    p = liver_case.landmarks_fixed_lps[:3]
    q = liver_case.landmarks_moving_lps[:3] + np.array([1.5, -1.0, 2.0])
    session.add_correspondences(p, q)
    assert np.abs(transform_points(session.field, p) - q).max() < 1e-3
    session.remove_correspondence(session.pairs[0].id)
    assert np.abs(transform_points(session.field, p[1:]) - q[1:]).max() < 1e-3
    for _ in range(4):
        session.undo()
    assert np.array_equal(session.field.displacement_mm, start)


def test_optimisation_is_deterministic(liver_case, liver_pair):
    _, on = liver_pair
    config = RegistrationConfig(spacing_mm=3.0, alignment="none", residual_iterations=0)
    again = register(liver_case.fixed, liver_case.moving, config)
    assert torch.equal(again.model.disp, on.model.disp)
    assert np.array_equal(again.field.displacement_mm, on.field.displacement_mm)


def test_the_default_registration_with_its_residual_is_deterministic(liver_case):
    config = RegistrationConfig(spacing_mm=3.0, alignment="none")
    assert config.residual_iterations > 0 and config.key_iterations > 0
    first, second = (register(liver_case.fixed, liver_case.moving, config) for _ in range(2))
    assert torch.equal(first.model.residual, second.model.residual)
    assert np.array_equal(first.field.displacement_mm, second.field.displacement_mm)
