"""Training the learned kernel: the quick recipe end to end, the key corruption, the weights and card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.registration.kernel import LearnedKernel, load_weights
from ImplicitKernelRegistrationLib.training.card import model_card
from ImplicitKernelRegistrationLib.training.cases import CaseTensors
from ImplicitKernelRegistrationLib.training.config import quick_config
from ImplicitKernelRegistrationLib.training.corruption import corrupt_keys
from ImplicitKernelRegistrationLib.training.train import bending_energy, train_main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list]:
    """One quick training run on a tiny phantom (seconds), with its files and progress messages."""
    out = tmp_path_factory.mktemp("train") / "kernel.pt"
    messages: list[tuple[float, str]] = []
    result = train_main(out, quick=True, seed=0, progress=lambda f, m: messages.append((f, m)))
    return result, out, messages


def test_quick_training_runs_end_to_end_and_lowers_the_loss(quick_run: tuple) -> None:
    """On one fixed draw of keys and queries the trained kernel beats the untrained one; progress goes 0 -> 1."""
    result, _, messages = quick_run
    assert len(result["history"]) >= 10
    epe = result["fixed_epe_vox"]
    assert epe["end"] < epe["start"], epe
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_quick_training_writes_loadable_weights_card_and_summary(quick_run: tuple) -> None:
    """Weights load (weights_only) into the same kernel; the card and JSON summary report TRE per family."""
    result, out, _ = quick_run
    kernel, meta = load_weights(out)
    assert meta["step"] == quick_config().steps and meta["train_config"]["seed"] == 0
    trained = result["kernel"]
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, kernel.state_dict()[name])
    card = out.with_suffix(".md").read_text()
    assert "| sliding (held-out family) |" in card and "learned" in card and "Seed: 0" in card
    summary = json.loads(out.with_suffix(".json").read_text())
    held = summary["validation"]["held_out"]["sliding"]
    assert set(held) >= {"none", "learned", "tps", "gaussian"}
    assert all(v == v and v >= 0 for k, v in held.items() if k != "n_cases")  # finite, non-negative
    assert held["learned"] < held["none"]  # registration helps on the held-out family
    assert model_card(result) == card


def test_trained_kernel_still_reproduces_a_constant_field(quick_run: tuple) -> None:
    """Training changes the weights, never their sum: a constant field stays exact."""
    kernel: LearnedKernel = quick_run[0]["kernel"].eval()
    gen = torch.Generator().manual_seed(0)
    keys = torch.rand(1, 200, 3, generator=gen) * 30
    q = torch.rand(1, 300, 3, generator=gen) * 30
    disp = torch.tensor([2.0, -1.0, 0.5]).expand(1, 200, 3)
    with torch.no_grad():
        out = kernel(q, torch.rand(1, 300, 12), keys, disp, torch.rand(1, 200, 12), torch.rand(1, 200))
    assert torch.allclose(out, disp[:, :1].expand_as(out), atol=1e-4)


def _toy_case(n: int = 400) -> CaseTensors:
    """A small hand-made case with known true displacements at keys."""
    gen = torch.Generator().manual_seed(1)
    xyz = torch.rand(n, 3, generator=gen) * 40
    true = torch.ones(n, 3)
    feat = torch.rand(n, 12, generator=gen)
    patch = torch.zeros(1, 5, 5, 5, 3)
    return CaseTensors(
        "toy", "bspline", "toy", torch.eye(3), xyz, feat, true, xyz, feat, true, xyz, feat, true,
        patch, torch.zeros(1, 5, 5, 5, 12), patch,
    )  # fmt: skip


def test_corrupted_keys_are_noisy_with_outliers_and_matching_confidence() -> None:
    """Noise of the configured size, some outliers, and lower confidence for the outliers; seeded."""
    config = quick_config()
    case = _toy_case()
    keys = corrupt_keys(case, config, torch.Generator().manual_seed(3))
    again = corrupt_keys(case, config, torch.Generator().manual_seed(3))
    assert torch.equal(keys.disp, again.disp) and torch.equal(keys.conf, again.conf)
    assert 0.3 * len(case.key_xyz) <= len(keys.xyz) <= len(case.key_xyz)
    err = (keys.disp - keys.scale * torch.ones(1, 3)).norm(dim=-1)
    assert config.magnitude_scale[0] <= keys.scale <= config.magnitude_scale[1]
    assert ((keys.conf > 0) & (keys.conf <= 1)).all()
    outliers = err > 2.0 * 3**0.5 * config.noise_vox[1] + 0.5  # beyond any Gaussian draw of this size
    if outliers.any():
        assert keys.conf[outliers].mean() < keys.conf[~outliers].mean()
    assert err[~outliers].mean() < 2.5 * config.noise_vox[1]


def test_bending_energy_is_zero_for_affine_and_positive_for_curved_fields() -> None:
    """Second differences vanish for affine displacements only."""
    z, y, x = torch.meshgrid(*[torch.arange(5.0)] * 3, indexing="ij")
    affine = torch.stack([0.1 * x + 0.2 * y, 0.3 * z, -0.1 * x + 1.0], -1)[None]
    assert bending_energy(affine).item() == pytest.approx(0.0, abs=1e-10)
    curved = torch.stack([0.1 * x**2, 0.05 * x * y, torch.zeros_like(x)], -1)[None]
    assert bending_energy(curved).item() > 1e-3


def test_full_training_without_data_is_refused_clearly(tmp_path: Path) -> None:
    """The full recipe needs the shared CTs; a folder without ct/ is named in the error."""
    with pytest.raises(IkrError, match="ct/"):
        train_main(tmp_path / "k.pt", data_dir=tmp_path, quick=False)
