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
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .adam import Adam
from .features import points_to_grid
from .kernel import control_axes


@dataclass(frozen=True)
class ResidualSettings:
    """How the residual is fitted (see the module docstring); iterations 0 switches it off."""

    iterations: int = 20
    step_vox: int = 3
    learning_rate: float = 0.045
    smoothness: float = 0.2
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
    """Two 3x3x3 box filters (edges replicated) of a (1, 3, z, y, x) grid: the residual's smoothing.

    Each box filter is three 3-tap means, one per axis (separable; the same values as a 3x3x3 average pool of the
    replicate-padded grid, and on a CPU about five times faster with its backward).
    """
    for _ in range(2):
        for axis in (2, 3, 4):
            grid = _box3(grid, axis)
    return grid


def _box3(grid: torch.Tensor, axis: int) -> torch.Tensor:
    """The mean of each node and its two neighbours along `axis`, the end nodes repeated beyond the ends."""
    n = grid.shape[axis]
    padded = torch.cat([grid.narrow(axis, 0, 1), grid, grid.narrow(axis, n - 1, 1)], dim=axis)
    return (padded.narrow(axis, 0, n) + padded.narrow(axis, 1, n) + padded.narrow(axis, 2, n)) / 3.0


def sample_grid(grid: torch.Tensor, points_xyz: torch.Tensor, working_zyx: tuple[int, int, int]) -> torch.Tensor:
    """A (1, C, z, y, x) grid spanning the working grid, sampled trilinearly at (N, 3) working voxels -> (N, C)."""
    coords = points_to_grid(points_xyz, working_zyx).reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(grid.shape[1], -1).t()


@dataclass(frozen=True)
class SparseMap:
    """A fixed linear map from G rows to N rows as a sparse CSR matrix (N, G) and its transpose.

    A fit that applies the same map every iteration (the residual's trilinear sampling at its points, the key
    optimisation's frozen kernel weights) then costs one sparse product forward and one backward: on a CPU about a
    third of grid_sample's, and unlike index_add (the backward of indexing) deterministic with several threads.
    """

    matrix: torch.Tensor
    transpose: torch.Tensor


def sparse_map(columns: torch.Tensor, weights: torch.Tensor, n_columns: int) -> SparseMap:
    """The map whose row i is sum_k weights[i, k] x input row columns[i, k] (repeated columns add up)."""
    n, k = columns.shape
    rows = torch.arange(n, device=columns.device).repeat_interleave(k)
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, columns.reshape(-1)]), weights.reshape(-1).float(), (n, n_columns), check_invariants=False
    ).coalesce()
    with warnings.catch_warnings():  # torch calls its sparse CSR layout beta; its products are long standing
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return SparseMap(coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr())


class _Mapped(torch.autograd.Function):
    """matrix @ x, differentiable in x (the gradient: transpose @ the output's gradient)."""

    @staticmethod
    def forward(ctx, linear: SparseMap, x: torch.Tensor) -> torch.Tensor:
        """The mapped rows (N, C) of x (G, C)."""
        ctx.linear = linear
        return linear.matrix @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        """x's gradient."""
        return None, ctx.linear.transpose @ grad


def apply_map(linear: SparseMap, x: torch.Tensor) -> torch.Tensor:
    """linear's matrix @ x (G, C) -> (N, C), differentiable in x."""
    return _Mapped.apply(linear, x)


def point_sampling(
    points_xyz: torch.Tensor, grid_zyx: tuple[int, int, int], working_zyx: tuple[int, int, int]
) -> SparseMap:
    """Trilinear sampling of a grid of `grid_zyx` nodes spanning the working grid at (N, 3) working-voxel points
    (clamped to the grid, as grid_sample's border padding), as a map of the grid's nodes (z, y, x order)."""
    device = points_xyz.device
    nodes = torch.tensor(grid_zyx[::-1], dtype=torch.float64, device=device)  # x y z
    size = torch.tensor(working_zyx[::-1], dtype=torch.float64, device=device)
    scale = torch.where(size > 1, (nodes - 1) / (size - 1).clamp_min(1.0), torch.zeros_like(size))
    q = torch.minimum((points_xyz.double() * scale).clamp_min(0.0), nodes - 1)
    low = torch.minimum(q.floor(), (nodes - 2).clamp_min(0.0))
    frac = (q - low).float()
    low = low.long()
    high = torch.minimum(low + 1, (nodes - 1).long())
    _, gy, gx = grid_zyx
    columns, weights = [], []
    for z, wz in ((low[:, 2], 1 - frac[:, 2]), (high[:, 2], frac[:, 2])):
        for y, wy in ((low[:, 1], 1 - frac[:, 1]), (high[:, 1], frac[:, 1])):
            for x, wx in ((low[:, 0], 1 - frac[:, 0]), (high[:, 0], frac[:, 0])):
                columns.append((z * gy + y) * gx + x)
                weights.append(wz * wy * wx)
    return sparse_map(torch.stack(columns, 1), torch.stack(weights, 1), grid_zyx[0] * gy * gx)


def sample_at(sampling: SparseMap, grid: torch.Tensor) -> torch.Tensor:
    """A (1, C, z, y, x) grid sampled at the points of a `point_sampling` map (N, C); the values of `sample_grid`."""
    return apply_map(sampling, grid[0].reshape(grid.shape[1], -1).t())


