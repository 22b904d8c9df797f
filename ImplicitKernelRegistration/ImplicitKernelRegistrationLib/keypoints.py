"""Keypoint detection on working-grid tensors: the Förstner operator, NMS, farthest point sampling.

Volumes are (1, 1, D, H, W) tensors indexed (z, y, x); keypoints are (N, 3) float tensors of voxel
indices in (x, y, z) order, on the input's device.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class KeypointDetector(Protocol):
    """A detector: (image (1,1,D,H,W), mask or None, max_points, seed) -> (N, 3) xyz voxel indices."""

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None, max_points: int = 2048, seed: int = 0
    ) -> torch.Tensor:
        """Detect at most `max_points` keypoints, deterministically for a seed."""
        ...


def _filter_1d(volume: torch.Tensor, weights: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate each channel of (1, C, D, H, W) with 1D `weights` along `axis` (0=z, 1=y, 2=x), replicate pad.

    A weighted sum of shifted views: much faster than conv3d with a 1D kernel on CPU, same on CUDA.
    """
    n = weights.numel()
    pad = [0, 0, 0, 0, 0, 0]
    pad[4 - 2 * axis] = pad[5 - 2 * axis] = n // 2
    _, c, d, h, w = volume.shape
    padded = F.pad(volume.reshape(c, 1, d, h, w), pad, mode="replicate")[None, :, 0]
    length = volume.shape[axis + 2]
    out = padded.narrow(axis + 2, 0, length) * weights[0]
    for k in range(1, n):
        out.add_(padded.narrow(axis + 2, k, length), alpha=float(weights[k]))
    return out


def _max_filter(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Maximum over a (2r+1)^3 cube around every voxel of (1, C, D, H, W) (separable; -inf outside)."""
    k = 2 * radius + 1
    for axis in range(3):
        kernel = [1, 1, 1]
        kernel[axis] = k
        pad = [0, 0, 0]
        pad[axis] = radius
        volume = F.max_pool3d(volume, tuple(kernel), stride=1, padding=tuple(pad))
    return volume


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing (sigma in voxels) of every channel of a (1, C, D, H, W) tensor."""
    if sigma <= 0:
        return volume
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype, device=volume.device)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    weights = weights / weights.sum()
    for axis in range(3):
        volume = _filter_1d(volume, weights, axis)
    return volume


def forstner_distinctiveness(image: torch.Tensor, sigma: float = 1.4) -> torch.Tensor:
    """Förstner distinctiveness 1 / trace(T^-1) of the Gaussian-smoothed structure tensor T, (1,1,D,H,W).

    As in Heinrich's corrField and the Learn2Reg keypoint baselines: gradients by a 5-tap central
    difference, T = G_sigma * (grad grad^T), and 1 / trace(T^-1) = det(T) / trace(adj(T)), which is
    large only where the gradient varies in all three directions (corners, vessel branchings).
    """
    img = image.float()
    diff = torch.tensor([1.0, -8.0, 0.0, 8.0, -1.0], dtype=img.dtype, device=img.device) / 12.0
    gz, gy, gx = (_filter_1d(img, diff, axis) for axis in range(3))
    products = torch.cat([gx * gx, gx * gy, gx * gz, gy * gy, gy * gz, gz * gz], dim=1)
    a, b, c, e, f, i = gaussian_smooth(products, sigma).unbind(dim=1)
    cof_a = e * i - f * f
    cof_e = a * i - c * c
    cof_i = a * e - b * b
    det = a * cof_a + b * (c * f - b * i) + c * (b * f - c * e)
    trace_adj = cof_a + cof_e + cof_i
    tiny = torch.finfo(img.dtype).tiny
    out = torch.where(trace_adj > tiny, det / trace_adj.clamp_min(tiny), torch.zeros_like(det))
    return out.clamp_min(0.0)[:, None]


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of a (1, 1, D, H, W) bool mask by a cube of `radius`; outside the volume counts as out."""
    if radius <= 0:
        return mask
    eroded = _max_filter((~mask).float(), radius) < 0.5
    border = torch.zeros_like(mask)
    border[..., radius : -radius or None, radius : -radius or None, radius : -radius or None] = True
    return eroded & border & mask


def farthest_point_sampling(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices (k,) of `points` (N, 3) picked greedily farthest from those already picked; seeded start.

    The loop is sequential, so it runs in numpy on a CPU copy of the points (identical on every device).
    """
    n = points.shape[0]
    if k >= n:
        return torch.arange(n, device=points.device)
    pts = points.detach().double().cpu().numpy()
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = np.random.default_rng(int(seed)).integers(n)
    dist = ((pts - pts[chosen[0]]) ** 2).sum(axis=1)
    for j in range(1, k):
        chosen[j] = int(np.argmax(dist))
        np.minimum(dist, ((pts - pts[chosen[j]]) ** 2).sum(axis=1), out=dist)
    return torch.from_numpy(chosen).to(points.device)


def forstner_keypoints(
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    max_points: int = 2048,
    seed: int = 0,
    *,
    sigma: float = 1.4,
    nms_radius_vox: int = 3,
    erode_vox: int = 2,
) -> torch.Tensor:
    """Förstner keypoints (N <= max_points, 3) xyz: local maxima (NMS) inside the eroded mask, thinned by FPS."""
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected an image of shape (1, 1, D, H, W), got {tuple(image.shape)}")
    dist = forstner_distinctiveness(image, sigma)
    local_max = dist >= _max_filter(dist, nms_radius_vox)
    valid = torch.ones_like(dist, dtype=torch.bool) if mask is None else mask.bool().reshape(dist.shape)
    peak = dist.max()
    keep = local_max & _erode(valid, erode_vox) & (dist > 1e-6 * peak) & (peak > 0)
    zyx = torch.nonzero(keep[0, 0])
    points = zyx.flip(-1).to(torch.float32)
    if points.shape[0] > max_points:
        points = points[farthest_point_sampling(points, max_points, seed)]
    return points


DETECTORS: dict[str, KeypointDetector] = {"forstner": forstner_keypoints}
