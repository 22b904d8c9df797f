"""Tests for features: MIND-SSC (shape, range, invariance) and sample_features coordinates."""

from __future__ import annotations

import functools

import SimpleITK as sitk
import torch

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.registration.features import SSC_PAIRS, mind_ssc, sample_features
from ImplicitKernelRegistrationLib.registration.preprocess import normalise_ct, to_tensor


@functools.cache
def _liver() -> torch.Tensor:
    """The real liver slab (3 mm), HU-normalised, as (1, 1, D, H, W)."""
    image = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))))
    return to_tensor(normalise_ct(image.array))


def test_ssc_pairs_are_the_twelve_non_opposite_pairs() -> None:
    assert len(SSC_PAIRS) == 12 and len(set(SSC_PAIRS)) == 12
    opposite = {(0, 1), (2, 3), (4, 5)}
    assert not opposite & set(SSC_PAIRS)


def test_mind_ssc_shape_and_range() -> None:
    image = _liver()
    feat = mind_ssc(image)
    assert feat.shape == (1, 12, *image.shape[2:]) and feat.dtype == torch.float32
    assert float(feat.min()) >= 0.0 and float(feat.max()) <= 1.0 + 1e-6
    # every voxel has at least one channel at exp(0) = 1 (the minimum distance is subtracted)
    torch.testing.assert_close(feat.max(dim=1).values, torch.ones_like(feat[:, 0]))
    assert float(feat.std()) > 0.05
    assert mind_ssc(image, dtype=torch.float16).dtype == torch.float16


def test_mind_ssc_is_invariant_to_a_linear_intensity_change() -> None:
    image = _liver()
    reference = mind_ssc(image)
    torch.testing.assert_close(mind_ssc(2.0 * image), reference, atol=1e-6, rtol=1e-6)
    # 2 * I + 100 is itself rounded to float32 (steps of 7.6e-6 near 100, against image steps of
    # 5e-4 per HU), which is all that remains: the descriptor removes offset and scale
    torch.testing.assert_close(mind_ssc(2.0 * image + 100.0), reference, atol=2e-3, rtol=0)
    torch.testing.assert_close(mind_ssc(0.5 * image - 3.0), reference, atol=5e-4, rtol=0)


def test_sample_features_integer_and_half_voxels_in_xyz_order() -> None:
    gen = torch.Generator().manual_seed(0)
    feat = torch.rand(1, 5, 4, 6, 9, generator=gen)  # D=4, H=6, W=9: a swapped axis would fail
    pts = torch.tensor([[0.0, 0.0, 0.0], [8.0, 5.0, 3.0], [7.0, 2.0, 1.0], [3.0, 4.0, 2.0]])
    out = sample_features(feat, pts)
    assert out.shape == (4, 5)
    for i, (x, y, z) in enumerate(pts.long().tolist()):
        torch.testing.assert_close(out[i], feat[0, :, z, y, x])
    half = sample_features(feat, torch.tensor([[2.5, 1.0, 3.0], [4.0, 4.5, 0.0], [1.0, 2.0, 0.25]]))
    torch.testing.assert_close(half[0], (feat[0, :, 3, 1, 2] + feat[0, :, 3, 1, 3]) / 2)
    torch.testing.assert_close(half[1], (feat[0, :, 0, 4, 4] + feat[0, :, 0, 5, 4]) / 2)
    torch.testing.assert_close(half[2], 0.75 * feat[0, :, 0, 2, 1] + 0.25 * feat[0, :, 1, 2, 1])


def test_sample_features_of_mind_at_keypoint_voxels() -> None:
    image = _liver()
    feat = mind_ssc(image)
    pts = torch.tensor([[60.0, 50.0, 15.0], [10.0, 90.0, 3.0]])
    out = sample_features(feat, pts)
    torch.testing.assert_close(out[0], feat[0, :, 15, 50, 60])
    torch.testing.assert_close(out[1], feat[0, :, 3, 90, 10])
