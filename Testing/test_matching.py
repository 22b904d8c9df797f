"""Tests for matching on real anatomy: known translation, smooth synthetic warp, consistency filter."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.registration import matching
from ImplicitKernelRegistrationLib.registration.features import mind_ssc
from ImplicitKernelRegistrationLib.registration.keypoints import forstner_keypoints
from ImplicitKernelRegistrationLib.registration.matching import (
    cost_volume,
    match_consistent,
    match_keypoints,
    min_convolution,
    search_offsets,
)
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask, normalise_ct, to_tensor


@pytest.fixture(scope="module")
def liver() -> dict:
    """The real liver slab (3 mm) in HU, its MIND-SSC features and Förstner keypoints."""
    image = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))))
    hu = image.array.astype(np.float32)
    fixed = to_tensor(normalise_ct(hu))
    keypoints = forstner_keypoints(fixed, to_tensor(body_mask(image)).bool(), max_points=400, nms_radius_vox=2)
    return {"hu": hu, "feat": mind_ssc(fixed), "keypoints": keypoints}


def _features(hu: np.ndarray) -> torch.Tensor:
    """MIND-SSC of an HU array."""
    return mind_ssc(to_tensor(normalise_ct(hu)))


def _smooth_warp(shape: tuple[int, int, int]):  # noqa: ANN202 - a local closure
    """A smooth field g (voxels, xyz) of up to ~2.5 voxels; the moving image is fixed(y + g(y))."""
    d, h, w = shape

    def g(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                2.0 * np.sin(2 * np.pi * y / h) * np.cos(np.pi * z / d),
                1.5 * np.sin(2 * np.pi * x / w + 0.5),
                1.0 * np.cos(2 * np.pi * y / h),
            ],
            axis=-1,
        )

    return g


def _warped(hu: np.ndarray, keypoints: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Moving = fixed(y + g(y)) by map_coordinates, and the true fixed -> moving displacement at keypoints."""
    g = _smooth_warp(hu.shape)
    z, y, x = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    field = g(x, y, z)
    moving = ndimage.map_coordinates(hu, [z + field[..., 2], y + field[..., 1], x + field[..., 0]], order=1)
    p = keypoints.numpy().astype(np.float64)
    q = p.copy()
    for _ in range(60):  # the moving point q of p solves q + g(q) = p
        q = p - g(q[:, 0], q[:, 1], q[:, 2])
    return moving.astype(np.float32), q - p


def test_search_offsets_order_matches_a_zyx_cube() -> None:
    offsets = search_offsets(1, 2.0)
    assert offsets.shape == (27, 3)
    np.testing.assert_array_equal(offsets[0].numpy(), [-2, -2, -2])
    np.testing.assert_array_equal(offsets[1].numpy(), [0, -2, -2])  # x runs fastest, like a (z, y, x) array
    np.testing.assert_array_equal(offsets[3].numpy(), [-2, 0, -2])
    np.testing.assert_array_equal(offsets[9].numpy(), [-2, -2, 0])


def test_min_convolution_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(5, 125, generator=gen)
    out = min_convolution(cost, radius=2, step_vox=1.5, alpha=0.3)
    offsets = search_offsets(2, 1.5)
    penalty = 0.3 * torch.cdist(offsets, offsets) ** 2
    brute = (cost[:, None, :] + penalty[None]).min(dim=2).values
    torch.testing.assert_close(out, brute, atol=1e-5, rtol=1e-5)


