"""Shared pytest fixtures: where the shared real data lives, and skips when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


def frozen(value: object, seen: set[int] | None = None) -> object:
    """`value` with every numpy array it holds (through the library's objects, lists and dicts) made read-only.

    Session-wide fixtures are frozen so that a test that writes into them fails at once instead of changing
    what later tests see. Torch tensors cannot be frozen: code that edits a result's model copies it first.
    """
    seen = set() if seen is None else seen
    if id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, dict):
        for item in value.values():
            frozen(item, seen)
    elif isinstance(value, list | tuple):
        for item in value:
            frozen(item, seen)
    elif type(value).__module__.startswith("ImplicitKernelRegistrationLib") and hasattr(value, "__dict__"):
        for item in vars(value).values():
            frozen(item, seen)
    return value


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
    return frozen(make_case(ct, "breathing", seed=0, labels=labels, magnitude_mm=6.0))


@pytest.fixture(scope="session")
def liver_case():
    """A random smooth (B-spline) case of the real liver slab CT (3 mm; skips without ../shared)."""
    from ImplicitKernelRegistrationLib.io.images import read_image
    from ImplicitKernelRegistrationLib.synthetic.synth import make_case

    ct = read_image(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))
    return frozen(make_case(ct, "bspline", seed=5))


@pytest.fixture(scope="session")
def phantom_registration(phantom_case):
    """The phantom case registered with the Gaussian kernel at 3 mm (fast; no weights needed)."""
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register

    config = RegistrationConfig(kernel="gaussian", spacing_mm=3.0, max_keypoints=1024)
    return frozen(register(phantom_case.fixed, phantom_case.moving, config))
