"""Tests for preprocess: working grid, resampling, HU window, body mask, working pair and its checks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.registration.preprocess import (
    WorkingPair,
    body_mask,
    lung_mask,
    make_working_pair,
    moving_view,
    normalise_ct,
    resample_to,
    to_tensor,
    working_geometry,
)

LIVER = ("ct", "liver_ts_example_ct_sm_3mm.nii.gz")


def _liver() -> Image:
    """The real upper-abdominal CT slab (3 mm), with its path in meta."""
    path = shared_path(*LIVER)
    return Image.from_sitk(sitk.ReadImage(str(path)), meta={"path": str(path)})


def test_working_geometry_keeps_origin_direction_and_extent() -> None:
    rot = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    fixed = Geometry((320, 233, 188), (1.5, 1.5, 1.5), (-250.0, -136.7, -164.5), rot)
    g = working_geometry(fixed, 3.0)
    assert g.size == (160, 117, 94)
    assert g.spacing_mm == (3.0, 3.0, 3.0)
    assert g.origin_lps == fixed.origin_lps and g.direction == rot
    extent_fixed = np.asarray(fixed.size) * np.asarray(fixed.spacing_mm)
    extent_work = np.asarray(g.size) * 3.0
    assert np.all(extent_work >= extent_fixed - 1e-6) and np.all(extent_work < extent_fixed + 3.0)


@pytest.mark.parametrize("spacing", [0.05, 25.0, float("nan")])
def test_working_geometry_refuses_absurd_spacing(spacing: float) -> None:
    with pytest.raises(IkrError, match="spacing"):
        working_geometry(Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), spacing)


def test_resample_to_same_grid_is_identity_and_coarser_grid_keeps_intensities() -> None:
    image = _liver()
    same = resample_to(image, image.geometry)
    assert same.array.dtype == np.float32
    # identity transform on the same grid: only the antialiasing (none here) could change values
    np.testing.assert_allclose(same.array, image.array.astype(np.float32), atol=1e-3)
    coarse_geometry = working_geometry(image.geometry, 6.0)
    coarse = resample_to(image, coarse_geometry)
    assert coarse.array.shape == coarse_geometry.shape_zyx == (15, 51, 61)
    assert abs(float(coarse.array.mean()) - float(image.array.mean())) < 30.0
    label = resample_to(image.with_array((image.array > 0).astype(np.uint8)), coarse_geometry, 0, "nearest")
    assert set(np.unique(label.array)) <= {0, 1}


def test_normalise_ct_window() -> None:
    hu = np.array([-3024.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    out = normalise_ct(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])
    with pytest.raises(IkrError, match="window"):
        normalise_ct(hu, (100.0, 100.0))


def test_body_mask_holds_the_body_and_lung_bases_but_not_outside_air() -> None:
    image = _liver()
    mask = body_mask(image)
    assert mask.dtype == bool and mask.shape == image.array.shape
    _, count = ndimage.label(mask)
    assert count == 1
    # outside air (the volume's corners) is excluded, and lung bases (< -500 HU) inside are included
    assert not mask[:, 0, 0].any() and not mask[:, -1, -1].any()
    inside_dark = np.sum(mask & (image.array < -500))
    assert inside_dark > 1000
    assert np.mean(image.array[mask] > -500) > 0.9


def test_lung_mask_finds_the_phantom_lungs() -> None:
    from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom

    ct, labels, _ = make_phantom(seed=0)
    hu = resample_to(ct, working_geometry(ct.geometry, 3.0))
    truth = resample_to(labels, hu.geometry, 0.0, "nearest").array
    truth = (truth == 2) | (truth == 3) | ((truth == 8) & ndimage.binary_fill_holes((truth == 2) | (truth == 3)))
    mask = lung_mask(hu)
    dice = 2.0 * np.sum(mask & truth) / (mask.sum() + truth.sum())
    assert dice > 0.9


def test_lung_mask_of_a_thorax_and_none_in_an_abdomen() -> None:
    thorax = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "thorax_popi_T00_1p5mm.nii.gz"))))
    hu = resample_to(thorax, working_geometry(thorax.geometry, 3.0))
    lungs = lung_mask(hu)
    volume_ml = lungs.sum() * 27.0 / 1000.0
    assert 3000.0 < volume_ml < 7000.0  # both lungs at inspiration, airways included
    assert np.mean(hu.array[lungs] > -200.0) < 0.05  # hardly any soft tissue: no mediastinum
    # the abdomen (bowel gas, lung bases of about 120 ml) and the liver slab get no lung mask
    for name in ("abdomen_ts_example_ct_3mm.nii.gz", LIVER[1]):
        image = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", name))))
        assert not lung_mask(resample_to(image, working_geometry(image.geometry, 3.0))).any()


def test_make_working_pair_shapes_ranges_and_masks() -> None:
    image = _liver()
    pair = make_working_pair(image, image, 4.5, "cpu")
    assert isinstance(pair, WorkingPair)
    d, h, w = pair.geometry.shape_zyx
    for t in (pair.fixed, pair.moving):
        assert t.shape == (1, 1, d, h, w) and t.dtype == torch.float32
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert pair.fixed_mask.dtype == torch.bool and pair.fixed_mask.shape == (1, 1, d, h, w)
    assert 0.3 < float(pair.fixed_mask.float().mean()) < 0.95
    assert torch.equal(pair.fixed, pair.moving)


def test_make_working_pair_uses_given_mask_and_refuses_an_empty_one() -> None:
    image = _liver()
    liver = Image.from_sitk(sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_livermask.nii.gz"))))
    pair = make_working_pair(image, image, 3.0, "cpu", fixed_mask=liver)
    assert int(pair.fixed_mask.sum()) == int(np.sum(liver.array > 0))
    empty = liver.with_array(np.zeros_like(liver.array))
    empty.meta["path"] = "liver_empty.nii.gz"
    with pytest.raises(IkrError, match=r"liver_empty\.nii\.gz: .*empty"):
        make_working_pair(image, image, 3.0, "cpu", moving_mask=empty)


def test_make_working_pair_refuses_non_overlapping_images() -> None:
    image = _liver()
    g = image.geometry
    far = Geometry(g.size, g.spacing_mm, (g.origin_lps[0] + 5000.0, g.origin_lps[1], g.origin_lps[2]), g.direction)
    moving = Image(image.array, far, {"path": "far_away.nii.gz"})
    with pytest.raises(IkrError, match=r"far_away\.nii\.gz: .*does not overlap"):
        make_working_pair(image, moving, 3.0)


def test_make_working_pair_refuses_images_that_are_not_ct() -> None:
    image = _liver()
    scaled = image.with_array(((image.array.astype(np.float32) + 1024) / 3000).astype(np.float32))
    scaled.meta["path"] = "scaled.nii.gz"
    with pytest.raises(IkrError, match=r"scaled\.nii\.gz: .*value range check"):
        make_working_pair(image, scaled, 3.0)
    mr_like = image.with_array(np.clip(image.array.astype(np.float32) + 1024, 0, None) / 2)
    mr_like.meta["path"] = "mr_like.nii.gz"
    with pytest.raises(IkrError, match=r"mr_like\.nii\.gz: .*histogram check"):
        make_working_pair(image, mr_like, 3.0)


def test_to_tensor_shape_and_device() -> None:
    t = to_tensor(np.arange(24, dtype=np.int16).reshape(2, 3, 4), torch.device("cpu"))
    assert t.shape == (1, 1, 2, 3, 4) and t.dtype == torch.float32
    assert float(t[0, 0, 1, 2, 3]) == 23.0


def test_moving_view_matches_each_voxel_mapped_one_by_one() -> None:
    working = Geometry((14, 11, 9), (2.0, 2.0, 3.0), (-10.0, 4.0, 2.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    moving = Geometry((12, 13, 8), (2.5, 1.5, 3.0), (-4.0, 0.0, 30.0), (0, 1.0, 0, 1.0, 0, 0, 0, 0, -1.0))
    turn = sitk.Euler3DTransform((0.0, 10.0, 15.0), 0.1, -0.2, 0.3, (2.0, -3.0, 1.0))
    margin = 4.0
    view = moving_view(working, moving, turn, margin)
    z, y, x = np.meshgrid(*(np.arange(n) for n in working.shape_zyx), indexing="ij")
    index_xyz = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(float)
    mapped = np.array([turn.TransformPoint(p.tolist()) for p in working.index_to_lps(index_xyz)])
    at = moving.lps_to_index(mapped)
    size = np.asarray(moving.size)
    inside = np.all((at >= -0.5) & (at <= size - 0.5), axis=1)
    well = np.all((at >= margin / np.asarray(moving.spacing_mm) - 0.5), axis=1) & np.all(
        at <= size - 0.5 - margin / np.asarray(moving.spacing_mm), axis=1
    )
    edge = margin / np.asarray(working.spacing_mm)
    n = np.asarray(working.size)
    near = np.any(np.minimum(index_xyz, n - 1 - index_xyz) < edge, axis=1)
    expected = (inside & (well | near)).reshape(working.shape_zyx)
    assert 0 < expected.sum() < expected.size  # the test cuts through the grid
    assert np.array_equal(view, expected)
