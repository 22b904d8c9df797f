"""Tests for keypoints: Förstner distinctiveness, detection inside the mask, FPS spread, determinism."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.registration.keypoints import (
    farthest_point_sampling,
    forstner_distinctiveness,
    forstner_keypoints,
    lattice_keypoints,
)
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask, normalise_ct, to_tensor


def _liver_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The real liver slab (3 mm) normalised, and its body mask, as (1, 1, D, H, W) tensors."""
    image = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))))
    return to_tensor(normalise_ct(image.array)), to_tensor(body_mask(image)).bool()


def test_distinctiveness_peaks_at_a_corner_not_on_faces_or_flat_regions() -> None:
    vol = torch.zeros(1, 1, 24, 24, 24)
    vol[..., 8:, 8:, 8:] = 1.0  # a cube whose corner is at voxel (8, 8, 8)
    dist = forstner_distinctiveness(vol, sigma=1.4)[0, 0]
    corner = float(dist[7:10, 7:10, 7:10].max())
    face = float(dist[16, 16, 7:10].max())  # on the z=8 face, far from edges
    edge = float(dist[16, 7:10, 7:10].max())  # on the edge along z
    flat = float(dist[20, 20, 20])
    assert corner > 10 * max(face, edge, flat, 1e-12)
    assert flat == 0.0


def test_keypoints_inside_mask_bounded_and_deterministic() -> None:
    image, mask = _liver_tensors()
    points = forstner_keypoints(image, mask, max_points=60, seed=3)
    assert points.shape == (60, 3) and points.dtype == torch.float32
    idx = points.long()
    assert bool(mask[0, 0, idx[:, 2], idx[:, 1], idx[:, 0]].all())  # (x, y, z) order indexes (z, y, x)
    d, h, w = image.shape[2:]
    assert bool((points >= 2).all()) and bool((points <= torch.tensor([w - 3, h - 3, d - 3])).all())
    assert torch.equal(points, forstner_keypoints(image, mask, max_points=60, seed=3))
    assert len(torch.unique(points, dim=0)) == 60
    everything = forstner_keypoints(image, mask, max_points=100_000)
    assert 60 < everything.shape[0] < 100_000


def test_lattice_keypoints_fill_the_mask_evenly_near_the_requested_count() -> None:
    mask = torch.zeros(1, 1, 40, 50, 60, dtype=torch.bool)
    mask[0, 0, 5:35, 5:45, 5:55] = True  # 30 x 40 x 50 voxels; eroded by 2: 26 x 36 x 46
    points = lattice_keypoints(mask, 500)
    assert 250 <= points.shape[0] <= 500  # step ceil((26 * 36 * 46 / 500) ** (1 / 3)) = 5 voxels
    idx = points.long()
    assert bool(mask[0, 0, idx[:, 2], idx[:, 1], idx[:, 0]].all())
    assert bool((points >= 7).all())  # inside the mask eroded by 2 voxels
    steps = torch.unique(points[:, 0]).diff()
    assert bool((steps == steps[0]).all())  # a regular lattice
    assert lattice_keypoints(mask, 0).shape == (0, 3)
    assert lattice_keypoints(torch.zeros_like(mask), 100).shape == (0, 3)


def test_farthest_point_sampling_spreads_points() -> None:
    gen = torch.Generator().manual_seed(0)
    cluster = torch.rand(2000, 3, generator=gen) * 5.0
    outliers = torch.tensor([[100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])
    points = torch.cat([cluster, outliers])
    picked = farthest_point_sampling(points, 10, seed=5)
    assert picked.shape == (10,) and len(set(picked.tolist())) == 10
    assert {2000, 2001, 2002} <= set(picked.tolist())
    assert torch.equal(picked, farthest_point_sampling(points, 10, seed=5))
    assert torch.equal(farthest_point_sampling(points, 5000, seed=0), torch.arange(2003))


def test_fps_keypoints_are_better_spread_than_a_random_subset() -> None:
    image, mask = _liver_tensors()
    candidates = forstner_keypoints(image, mask, max_points=100_000)
    k = 40
    fps = candidates[farthest_point_sampling(candidates, k, seed=0)]
    rng = np.random.default_rng(0)
    random = candidates[torch.from_numpy(rng.choice(len(candidates), k, replace=False))]

    def min_gap(p: torch.Tensor) -> float:
        d = torch.cdist(p, p) + torch.eye(len(p)) * 1e9
        return float(d.min())

    assert min_gap(fps) > 2 * min_gap(random)
