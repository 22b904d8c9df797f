"""Instance optimisation of the key displacements through the kernel, against the images.

After the last matching scale the field is u = kernel(keys). This stage keeps the keys' positions,
confidences and the kernel, and adjusts their displacements D (N, 3), starting from the matched ones
D0, so that the field they give fits the images better:

    mean over sample points x of |F(x) - M(x + u_D(x))|^2                      (MIND-SSC SSD)
      + smoothness * mean over keys of |e_i - mean of e_j over i's G nearest keys|^2
      + anchor * mean over keys of (c_i / mean c) |e_i|^2

(with `robust` > 0 each point's SSD r^2 enters as s r^2 / (r^2 + s), s = robust^2 x the median r^2 at the
matched keys: Geman-McClure, so that points no displacement explains, an ablation zone or a contrast change,
weigh less)

with e = D - D0 the change of the keys (working voxels) and c the match confidences. F and M are the
MIND-SSC descriptors of the fixed and moving working images (the pipeline's own), x voxels of the
fixed mask. The kernel's attention weights at the sample points are computed once, at the matched
keys, and held fixed: the learned kernel is then linear in D (`LearnedKernel.neighbour_weights`), so
an iteration costs a gather and a trilinear sampling; the kernel runs once more than without this
stage, at the sample points only. At the end the model is built from the new keys through the real
kernel (`DenseModel.set_keys`): the field is still kernel(keys), so a clicked pair stays one more key
and refinement (refine.py) reproduces it exactly, as before; the new displacements are what the
registration's correspondences carry.
Everything is in working voxels (x, y, z), on whatever device the model lives on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .adam import Adam
from .dense import DenseModel
from .features import sample_features
from .kernel import knn
from .residual import apply_map, channels_last, geman_mcclure, robust_scale, sample_points, sample_rows, sparse_map

GRAPH_NEIGHBOURS = 8  # G: the keys a key's change is compared with by the smoothness term


@dataclass(frozen=True)
class KeyOptimisationSettings:
    """How the key displacements are optimised (see the module docstring); iterations 0 switches it off."""

    iterations: int = 25
    learning_rate: float = 0.05
    points: int = 16384
    smoothness: float = 0.01
    anchor: float = 0.001
    robust: float = 2.0


def control_jacobian(grid: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """det(I + grad u) by forward differences on a (1, 3, z, y, x) control grid of displacements (working voxels,
    channels x y z); `spacing` (x, y, z): working voxels between control nodes. (z-1, y-1, x-1) determinants."""
    g = grid[0]
    dx = (g[:, :-1, :-1, 1:] - g[:, :-1, :-1, :-1]) / spacing[0]
    dy = (g[:, :-1, 1:, :-1] - g[:, :-1, :-1, :-1]) / spacing[1]
    dz = (g[:, 1:, :-1, :-1] - g[:, :-1, :-1, :-1]) / spacing[2]
    a, b, c = dx[0] + 1, dy[0], dz[0]
    d, e, f = dx[1], dy[1] + 1, dz[1]
    h, i, j = dx[2], dy[2], dz[2] + 1
    return a * (e * j - f * i) - b * (d * j - f * h) + c * (d * i - e * h)


def control_spacing(model: DenseModel) -> tuple[float, float, float]:
    """Working voxels between neighbouring control nodes along x, y, z."""
    pairs = zip(model.working.shape_zyx[::-1], model.control_shape[::-1], strict=True)
    return tuple((n - 1) / max(1, m - 1) for n, m in pairs)  # type: ignore[return-value]


def optimise_keys(
    model: DenseModel,
    keys: torch.Tensor,
    matched: torch.Tensor,
    conf: torch.Tensor,
    moving_features: torch.Tensor,
    mask: torch.Tensor,
    settings: KeyOptimisationSettings,
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Optimise the key displacements (N, 3) against the images, starting from the matched ones; set the keys in the
    model (as `set_keys` does) and return the new displacements with a summary of the fit.

    keys, matched, conf: positions, displacements (working voxels) and confidences of the keys; moving_features:
    the moving image's MIND-SSC (1, C, D, H, W) on the working grid (the fixed image's are the model's own
    features); mask (1, 1, D, H, W) bool: where the image term is measured.
    """
    if model.features is None:
        raise ValueError("the key optimisation needs the fixed image's features")
    start = time.perf_counter()
    working = model.working.shape_zyx
    points = sample_points(mask, settings.points, seed).to(model.device)
    index, weights = model.point_weights(points, keys, matched, conf)
    keys, matched, conf = model.keys, model.disp, model.conf
    with torch.no_grad():
        target = sample_features(model.features, points)
        graph = knn(keys[None], keys[None], GRAPH_NEIGHBOURS + 1)[0][:, 1:]
    moving = channels_last(moving_features.float())
    trust = (conf / conf.mean().clamp_min(1e-6))[:, None]
    kernel_map = sparse_map(index, weights, keys.shape[0])  # the field at the points = kernel_map @ displacements

    def squared(disp: torch.Tensor) -> torch.Tensor:
        """Each sample point's mean MIND-SSC squared difference (N,) under the field of these key displacements."""
        field = apply_map(kernel_map, disp)
        return (sample_rows(moving, working, points + field) - target).square().mean(dim=1)

    def image_term(disp: torch.Tensor) -> torch.Tensor:
        """Mean MIND-SSC SSD at the sample points of the field of key displacements (frozen weights)."""
        return squared(disp).mean()

    objective = image_term
    if settings.robust > 0:  # points that no displacement explains (a lesion, a contrast change) weigh less
        with torch.no_grad():
            scale2 = robust_scale(squared(matched), settings.robust)

        def objective(disp: torch.Tensor) -> torch.Tensor:
            """The image term with each point's SSD r^2 through Geman-McClure, scale2 r^2 / (r^2 + scale2)."""
            return geman_mcclure(squared(disp), scale2).mean()

    smooth = settings.smoothness > 0 and graph.shape[1] > 0
    if smooth:  # each key's change against the mean change of its G nearest keys
        share = torch.full(graph.shape, 1.0 / graph.shape[1], device=graph.device)
        neighbour_mean = sparse_map(graph, share, keys.shape[0])
    change = torch.zeros_like(matched, requires_grad=True)
    optimiser = Adam(change, lr=settings.learning_rate)
    with torch.enable_grad():  # the pipeline runs under no_grad
        for _ in range(settings.iterations):
            loss = objective(matched + change)
            if smooth:
                rough = change - apply_map(neighbour_mean, change)
                loss = loss + settings.smoothness * rough.square().sum(dim=1).mean()
            if settings.anchor > 0:
                loss = loss + settings.anchor * (trust * change.square()).sum(dim=1).mean()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        new = (matched + change).detach()
        before, after = float(image_term(matched)), float(image_term(new))
        model.set_keys(keys, new, conf)
        min_det = float(control_jacobian(model.control_volume(), control_spacing(model)).min())
        moved = (new - matched).norm(dim=1)
    summary = {
        "iterations": settings.iterations,
        "points": int(points.shape[0]),
        "dissimilarity_before": round(before, 6),
        "dissimilarity_after": round(after, 6),
        "key_change_vox_mean": round(float(moved.mean()), 3),
        "key_change_vox_max": round(float(moved.max()), 3),
        "min_control_jacobian": round(min_det, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return new, summary
