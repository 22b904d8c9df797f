"""Separable volume filters agree with scipy.ndimage (replicate edges) on random volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from ImplicitKernelRegistrationLib.core.filters import (
    box_filter,
    box_filter_,
    filter_1d,
    gaussian_smooth,
    gaussian_smooth_,
    max_filter,
)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """A random (2, 9, 7, 11) float32 volume with 2 channels (short axes exercise the edges)."""
    return np.random.default_rng(3).normal(size=(2, 9, 7, 11)).astype(np.float32)


def _run(fn, volume: np.ndarray, *args) -> np.ndarray:
    """Apply a torch filter to a (C, D, H, W) numpy volume."""
    return fn(torch.from_numpy(volume)[None], *args)[0].numpy()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_filter_1d_matches_scipy_correlate1d(volume: np.ndarray, axis: int) -> None:
    """An asymmetric 5-tap filter (a derivative) along each axis, nearest-mode edges."""
    weights = [1.0, -8.0, 0.0, 8.0, -1.0]
    expected = ndimage.correlate1d(volume, weights, axis=axis + 1, mode="nearest")
    np.testing.assert_allclose(_run(filter_1d, volume, weights, axis), expected, atol=1e-4)


def test_filter_1d_handles_filters_longer_than_the_axis() -> None:
    """A 9-tap filter along an axis of 3 voxels still replicates the edges exactly."""
    vol = np.random.default_rng(0).normal(size=(1, 3, 4, 5)).astype(np.float32)
    weights = list(np.linspace(0.1, 0.9, 9))
    expected = ndimage.correlate1d(vol, weights, axis=1, mode="nearest")
    np.testing.assert_allclose(_run(filter_1d, vol, weights, 0), expected, atol=1e-5)


def test_filter_1d_refuses_even_length() -> None:
    """An even number of weights has no centre."""
    with pytest.raises(ValueError, match="odd"):
        filter_1d(torch.zeros(1, 1, 3, 3, 3), [0.5, 0.5], 0)


@pytest.mark.parametrize("radius", [1, 2])
def test_box_filter_matches_uniform_filter(volume: np.ndarray, radius: int) -> None:
    """The cube mean equals scipy's uniform_filter over the spatial axes."""
    expected = ndimage.uniform_filter(volume, size=(1, *(2 * radius + 1,) * 3), mode="nearest")
    np.testing.assert_allclose(_run(box_filter, volume, radius), expected, atol=1e-5)


@pytest.mark.parametrize("sigma", [1.0, (0.8, 0.0, 1.3), (0.0, 0.0, 0.7)])
def test_gaussian_smooth_in_place_equals_gaussian_smooth(volume: np.ndarray, sigma) -> None:
    """The in-place variant gives the same values, written into its input (an odd or even number of passes)."""
    expected = _run(gaussian_smooth, volume, sigma)
    tensor = torch.from_numpy(volume.copy())[None]
    out = gaussian_smooth_(tensor, sigma)
    assert out is tensor
    np.testing.assert_array_equal(out[0].numpy(), expected)


def test_gaussian_smooth_matches_scipy(volume: np.ndarray) -> None:
    """Gaussian smoothing truncated at 3 sigma equals scipy's gaussian_filter with truncate=3."""
    expected = ndimage.gaussian_filter(volume, sigma=(0, 1.0, 1.0, 1.0), mode="nearest", truncate=3.0)
    np.testing.assert_allclose(_run(gaussian_smooth, volume, 1.0), expected, atol=1e-4)


def test_max_filter_matches_maximum_filter(volume: np.ndarray) -> None:
    """The cube maximum equals scipy's maximum_filter (outside voxels never win)."""
    expected = ndimage.maximum_filter(volume, size=(1, 5, 5, 5), mode="nearest")
    np.testing.assert_array_equal(_run(max_filter, volume, 2), expected)


@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_box_filter_in_place_gives_the_same_values(radius: int, group: int) -> None:
    """A few channels at a time through scratch buffers, in place: bit for bit what box_filter gives."""
    volume = np.random.default_rng(4).normal(size=(5, 9, 7, 11)).astype(np.float32)  # 5 channels: a short group
    tensor = torch.from_numpy(volume.copy())[None]
    expected = box_filter(tensor, radius)
    result = box_filter_(tensor, radius, group)
    assert result.data_ptr() == tensor.data_ptr()
    assert torch.equal(result, expected)
