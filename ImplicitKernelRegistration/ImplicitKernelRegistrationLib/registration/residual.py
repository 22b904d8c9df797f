"""A smooth dense residual on top of the kernel field, fitted to the images (instance optimisation).

The kernel interpolates the keypoints' displacements; between keys it can only guess. This stage
fits a small correction r to the images themselves: with u the kernel field (fixed), it minimises

    mean over sample points x of |F(x) - M(x + u(x) + r(x))|^2  +  weight * |grad r|^2

(with `robust` > 0 each point's squared difference passes through Geman-McClure, as in key_optimisation.py)

where F and M are the MIND-SSC descriptors of the fixed and moving working images, x are points of
the fixed mask, and r lives on a coarse grid of the working grid (every `step_vox` voxels, spanning
it like the kernel's control grid), smoothed by two 3x3x3 box filters (close to a quadratic
B-spline) and interpolated trilinearly. Adam does the fitting (as in ConvexAdam's second stage).
Everything is in working voxels (x, y, z), on whatever device the inputs live on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .features import points_to_grid
from .kernel import control_axes


@dataclass(frozen=True)
class ResidualSettings:
    """How the residual is fitted (see the module docstring); iterations 0 switches it off."""

    iterations: int = 30
    step_vox: int = 3
    learning_rate: float = 0.03
    smoothness: float = 0.5
    points: int = 131072
    robust: float = 2.0


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


def channels_last(volume: torch.Tensor) -> torch.Tensor:
    """A (1, C, D, H, W) volume as a (D * H * W, C) table, rows in z, y, x order (for `sample_rows`)."""
    return volume[0].reshape(volume.shape[1], -1).t().contiguous()


def sample_rows(table: torch.Tensor, shape_zyx: tuple[int, int, int], points_xyz: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation (N, C) of a `channels_last` table at (N, 3) voxel points, border clamped.

    Differentiable in the points; unlike grid_sample's backward it never builds a gradient the size of
    the volume, which made the residual's iterations ten times slower on a CPU.
    """
    d, h, w = shape_zyx
    upper = torch.tensor([w - 1, h - 1, d - 1], dtype=points_xyz.dtype, device=points_xyz.device)
    p = torch.minimum(points_xyz.clamp_min(0.0), upper)
    low = torch.minimum(p.detach().floor(), (upper - 1).clamp_min(0.0))
    frac = p - low
    x0, y0, z0 = low.long().unbind(1)
    x1, y1, z1 = (x0 + 1).clamp_max(w - 1), (y0 + 1).clamp_max(h - 1), (z0 + 1).clamp_max(d - 1)
    fx, fy, fz = frac.unbind(1)
    out = 0.0
    for zi, wz in ((z0, 1 - fz), (z1, fz)):
        for yi, wy in ((y0, 1 - fy), (y1, fy)):
            for xi, wx in ((x0, 1 - fx), (x1, fx)):
                out = out + (wz * wy * wx)[:, None] * table[(zi * h + yi) * w + xi]
    return out


def robust_scale(squared: torch.Tensor, robust: float) -> float:
    """Geman-McClure's scale s for per-point squared differences: robust^2 x their median (at the start of a fit)."""
    return robust**2 * float(squared.median().clamp_min(1e-12))


def geman_mcclure(squared: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-point squared differences r^2 through Geman-McClure, s r^2 / (r^2 + s): what nothing explains weighs less."""
    return scale * squared / (squared + scale)


def diffusion(grid: torch.Tensor, step_vox: float) -> torch.Tensor:
    """Mean squared finite-difference gradient of a (1, 3, z, y, x) displacement grid (per working voxel)."""
    total = grid.new_zeros(())
    for axis in (2, 3, 4):
        if grid.shape[axis] > 1:
            total = total + (grid.diff(dim=axis) / step_vox).square().mean()
    return total


def sample_points(mask: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Up to `count` distinct voxels (N, 3) x y z of a (1, 1, z, y, x) bool mask (seeded draw), z slowest."""
    index = torch.nonzero(mask[0, 0].reshape(-1)).reshape(-1)
    if index.numel() > count:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        pick = torch.randperm(index.numel(), generator=generator)[:count].to(index.device)
        # in memory order: the trilinear gathers at these points (sample_rows) then read the volume nearly in
        # sequence, about twice as fast on a CPU as in random order
        index = index[pick].sort().values
    d, h, w = mask.shape[2:]
    z, rest = index // (h * w), index % (h * w)
    return torch.stack([rest % w, rest // w, z], dim=1).float()


def fit_residual(
    fixed_features: torch.Tensor,
    moving_features: torch.Tensor,
    base_at: torch.Tensor,
    points: torch.Tensor,
    settings: ResidualSettings,
) -> tuple[torch.Tensor, dict]:
    """Fit the residual grid (1, 3, z, y, x), working voxels, already smoothed; and a summary of the fit.

    fixed_features / moving_features: (1, C, D, H, W) descriptors on the working grid; base_at: the
    kernel field (N, 3) at `points` (N, 3), the fixed-mask voxels the image term is measured at. The
    smoothness term applies to the residual alone: regularising the whole field (kernel plus residual)
    pulled the kernel's own sharp gradients flat and raised the TRE on breathing-like motion
    (bench/results/accuracy_dev.md, session 6).
    """
    start = time.perf_counter()
    working = tuple(fixed_features.shape[2:])
    shape = residual_shape(working, settings.step_vox)  # type: ignore[arg-type]
    params = torch.zeros(1, 3, *shape, device=fixed_features.device, requires_grad=True)
    with torch.no_grad():
        target = sample_grid(fixed_features.float(), points, working)  # type: ignore[arg-type]
    moving = channels_last(moving_features.float())

    def squared_residuals(grid: torch.Tensor) -> torch.Tensor:
        """Each point's mean squared descriptor difference (N,) under the kernel field plus `grid`."""
        warped = sample_rows(moving, working, points + base_at + sample_grid(grid, points, working))  # type: ignore[arg-type]
        return (warped - target).square().mean(dim=1)

    scale2 = 0.0
    if settings.robust > 0:  # Geman-McClure, as the key optimisation
        with torch.no_grad():
            scale2 = robust_scale(squared_residuals(torch.zeros_like(params)), settings.robust)
    optimiser = torch.optim.Adam([params], lr=settings.learning_rate)
    history = []
    for _ in range(settings.iterations):
        optimiser.zero_grad(set_to_none=True)
        grid = smooth(params)
        r2 = squared_residuals(grid)
        image = geman_mcclure(r2, scale2).mean() if scale2 > 0 else r2.mean()
        loss = image + settings.smoothness * diffusion(grid, settings.step_vox)
        loss.backward()
        optimiser.step()
        history.append(float(r2.detach().mean()))
    with torch.no_grad():
        grid = smooth(params).detach()
        final = squared_residuals(grid)
    summary = {
        "dissimilarity_before": round(history[0], 6) if history else None,
        "dissimilarity_after": round(float(final.mean()), 6),
        "max_vox": round(float(grid.abs().max()), 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return grid, summary
