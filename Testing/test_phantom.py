"""The procedural CT phantom: deterministic, LPS-centred, with the documented anatomy and HU per label."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ImplicitKernelRegistrationLib.synthetic.phantom import LABEL_NAMES, make_phantom


@pytest.fixture(scope="module")
def phantom() -> tuple:
    """The default phantom (seed 0)."""
    return make_phantom(0)


def test_same_seed_same_phantom_other_seed_differs(phantom: tuple) -> None:
    """A seed fixes the phantom; another seed changes noise and anatomy."""
    ct, labels, _ = phantom
    ct2, labels2, _ = make_phantom(0)
    np.testing.assert_array_equal(ct.array, ct2.array)
    np.testing.assert_array_equal(labels.array, labels2.array)
    ct3, labels3, _ = make_phantom(1)
    assert np.mean(ct.array != ct3.array) > 0.5  # fresh noise everywhere
    assert np.mean(labels.array != labels3.array) > 0.005  # anatomy jittered


def test_grid_is_lps_centred_identity(phantom: tuple) -> None:
    """Default grid: centred at the LPS origin, identity direction, int16 CT, uint8 labels 0-10."""
    ct, labels, names = phantom
    geo = ct.geometry
    assert geo.size == (128, 112, 96)
    assert geo.spacing_mm == (2.5, 2.5, 2.5)
    np.testing.assert_allclose(geo.direction_matrix, np.eye(3))
    np.testing.assert_allclose(geo.corners_lps().mean(axis=0), 0.0, atol=1e-9)
    assert ct.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert labels.geometry == geo
    assert names == LABEL_NAMES
    assert set(np.unique(labels.array)) == {0, *names}


def test_other_size_and_spacing() -> None:
    """Another size and spacing give the same anatomy on that grid."""
    ct, labels, _ = make_phantom(2, size=(64, 56, 48), spacing_mm=(5.0, 5.0, 5.0))
    assert ct.array.shape == (48, 56, 64) == labels.array.shape
    assert {2, 3, 4, 6, 7}.issubset(set(np.unique(labels.array)))


# label -> (low, high) for the median HU of its voxels, as documented in phantom.py (noise included)
HU_RANGES = {
    0: (-1010, -990),
    1: (-120, 60),
    2: (-900, -800),
    3: (-900, -800),
    4: (45, 75),
    5: (0, 45),
    6: (25, 170),
    7: (350, 950),
    8: (-500, 60),
    9: (-1000, 30),
    10: (20, 50),
}


def test_hu_per_label_in_documented_ranges(phantom: tuple) -> None:
    """The median HU of every label lies in the range documented in phantom.py."""
    ct, labels, _ = phantom
    for label, (low, high) in HU_RANGES.items():
        values = ct.array[labels.array == label]
        assert values.size > 0, label
        assert low <= np.median(values) <= high, (label, np.median(values))


def test_noise_level_in_homogeneous_tissue(phantom: tuple) -> None:
    """Liver parenchyma carries noise of roughly the documented 15 HU."""
    ct, labels, _ = phantom
    core = ndimage.binary_erosion(labels.array == 4, iterations=3)
    std = float(ct.array[core].std())
    assert 8.0 < std < 25.0


def test_anatomy_sides_and_heights(phantom: tuple) -> None:
    """Left lung at +x, liver on the right below the right lung, spine posterior."""
    ct, labels, _ = phantom
    pts = ct.geometry.grid_points_lps()
    centroid = {k: pts[labels.array == k].mean(axis=0) for k in (2, 3, 4, 6)}
    assert centroid[2][0] > 20.0 and centroid[3][0] < -20.0  # LPS +x is the patient's left
    assert centroid[4][0] < 0.0  # liver on the right
    assert centroid[4][2] < centroid[3][2] - 40.0  # liver below the right lung
    spine = pts[(labels.array == 7) & (np.abs(pts[..., 0]) < 10.0)]
    assert np.median(spine[:, 1]) > 30.0  # the spine is posterior (+y)


def test_lesion_is_a_small_ball_inside_the_liver(phantom: tuple) -> None:
    """The lesion is an 8-12 mm ball surrounded by liver and darker than it."""
    ct, labels, _ = phantom
    lesion = labels.array == 5
    radius = (3.0 * lesion.sum() * ct.geometry.voxel_volume_ml() * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    assert 6.0 <= radius <= 12.5
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
    assert np.mean(np.isin(labels.array[shell], (4, 5))) > 0.8  # surrounded by liver
    assert np.median(ct.array[shell & (labels.array == 4)]) - np.median(ct.array[lesion]) > 20  # hypodense


def test_lungs_hold_a_branching_vessel_tree(phantom: tuple) -> None:
    """Both lungs hold vessels, with many separate cross-sections (branching)."""
    ct, labels, _ = phantom
    vessels = labels.array == 8
    lungs_near = ndimage.binary_dilation(np.isin(labels.array, (2, 3)), iterations=3)
    assert np.all(lungs_near[vessels])  # the tree stays in the lungs
    for side in (1, -1):
        in_side = vessels & (np.sign(ct.geometry.grid_points_lps()[..., 0]) == side)
        assert in_side.sum() > 300
    # many branches: vessel cross-sections in axial slices are numerous (a few trunks would give few)
    sections = sum(ndimage.label(vessels[z])[1] for z in range(vessels.shape[0]))
    assert sections > 400
