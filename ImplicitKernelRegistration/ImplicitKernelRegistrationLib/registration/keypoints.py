"""Keypoint detection on working-grid tensors: the Förstner operator, NMS, farthest point sampling.

Volumes are (1, 1, D, H, W) tensors indexed (z, y, x); keypoints are (N, 3) float tensors of voxel
indices in (x, y, z) order, on the input's device.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.filters import binary_erode, filter_1d, gaussian_smooth_, max_filter


def forstner_distinctiveness(image: torch.Tensor, sigma: float = 1.4) -> torch.Tensor:
    """Förstner distinctiveness 1 / trace(T^-1) of the Gaussian-smoothed structure tensor T, (1,1,D,H,W).

    As in Heinrich's corrField and the Learn2Reg keypoint baselines: gradients by a 5-tap central
    difference, T = G_sigma * (grad grad^T), and 1 / trace(T^-1) = det(T) / trace(adj(T)), which is
    large only where the gradient varies in all three directions (corners, vessel branchings).
    """
    img = image.float()
    diff = torch.tensor([1.0, -8.0, 0.0, 8.0, -1.0], dtype=img.dtype, device=img.device) / 12.0
    gz, gy, gx = (filter_1d(img, diff, axis) for axis in range(3))
    products = torch.empty((img.shape[0], 6, *img.shape[2:]), dtype=img.dtype, device=img.device)
    for k, (p, q) in enumerate(((gx, gx), (gx, gy), (gx, gz), (gy, gy), (gy, gz), (gz, gz))):
        torch.mul(p, q, out=products[:, k : k + 1])
    del gz, gy, gx
    a, b, c, e, f, i = gaussian_smooth_(products, sigma).unbind(dim=1)
    cof_a = e * i - f * f
    cof_e = a * i - c * c
    cof_i = a * e - b * b
    det = a * cof_a + b * (c * f - b * i) + c * (b * f - c * e)
    trace_adj = cof_a + cof_e + cof_i
    tiny = torch.finfo(img.dtype).tiny
    out = torch.where(trace_adj > tiny, det / trace_adj.clamp_min(tiny), torch.zeros_like(det))
    return out.clamp_min(0.0)[:, None]


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
    local_max = dist >= max_filter(dist, nms_radius_vox)
    valid = torch.ones_like(dist, dtype=torch.bool) if mask is None else mask.bool().reshape(dist.shape)
    peak = dist.max()
    keep = local_max & binary_erode(valid, erode_vox) & (dist > 1e-6 * peak) & (peak > 0)
    zyx = torch.nonzero(keep[0, 0])
    points = zyx.flip(-1).to(torch.float32)
    if points.shape[0] > max_points:
        points = points[farthest_point_sampling(points, max_points, seed)]
    return points


def lattice_keypoints(mask: torch.Tensor, max_points: int, erode_vox: int = 2) -> torch.Tensor:
    """Up to about `max_points` points (N, 3) xyz of a regular lattice inside the eroded (1,1,D,H,W) mask.

    Keys where the detector finds none (flat soft tissue): the lattice's step is the smallest whole
    number of voxels that keeps the count near `max_points`; the lattice is centred in its cells.
    """
    inside = binary_erode(mask.bool(), erode_vox)[0, 0]
    count = int(inside.sum())
    if count == 0 or max_points <= 0:
        return torch.zeros(0, 3, device=mask.device)
    step = max(2, int(np.ceil((count / max_points) ** (1.0 / 3.0))))
    lattice = torch.zeros_like(inside)
    half = step // 2
    lattice[half::step, half::step, half::step] = True
    return torch.nonzero(inside & lattice).flip(-1).to(torch.float32)
