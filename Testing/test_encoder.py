"""The learned feature encoder: pointwise equivalence, weights files, training, registration with it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.registration.encoder import (
    IN_CHANNELS,
    FeatureEncoder,
    encoder_inputs,
    load_encoder,
    save_encoder,
)
from ImplicitKernelRegistrationLib.registration.matching import gather_cubes
from ImplicitKernelRegistrationLib.registration.pipeline import DEFAULT_ENCODER, RegistrationConfig, register
from ImplicitKernelRegistrationLib.review.report import landmark_errors


def _image(shape=(20, 24, 28), seed: int = 0) -> torch.Tensor:
    """A smooth random normalised image (1, 1, D, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=gen)
    return torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)


def test_encoder_features_are_unit_length_and_slab_independent(monkeypatch) -> None:
    """Features have one unit vector per voxel; slabbing (memory bound) does not change them."""
    encoder = FeatureEncoder().eval()
    image = _image()
    whole = encoder(image)
    assert whole.shape == (1, 12, *image.shape[2:])
    np.testing.assert_allclose(whole.norm(dim=1).numpy(), 1.0, atol=1e-5)
    import ImplicitKernelRegistrationLib.registration.encoder as module

    monkeypatch.setattr(module, "_SLAB_VOXELS", 100)  # one z-slice per slab
    assert torch.allclose(encoder(image), whole, atol=1e-6)


def test_encoding_gathered_cubes_equals_gathering_encoded_volume() -> None:
    """Training encodes only the gathered cubes: that equals cubes of the encoded volume (pointwise net)."""
    encoder = FeatureEncoder().eval()
    image = _image()
    centres = torch.tensor([[5.0, 6.0, 7.0], [20.0, 10.0, 3.0], [0.0, 0.0, 0.0]])  # one at the corner
    inputs = encoder_inputs(image)
    assert inputs.shape[1] == IN_CHANNELS
    with torch.no_grad():
        from_cubes = encoder.head(gather_cubes(inputs, centres, 2, 1))
        from_volume = gather_cubes(encoder(image), centres, 2, 1)
    inside = from_volume.abs().sum(dim=1) > 0  # outside the volume the gathered volume reads zero
    assert torch.allclose(from_cubes.permute(0, 2, 3, 4, 1)[inside], from_volume.permute(0, 2, 3, 4, 1)[inside])
    assert (~inside).any()


def test_encoder_weights_round_trip_and_bad_files_are_refused(tmp_path) -> None:
    """Saved weights load identically; a corrupt file, a kernel file and a missing file are refused."""
    encoder = FeatureEncoder().eval()
    path = save_encoder(encoder, tmp_path / "enc.pt", {"note": "test"})
    loaded, meta = load_encoder(path)
    image = _image(seed=1)
    assert torch.equal(loaded(image), encoder(image))
    assert meta["note"] == "test"
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(IkrError, match="bad.pt"):
        load_encoder(tmp_path / "bad.pt")
    torch.save({"format": "ikr-kernel-v1"}, tmp_path / "kernel.pt")
    with pytest.raises(IkrError, match="ikr-encoder-v1"):
        load_encoder(tmp_path / "kernel.pt")
    with pytest.raises(IkrError, match="not found"):
        load_encoder(tmp_path / "missing.pt")


def test_a_short_training_run_writes_loadable_weights_and_a_card(tmp_path) -> None:
    """A few steps on the real abdominal CT: weights, model card and validation figures are written."""
    from ImplicitKernelRegistrationLib.training.train_encoder import default_encoder_config, train_encoder_main

    ct = shared_path("ct", "abdomen_ts_example_ct_3mm.nii.gz")
    small = replace(
        default_encoder_config(ct.parents[1]),
        sources=(str(ct),),
        val_sources=(),
        families=("bspline", "sliding"),
        spacings_mm=(5.0,),
        max_keypoints=200,
        keypoints_per_case=32,
        steps=4,
    )
    result = train_encoder_main(tmp_path / "enc.pt", small)
    val = result["validation"]["held_out"]["sliding"]
    assert np.isfinite(val["mind"]) and np.isfinite(val["encoder"])
    assert 0.0 < val["mind"] < 3.0
    load_encoder(tmp_path / "enc.pt")
    card = (tmp_path / "enc.md").read_text()
    assert "| sliding (held-out family) |" in card


def test_registration_with_the_shipped_encoder_lowers_tre_fourfold(phantom_case) -> None:
    """`features="learned"` registers the phantom case as well as MIND-SSC does (TRE down fourfold)."""
    assert DEFAULT_ENCODER.is_file(), "the shipped encoder weights are missing"
    config = RegistrationConfig(kernel="gaussian", spacing_mm=3.0, max_keypoints=1024, features="learned")
    result = register(phantom_case.fixed, phantom_case.moving, config)
    errors = landmark_errors(result.field, phantom_case.landmarks_fixed_lps, phantom_case.landmarks_moving_lps)
    assert errors["tre_mm"]["mean"] < errors["tre_before_mm"]["mean"] / 4
    assert result.report["config"]["features"] == "learned"


def test_unknown_features_are_refused(phantom_case) -> None:
    """A features name that does not exist is a clear error."""
    with pytest.raises(IkrError, match="unknown features"):
        register(phantom_case.fixed, phantom_case.moving, RegistrationConfig(features="sift", spacing_mm=4.0))