def test_known_integer_translation_is_recovered_exactly(liver: dict) -> None:
    shift = np.array([2, -3, 1])  # xyz voxels: moving(x) = fixed(x - shift), so d = shift
    moving = ndimage.shift(liver["hu"], shift[::-1], order=0, mode="nearest")
    feat_moving = _features(moving)
    kp = liver["keypoints"]
    raw = cost_volume(liver["feat"], feat_moving, kp, 4)
    best = search_offsets(4)[raw.argmin(dim=1)]
    assert float((best == torch.tensor(shift, dtype=torch.float32)).all(dim=1).float().mean()) > 0.9
    for regularise in (True, False):
        result = match_keypoints(liver["feat"], feat_moving, kp, 4, regularise=regularise, temperature=0.03)
        error = torch.linalg.vector_norm(result.displacement - torch.tensor(shift, dtype=torch.float32), dim=1)
        assert float((error < 0.5).float().mean()) > 0.9
    assert result.displacement.shape == (len(kp), 3)
    assert float(result.confidence.min()) >= 0.0 and float(result.confidence.max()) <= 1.0


def test_smooth_synthetic_warp_is_recovered_to_a_third_of_a_voxel(liver: dict) -> None:
    moving, truth = _warped(liver["hu"], liver["keypoints"])
    feat_moving = _features(moving)
    result = match_keypoints(liver["feat"], feat_moving, liver["keypoints"], 4)
    error = np.linalg.norm(result.displacement.numpy() - truth, axis=1)
    # measured: mean 0.34, median 0.30, 90th percentile 0.58 voxels (3 mm voxels; |d| mean 1.6 voxels)
    assert error.mean() < 0.45 and np.percentile(error, 90) < 0.8
    plain = match_keypoints(liver["feat"], feat_moving, liver["keypoints"], 4, regularise=False)
    assert error.mean() < np.linalg.norm(plain.displacement.numpy() - truth, axis=1).mean()


def test_chunking_does_not_change_the_result(liver: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    kp = liver["keypoints"][:40]
    moving = np.roll(liver["hu"], 1, axis=2)
    feat_moving = _features(moving)
    whole = match_keypoints(liver["feat"], feat_moving, kp, 3)
    monkeypatch.setattr(matching, "CHUNK_ELEMENTS", 20_000)
    chunked = match_keypoints(liver["feat"], feat_moving, kp, 3)
    torch.testing.assert_close(chunked.displacement, whole.displacement)
    torch.testing.assert_close(chunked.confidence, whole.confidence)


def test_consistency_filter_removes_matches_in_a_corrupted_region(liver: dict) -> None:
    moving, truth = _warped(liver["hu"], liver["keypoints"])
    corrupted = np.zeros(moving.shape, dtype=bool)
    corrupted[:, 20:60, 20:60] = True
    moving[corrupted] = np.random.default_rng(1).uniform(-1000, 1000, int(corrupted.sum()))
    forward, check = match_consistent(
        liver["feat"], _features(moving), liver["keypoints"], 4, threshold_vox=1.5, regularise=False, temperature=0.03
    )
    error = np.linalg.norm(forward.displacement.numpy() - truth, axis=1)
    keep = check.keep.numpy()
    target = np.round(liver["keypoints"].numpy() + truth).astype(int)[:, ::-1]
    target = np.clip(target, 0, np.array(moving.shape) - 1)
    distance = ndimage.distance_transform_edt(~corrupted)[tuple(target.T)]
    wrong, clean = error > 2.0, distance > 6
    assert wrong.sum() >= 10 and clean.sum() >= 50
    assert keep[wrong].mean() < 0.3  # most corrupted matches are dropped
    assert keep[clean].mean() > 0.9  # clean matches survive
    assert error[keep].mean() < 0.7
    assert check.confidence.shape == forward.confidence.shape
    assert float(check.confidence[~check.keep].mean()) < float(check.confidence[check.keep].mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matching_follows_the_cuda_device(liver: dict) -> None:
    moving = ndimage.shift(liver["hu"], (0, 2, 0), order=0, mode="nearest")
    feat_f, feat_m = liver["feat"].cuda(), _features(moving).cuda()
    result = match_keypoints(feat_f, feat_m, liver["keypoints"].cuda(), 3)
    assert result.displacement.device.type == "cuda"
    cpu = match_keypoints(liver["feat"], _features(moving), liver["keypoints"], 3)
    torch.testing.assert_close(result.displacement.cpu(), cpu.displacement, atol=1e-3, rtol=1e-3)
