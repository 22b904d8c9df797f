"""No library function changes its caller's torch RNG or thread count, and refinement leaves its registration alone."""

from __future__ import annotations

import numpy as np
import torch

from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.refine import session_from_result
from ImplicitKernelRegistrationLib.training.torch_state import own_torch_state


def test_register_leaves_the_callers_rng_alone(phantom_case) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    config = RegistrationConfig(kernel="learned", spacing_mm=4.0, max_keypoints=512, alignment="none", seed=7)
    register(phantom_case.fixed, phantom_case.moving, config)
    assert torch.equal(torch.rand(4), expected)


def test_own_torch_state_gives_seed_and_threads_back() -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    with own_torch_state(seed=0, threads=threads + 1):
        assert torch.get_num_threads() == threads + 1
        inside = torch.rand(3)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)
    with own_torch_state(seed=0, threads=1):
        assert torch.equal(torch.rand(3), inside)  # the same seed gives the same draws


def test_refinement_edits_a_copy_of_the_registrations_model(phantom_case, phantom_registration) -> None:
    model = phantom_registration.model
    values, keys = model.values.clone(), model.keys.clone()
    field = phantom_registration.field.displacement_mm.copy()
    session = session_from_result(phantom_registration, phantom_case.fixed)
    session.add_correspondences(phantom_case.landmarks_fixed_lps[:2], phantom_case.landmarks_moving_lps[:2] + 2.0)
    assert session.model is not model
    assert torch.equal(model.values, values) and torch.equal(model.keys, keys)
    assert np.array_equal(phantom_registration.field.displacement_mm, field)
    session.undo()
    assert torch.equal(model.values, values)
