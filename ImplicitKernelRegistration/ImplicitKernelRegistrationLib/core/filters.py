"""Separable filters on (1, C, D, H, W) volumes (z, y, x): 1D correlation, box mean, Gaussian, maximum.

Edges replicate the border voxel. The 1D correlation adds shifted views in place into one output
tensor, with no padded copy: on the CPU this is several times faster than conv3d or avg_pool3d with a
1D kernel, and it is the same on CUDA.
"""

from __future__ import annotations

import math

import torch


def _add_shifted(out: torch.Tensor, volume: torch.Tensor, dim: int, offset: int, weight: float) -> None:
    """out[i] += weight * volume[clamp(i + offset)] along `dim` (replicate edges), in place."""
    n = volume.shape[dim]
    inner = max(0, n - abs(offset))
    if offset >= 0:
        if inner:
            out.narrow(dim, 0, inner).add_(volume.narrow(dim, offset, inner), alpha=weight)
        out.narrow(dim, inner, n - inner).add_(volume.narrow(dim, n - 1, 1), alpha=weight)
    else:
        if inner:
            out.narrow(dim, n - inner, inner).add_(volume.narrow(dim, 0, inner), alpha=weight)
        out.narrow(dim, 0, n - inner).add_(volume.narrow(dim, 0, 1), alpha=weight)


def filter_1d(
    volume: torch.Tensor, weights: torch.Tensor | list[float], axis: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Correlate every channel of (1, C, D, H, W) with odd-length 1D `weights` along `axis` (0=z, 1=y, 2=x).

    `out`: a tensor of the volume's shape to write the result into (not the volume itself), or None for a new one.
    """
    w = [float(v) for v in weights]
    if len(w) % 2 != 1:
        raise ValueError(f"filter_1d needs an odd number of weights, got {len(w)}")
    dim, radius = axis + 2, len(w) // 2
    out = torch.mul(volume, w[radius], out=out) if out is not None else volume * w[radius]
    for k, weight in enumerate(w):
        if k != radius and weight != 0.0:
            _add_shifted(out, volume, dim, k - radius, weight)
    return out


def box_filter(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^3 cube around every voxel (separable)."""
    if radius <= 0:
        return volume
    weights = [1.0 / (2 * radius + 1)] * (2 * radius + 1)
    for axis in range(3):
        volume = filter_1d(volume, weights, axis)
    return volume


def box_filter_(volume: torch.Tensor, radius: int, group: int = 3) -> torch.Tensor:
    """`box_filter` in place, `group` channels at a time through two buffers of that many channels: the same
    values, without two whole copies (MIND-SSC's 12 channels on a 2 mm thorax grid: 430 MB less at the peak,
    and on one CPU thread 2.5x faster). Groups of a few channels rather than one keep the number of parallel
    regions small (each costs a wait for the other threads, long on a loaded machine)."""
    if radius <= 0:
        return volume
    weights = [1.0 / (2 * radius + 1)] * (2 * radius + 1)
    group = max(1, min(group, volume.shape[1]))
    first, second = torch.empty_like(volume[:, :group]), torch.empty_like(volume[:, :group])
    for c in range(0, volume.shape[1], group):
        channels = volume[:, c : c + group]
        n = channels.shape[1]
        filter_1d(channels, weights, 0, out=first[:, :n])
        filter_1d(first[:, :n], weights, 1, out=second[:, :n])
        filter_1d(second[:, :n], weights, 2, out=channels)
    return volume


def gaussian_weights(sigma: float) -> list[float]:
    """A normalised sampled Gaussian (sigma in voxels) truncated at 3 sigma, at least 3 taps."""
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return (weights / weights.sum()).tolist()


def gaussian_smooth(volume: torch.Tensor, sigma: float | tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian smoothing; sigma in voxels, one for all axes or one per axis (z, y, x); 0 skips."""
    sigmas = (sigma,) * 3 if isinstance(sigma, (int, float)) else tuple(sigma)
    for axis, s in enumerate(sigmas):
        if s > 0:
            volume = filter_1d(volume, gaussian_weights(float(s)), axis)
    return volume


def gaussian_smooth_(volume: torch.Tensor, sigma: float | tuple[float, float, float]) -> torch.Tensor:
    """`gaussian_smooth` written back into `volume`, through one buffer of its size: the same values, with one new
    volume in all instead of one per axis (new memory costs the kernel's page zeroing as well as its size)."""
    sigmas = (sigma,) * 3 if isinstance(sigma, (int, float)) else tuple(sigma)
    source, target = volume, torch.empty_like(volume)
    for axis, s in enumerate(sigmas):
        if s > 0:
            filter_1d(source, gaussian_weights(float(s)), axis, out=target)
            source, target = target, source
    if source is not volume:
        volume.copy_(source)
    return volume


def max_filter(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over a (2r+1)^3 cube around every voxel (separable; voxels outside the volume are ignored).

    Running maxima of shifted views, in place: an order of magnitude faster than max_pool3d on the CPU.
    """
    for dim in (2, 3, 4):
        n = volume.shape[dim]
        out = volume.clone()
        for offset in range(1, min(radius, n - 1) + 1):
            ahead, behind = out.narrow(dim, 0, n - offset), out.narrow(dim, offset, n - offset)
            torch.maximum(ahead, volume.narrow(dim, offset, n - offset), out=ahead)
            torch.maximum(behind, volume.narrow(dim, 0, n - offset), out=behind)
        volume = out
    return volume


def binary_erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of a (1, C, D, H, W) bool mask by a (2r+1)^3 cube; outside the volume counts as out."""
    if radius <= 0:
        return mask
    eroded = max_filter((~mask).float(), radius) < 0.5
    interior = torch.zeros_like(mask)
    interior[..., radius : -radius or None, radius : -radius or None, radius : -radius or None] = True
    return eroded & interior & mask


def binary_open(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Morphological opening (erosion, then dilation) of a (1, C, D, H, W) bool mask by a (2r+1)^3 cube."""
    if radius <= 0:
        return mask
    return (max_filter(binary_erode(mask, radius).float(), radius) > 0.5) & mask
