"""Keys as the registration would see them (recipe step 4 in train.py): subsets, noise, outliers, confidences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cases import CaseTensors
from .config import TrainConfig


@dataclass
class Keys:
    """One draw of keys for a case: positions, displacements (voxels), confidences, features, scale."""

    xyz: torch.Tensor
    disp: torch.Tensor
    conf: torch.Tensor
    feat: torch.Tensor
    scale: float


def corrupt_keys(case: CaseTensors, config: TrainConfig, gen: torch.Generator, use_matches: bool = False) -> Keys:
    """Keys as a registration would produce them: subset, scaled truth + noise + outliers, confidences."""
    n = case.key_xyz.shape[0]
    keep_n = max(min(n, 8), int(n * (0.3 + 0.7 * torch.rand((), generator=gen).item())))
    keep = torch.randperm(n, generator=gen)[:keep_n]
    if use_matches and case.match_disp is not None:
        return Keys(case.key_xyz[keep], case.match_disp[keep], case.match_conf[keep], case.key_feat[keep], 1.0)
    lo, hi = config.magnitude_scale
    scale = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=gen).item())
    true = case.key_true[keep] * scale
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    sigma = config.noise_vox[0] + (config.noise_vox[1] - config.noise_vox[0]) * u(keep_n)
    disp = true + torch.randn(keep_n, 3, generator=gen) * sigma[:, None]
    conf = (
        1.0
        - 0.6 * (sigma - config.noise_vox[0]) / max(1e-6, config.noise_vox[1])
        + 0.1 * torch.randn(keep_n, generator=gen)
    )
    f_out = config.outlier_fraction[0] + (config.outlier_fraction[1] - config.outlier_fraction[0]) * u(()).item()
    outlier = u(keep_n) < f_out
    direction = torch.nn.functional.normalize(torch.randn(keep_n, 3, generator=gen), dim=-1)
    offset = direction * (2.0 + 6.0 * u(keep_n))[:, None]
    disp = torch.where(outlier[:, None], true + offset, disp)
    conf = torch.where(outlier, 0.05 + 0.6 * u(keep_n), conf)
    user = u(keep_n) < 0.02
    disp = torch.where(user[:, None], true, disp)
    conf = torch.where(user, torch.ones_like(conf), conf).clamp(0.02, 1.0)
    return Keys(case.key_xyz[keep], disp, conf, case.key_feat[keep], scale)


def predict(kernel: torch.nn.Module, xyz: torch.Tensor, feat: torch.Tensor, keys: Keys) -> torch.Tensor:
    """Kernel prediction (Q, 3) at points from one case's keys."""
    return kernel(xyz[None], feat[None], keys.xyz[None], keys.disp[None], keys.feat[None], keys.conf[None])[0]
