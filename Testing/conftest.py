"""Shared pytest fixtures: where the shared real data lives, and skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IKR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs ../shared/data ({p} is absent)")
    return p


@pytest.fixture
def shared() -> callable:
    """The `shared_path` helper as a fixture."""
    return shared_path


@pytest.fixture(scope="session")
def phantom_case():
    """A breathing-like synthetic case of the procedural phantom (made once per test session)."""
    from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
    from ImplicitKernelRegistrationLib.synthetic.synth import make_case

    ct, labels, _ = make_phantom(seed=0)
    return make_case(ct, "breathing", seed=0, labels=labels, magnitude_mm=6.0)


@pytest.fixture(scope="session")
def phantom_registration(phantom_case):
    """The phantom case registered with the Gaussian kernel at 3 mm (fast; no weights needed)."""
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register

    config = RegistrationConfig(kernel="gaussian", spacing_mm=3.0, max_keypoints=1024)
    return register(phantom_case.fixed, phantom_case.moving, config)
