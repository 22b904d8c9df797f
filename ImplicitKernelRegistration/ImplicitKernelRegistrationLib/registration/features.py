"""Dense image features on working-grid tensors: MIND-SSC, and sampling features at points.

Volumes are (1, C, D, H, W) tensors indexed (z, y, x); points are (N, 3) voxel indices (x, y, z).
"""

from __future__ import annotations

from itertools import combinations
from typing import Protocol

import torch
import torch.nn.functional as F

from ..core.filters import box_filter_


class FeatureExtractor(Protocol):
    """A dense feature extractor: image (1, 1, D, H, W) -> features (1, C, D, H, W) on the same grid."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Features of `image`, same spatial size and device."""
        ...


# The six-neighbourhood as (z, y, x) unit offsets, and its 12 pairs at squared distance 2
# (every pair except the 3 opposite ones): the self-similarity context of MIND-SSC.
_SIX = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))


def _squared_distance(a: int, b: int) -> int:
    """Squared distance between two six-neighbourhood offsets."""
    return sum((p - q) ** 2 for p, q in zip(_SIX[a], _SIX[b], strict=True))


SSC_PAIRS = tuple((a, b) for a, b in combinations(range(6), 2) if _squared_distance(a, b) == 2)


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The view of a replicate-padded volume such that out[z, y, x] = image[z + dz, y + dy, x + dx]."""
    d, h, w = shape
    oz, oy, ox = (pad + o for o in offset)
    return padded[..., oz : oz + d, oy : oy + h, ox : ox + w]


def mind_ssc(
    image: torch.Tensor, radius: int = 1, dilation: int = 2, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013) of (1, 1, D, H, W): (1, 12, D, H, W) in [0, 1].

    For each of the 12 pairs (a, b) of the six-neighbourhood (offsets times `dilation`), the patch
    distance D_ab(x) = mean over a (2*radius+1)^3 box of (I(x + a) - I(x + b))^2; then
    MIND = exp(-(D - min_ab D) / V), with V the mean of (D - min D) over the 12 pairs, clamped to
    [1e-3, 1e3] times its image mean. Every step is invariant to I -> s*I + t (s != 0).
    `dtype=torch.float16` halves the memory of the result (compute stays in float32).
    """
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected an image of shape (1, 1, D, H, W), got {tuple(image.shape)}")
    img = image.float()
    img = img - img.mean()  # no-op for MIND, but keeps float32 differences exact under large offsets
    shape = tuple(img.shape[2:])
    padded = F.pad(img, (dilation,) * 6, mode="replicate")
    offsets = [tuple(dilation * o for o in off) for off in _SIX]
    dist = torch.empty((1, len(SSC_PAIRS), *shape), device=img.device)
    for i, (a, b) in enumerate(SSC_PAIRS):  # in place: the 12-channel volume is the memory that matters
        torch.sub(
            _shifted(padded, offsets[a], dilation, shape),
            _shifted(padded, offsets[b], dilation, shape),
            out=dist[:, i : i + 1],
        )
    dist = box_filter_(dist.square_(), radius)
    dist -= dist.amin(dim=1, keepdim=True)  # amin: no index tensor (10x faster than min on a CPU)
    var = dist.mean(dim=1, keepdim=True)
    mean_var = var.mean()
    var = torch.clamp(var, mean_var * 1e-3, mean_var * 1e3).clamp_min(torch.finfo(torch.float32).tiny)
    return dist.div_(var).neg_().exp_().to(dtype)


def points_to_grid(points_xyz: torch.Tensor, shape_zyx: tuple[int, int, int]) -> torch.Tensor:
    """Voxel indices (..., 3) xyz -> grid_sample coordinates in [-1, 1] for align_corners=True."""
    d, h, w = shape_zyx
    size = torch.tensor([w, h, d], dtype=torch.float32, device=points_xyz.device)
    denom = (size - 1).clamp_min(1.0)
    norm = 2.0 * points_xyz.float() / denom - 1.0
    return torch.where(size > 1, norm, torch.zeros_like(norm))


def sample_features(features: torch.Tensor, points: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Trilinearly sample (1, C, D, H, W) features at (N, 3) xyz voxel indices -> (N, C), float32."""
    grid = points_to_grid(points, tuple(features.shape[2:])).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.reshape(features.shape[1], -1).t()