def channels_last(volume: torch.Tensor) -> torch.Tensor:
    """A (1, C, D, H, W) volume as a (D * H * W, C) table, rows in z, y, x order (for `sample_rows`): a view of a
    volume in torch.channels_last_3d memory format, a copy of any other."""
    return volume[0].permute(1, 2, 3, 0).reshape(-1, volume.shape[1])


def sample_rows(table: torch.Tensor, shape_zyx: tuple[int, int, int], points_xyz: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation (N, C) of a `channels_last` table at (N, 3) voxel points, border clamped.

    Differentiable in the points (not in the table); unlike grid_sample's backward it never builds a gradient the
    size of the volume, which made the residual's iterations ten times slower on a CPU.
    """
    return _TrilinearRows.apply(table, shape_zyx, points_xyz)


class _TrilinearRows(torch.autograd.Function):
    """`sample_rows` with its gradient in the points computed in the forward pass, from the same eight corner rows.

    The corners are read with index_select (three times faster on a CPU than indexing); the backward is one
    product with the saved (N, C, 3) gradient instead of the autograd graph of the eight weighted corners.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, shape_zyx: tuple[int, int, int], points_xyz: torch.Tensor) -> torch.Tensor:
        """The interpolated rows (N, C); saves their gradient in the points when one is needed."""
        value, gradient = trilinear_with_gradient(table, shape_zyx, points_xyz.detach(), ctx.needs_input_grad[2])
        ctx.save_for_backward(gradient)
        return value

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        """The points' gradient: the output's gradient through the saved d(rows)/d(point)."""
        (gradient,) = ctx.saved_tensors
        return None, None, torch.bmm(grad_out[:, None, :], gradient)[:, 0]


def trilinear_with_gradient(
    table: torch.Tensor, shape_zyx: tuple[int, int, int], points_xyz: torch.Tensor, with_gradient: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trilinear rows (N, C) of a `channels_last` table at (N, 3) voxel points, border clamped, and (with_gradient)
    their derivative (N, C, 3) in x, y, z: zero along an axis where the point lies outside the grid (clamped)."""
    d, h, w = shape_zyx
    upper = torch.tensor([w - 1, h - 1, d - 1], dtype=points_xyz.dtype, device=points_xyz.device)
    p = torch.minimum(points_xyz.clamp_min(0.0), upper)
    low = torch.minimum(p.floor(), (upper - 1).clamp_min(0.0))
    frac = p - low
    x0, y0, z0 = low.long().unbind(1)
    x1, y1, z1 = (x0 + 1).clamp_max(w - 1), (y0 + 1).clamp_max(h - 1), (z0 + 1).clamp_max(d - 1)
    fx, fy, fz = (f[:, None] for f in frac.unbind(1))

    # along x, then y, then z, in place on the freshly gathered corner rows (the stage is memory bound: every pass
    # over the (N, C) rows counts); the derivative along an axis is the difference of the two sides it interpolates
    along_x = {}
    for zi, z in ((0, z0), (1, z1)):
        for yi, y in ((0, y0), (1, y1)):
            row = (z * h + y) * w
            v0, v1 = table.index_select(0, row + x0), table.index_select(0, row + x1)
            dx = v1.sub_(v0)
            along_x[zi, yi] = (v0.addcmul_(fx, dx), dx)
    along_y = {}
    for zi in (0, 1):
        (a0, dx0), (a1, dx1) = along_x[zi, 0], along_x[zi, 1]
        dy = a1.sub_(a0)
        along_y[zi] = (a0.addcmul_(fy, dy), dx0.addcmul_(fy, dx1.sub_(dx0)), dy)
    (b0, bx0, by0), (b1, bx1, by1) = along_y[0], along_y[1]
    dz = b1.sub_(b0)
    if not with_gradient:
        return b0.addcmul_(fz, dz), None
    gradient = torch.empty(*b0.shape, 3, dtype=b0.dtype, device=b0.device)
    torch.addcmul(bx0, fz, bx1.sub_(bx0), out=gradient[:, :, 0])
    torch.addcmul(by0, fz, by1.sub_(by0), out=gradient[:, :, 1])
    gradient[:, :, 2] = dz
    inside = ((points_xyz >= 0) & (points_xyz <= upper)).to(b0.dtype)  # (N, 3): zero where clamped
    return b0.addcmul_(fz, dz), gradient.mul_(inside[:, None, :])


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
        # a draw without replacement (numpy's, Floyd's algorithm: milliseconds, where a permutation of every voxel of
        # the mask took a tenth of a second)
        draw = np.random.default_rng(seed).choice(index.numel(), size=count, replace=False, shuffle=False)
        pick = torch.from_numpy(draw).to(index.device)
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
    sampling = point_sampling(points, shape, working)  # type: ignore[arg-type]

    def squared_residuals(grid: torch.Tensor) -> torch.Tensor:
        """Each point's mean squared descriptor difference (N,) under the kernel field plus `grid`."""
        warped = sample_rows(moving, working, points + base_at + sample_at(sampling, grid))  # type: ignore[arg-type]
        return (warped - target).square().mean(dim=1)

    scale2 = 0.0
    if settings.robust > 0:  # Geman-McClure, as the key optimisation
        with torch.no_grad():
            scale2 = robust_scale(squared_residuals(torch.zeros_like(params)), settings.robust)
    optimiser = Adam(params, lr=settings.learning_rate)
    history = []
    for _ in range(settings.iterations):
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
