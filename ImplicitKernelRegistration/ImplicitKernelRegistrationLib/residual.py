"""A smooth dense residual on top of the kernel field, fitted to the images (instance optimisation).

The kernel interpolates the keypoints' displacements; between keys it can only guess. This stage
fits a small correction r to the images themselves: with u the kernel field (fixed), it minimises

    mean over sample points x of |F(x) - M(x + u(x) + r(x))|^2  +  weight * |grad r|^2

where F and M are the MIND-SSC descriptors of the fixed and moving working images, x are points of
the fixed mask, and r lives on a coarse grid of the working grid (every `step_vox` voxels, spanning
it like the kernel's control grid), smoothed by two 3x3x3 box filters (close to a quadratic
B-spline) and interpolated trilinearly. Adam does the fitting (as in ConvexAdam's second stage).
Everything is in working voxels (x, y, z), on whatever device the inputs live on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .features import points_to_grid
from .kernel import control_axes


@dataclass(frozen=True)
class ResidualSettings:
    """How the residual is fitted (see the module docstring); iterations 0 switches it off."""

    iterations: int = 40
    step_vox: int = 2
    learning_rate: float = 0.1
    smoothness: float = 1.0
    points: int = 131072


def residual_shape(working_zyx: tuple[int, int, int], step_vox: int) -> tuple[int, int, int]:
    """The residual grid's shape (z, y, x) for a working grid: every `step_vox` voxels, ends included."""
    return tuple(len(a) for a in control_axes(working_zyx, max(1, int(step_vox))))  # type: ignore[return-value]


def grid_points(shape_zyx: tuple[int, int, int], working_zyx: tuple[int, int, int]) -> torch.Tensor:
    """The nodes (N, 3) x y z, working voxels, of a grid of `shape_zyx` spanning the working grid, z slowest."""
    axes = [torch.linspace(0.0, n - 1, m) for n, m in zip(working_zyx, shape_zyx, strict=True)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)


def smooth(grid: torch.Tensor) -> torch.Tensor:
    """Two 3x3x3 box filters (edges replicated) of a (1, 3, z, y, x) grid: the residual's smoothing."""
    for _ in range(2):
        grid = F.avg_pool3d(F.pad(grid, (1,) * 6, mode="replicate"), 3, stride=1)
    return grid


def sample_grid(grid: torch.Tensor, points_xyz: torch.Tensor, working_zyx: tuple[int, int, int]) -> torch.Tensor:
    """A (1, C, z, y, x) grid spanning the working grid, sampled trilinearly at (N, 3) working voxels -> (N, C)."""
    coords = points_to_grid(points_xyz, working_zyx).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(grid.shape[1], -1).t()


def diffusion(grid: torch.Tensor, step_vox: float) -> torch.Tensor:
    """Mean squared finite-difference gradient of a (1, 3, z, y, x) displacement grid (per working voxel)."""
    total = grid.new_zeros(())
    for axis in (2, 3, 4):
        if grid.shape[axis] > 1:
            total = total + (grid.diff(dim=axis) / step_vox).square().mean()
    return total


def sample_points(mask: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Up to `count` distinct voxels (N, 3) x y z of a (1, 1, z, y, x) bool mask, drawn with a seeded generator."""
    index = torch.nonzero(mask[0, 0].reshape(-1)).reshape(-1)
    if index.numel() > count:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pick = torch.randperm(index.numel(), generator=generator)[:count].to(index.device)
        index = index[pick]
    d, h, w = mask.shape[2:]
    z, rest = index // (h * w), index % (h * w)
    return torch.stack([rest % w, rest // w, z], dim=1).float()


def fit_residual(
    fixed_features: torch.Tensor,
    moving_features: torch.Tensor,
    base_at: torch.Tensor,
    points: torch.Tensor,
    settings: ResidualSettings,
    base_grid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Fit the residual grid (1, 3, z, y, x), working voxels, already smoothed; and a summary of the fit.

    fixed_features / moving_features: (1, C, D, H, W) descriptors on the working grid; base_at: the
    kernel field (N, 3) at `points` (N, 3), the fixed-mask voxels the image term is measured at;
    base_grid: the kernel field at the residual grid's nodes (1, 3, z, y, x): the smoothness term then
    applies to the whole field (kernel plus residual), so the residual also evens out the kernel's own
    roughness; without it, to the residual alone.
    """
    working = tuple(fixed_features.shape[2:])
    shape = residual_shape(working, settings.step_vox)  # type: ignore[arg-type]
    params = torch.zeros(1, 3, *shape, device=fixed_features.device, requires_grad=True)
    with torch.no_grad():
        target = sample_grid(fixed_features.float(), points, working)  # type: ignore[arg-type]
    moving = moving_features.float()
    optimiser = torch.optim.Adam([params], lr=settings.learning_rate)
    history = []
    for _ in range(settings.iterations):
        optimiser.zero_grad(set_to_none=True)
        grid = smooth(params)
        warped = sample_grid(moving, points + base_at + sample_grid(grid, points, working), working)  # type: ignore[arg-type]
        image = (warped - target).square().mean()
        whole = grid if base_grid is None else grid + base_grid
        loss = image + settings.smoothness * diffusion(whole, settings.step_vox)
        loss.backward()
        optimiser.step()
        history.append(float(image.detach()))
    with torch.no_grad():
        grid = smooth(params).detach()
        final = sample_grid(moving, points + base_at + sample_grid(grid, points, working), working) - target  # type: ignore[arg-type]
    summary = {
        "dissimilarity_before": round(history[0], 6) if history else None,
        "dissimilarity_after": round(float(final.square().mean()), 6),
        "max_vox": round(float(grid.abs().max()), 3),
    }
    return grid, summary
