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
