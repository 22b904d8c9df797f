"""Margins of analytic spheres: concentric, shifted, partly outside, and through a known translation field."""

from __future__ import annotations

import numpy as np
import pytest

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.review.margin import compute_margin
from ImplicitKernelRegistrationLib.synthetic.tumour import ball_occupancy

ISO = (1.0, 1.0, 1.0)
ANISO = (0.7, 0.7, 2.5)
CENTRE = np.array([0.3, -0.4, 0.6])  # off the voxel centres


def grid(spacing: tuple[float, float, float], extent_mm: float = 60.0) -> Geometry:
    """A grid of about `extent_mm` centred near the origin."""
    size = tuple(int(np.ceil(extent_mm / s)) for s in spacing)
    origin = tuple(-0.5 * n * s for n, s in zip(size, spacing, strict=True))
    return Geometry(size, spacing, origin)


def binary_ball(g: Geometry, centre: np.ndarray, radius: float) -> Image:
    """A uint8 ball sampled at voxel centres."""
    inside = np.linalg.norm(g.grid_points_lps() - centre, axis=-1) <= radius
    return Image(inside.astype(np.uint8), g)


def fraction_ball(g: Geometry, centre: np.ndarray, radius: float) -> Image:
    """A partial-volume ball (fractions in [0, 1])."""
    return Image(ball_occupancy(g, centre, radius), g)


def lens_outside_ml(r_tumour: float, r_zone: float, d: float) -> float:
    """Volume (ml) of a ball of radius r_tumour outside a ball of radius r_zone, centres d apart."""
    big, small = r_zone, r_tumour
    cap = (
        np.pi
        * (big + small - d) ** 2
        * (d**2 + 2 * d * small - 3 * small**2 + 2 * d * big + 6 * small * big - 3 * big**2)
    )
    return (4 / 3 * np.pi * small**3 - cap / (12 * d)) / 1000.0


def test_concentric_binary_iso() -> None:
    g = grid(ISO)
    r = compute_margin(binary_ball(g, CENTRE, 10), binary_ball(g, CENTRE, 17), None)
    assert r.min_margin_mm == pytest.approx(7.0, abs=0.5)
    assert r.margin_p50_mm == pytest.approx(7.0, abs=0.3)
    assert r.surface_fractions == {0.0: 1.0, 5.0: 1.0}
    assert r.outside_volume_ml == pytest.approx(0.0, abs=1e-3)
    assert r.coverage_percent == pytest.approx(100.0, abs=0.1)
    assert r.tumour_volume_moving_ml == pytest.approx(4 / 3 * np.pi * 1e-3 * 1000, rel=0.03)


def test_concentric_fraction_aniso() -> None:
    g = grid(ANISO)
    r = compute_margin(fraction_ball(g, CENTRE, 10), fraction_ball(g, CENTRE, 17), None)
    assert r.min_margin_mm == pytest.approx(7.0, abs=0.5)
    assert r.margin_p50_mm == pytest.approx(7.0, abs=0.3)
    assert r.tumour_volume_warped_ml == pytest.approx(4.18879, rel=0.02)


def test_concentric_binary_aniso_is_limited_by_slice_sampling() -> None:
    # A binary mask places a surface parallel to the slices only to +- half a slice (1.25 mm) per
    # object: the margin at the poles may be off by up to 2 mm (+ in-plane error); elsewhere it is close.
    g = grid(ANISO)
    r = compute_margin(binary_ball(g, CENTRE, 10), binary_ball(g, CENTRE, 17), None)
    assert r.min_margin_mm == pytest.approx(7.0, abs=2.5)
    assert r.margin_p50_mm == pytest.approx(7.0, abs=0.3)


@pytest.mark.parametrize("spacing", [ISO, ANISO])
def test_shifted_tumour(spacing: tuple[float, float, float]) -> None:
    g = grid(spacing)
    make = binary_ball if spacing == ISO else fraction_ball
    shift = np.array([4.0, 0.0, 0.0])
    r = compute_margin(make(g, CENTRE + shift, 10), make(g, CENTRE, 17), None)
    assert r.min_margin_mm == pytest.approx(3.0, abs=0.5)
    direction = (r.min_margin_point_lps - CENTRE) / np.linalg.norm(r.min_margin_point_lps - CENTRE)
    assert direction[0] > 0.95  # the thinnest margin is on the side the tumour moved to
    assert 0.0 < r.surface_fractions[5.0] < 1.0


def test_partly_outside() -> None:
    g = grid(ISO, 70.0)
    d = 12.0
    r = compute_margin(fraction_ball(g, CENTRE + [d, 0, 0], 10), fraction_ball(g, CENTRE, 17), None)
    assert r.min_margin_mm == pytest.approx(17 - 10 - d, abs=0.5)
    expected = lens_outside_ml(10, 17, d)
    assert r.outside_volume_ml == pytest.approx(expected, rel=0.05)
    assert r.coverage_percent == pytest.approx(100 * (1 - expected / 4.18879), abs=1.5)
    assert r.surface_fractions[0.0] < 1.0


def test_translation_field_direction() -> None:
    # d = +4 mm in x maps fixed p to moving p + 4: the tumour at c + 2 (moving) sits at c - 2 in fixed
    # space, so the margin is 7 - 2 = 5 on the -x side (pushing the wrong way would give 1 on +x).
    g = grid(ISO)
    field = Field(np.broadcast_to(np.array([4.0, 0, 0], np.float32), (*g.shape_zyx, 3)).copy(), g)
    tumour = binary_ball(g, CENTRE + [2.0, 0, 0], 10)
    r = compute_margin(tumour, binary_ball(g, CENTRE, 17), field)
    assert r.min_margin_mm == pytest.approx(5.0, abs=0.5)
    assert r.min_margin_point_lps[0] < CENTRE[0] - 9.0
    assert not r.identity_field
    # A field that moves the tumour 4 mm further toward the boundary takes 4 mm off the margin.
    toward = Field(np.broadcast_to(np.array([6.0, 0, 0], np.float32), (*g.shape_zyx, 3)).copy(), g)
    r2 = compute_margin(tumour, binary_ball(g, CENTRE, 17), toward)
    assert r.min_margin_mm - r2.min_margin_mm == pytest.approx(2.0, abs=0.3)
    warped_centre = np.mean(r.warped_tumour.geometry.grid_points_lps()[r.warped_tumour.array > 0], axis=0)
    assert warped_centre == pytest.approx(CENTRE - [2.0, 0, 0], abs=0.2)


def test_thin_sheet_survives_half_voxel_shift() -> None:
    g = grid(ISO, 40.0)
    sheet = np.zeros(g.shape_zyx, np.uint8)
    sheet[20, 10:30, 10:30] = 1
    zone = binary_ball(g, np.zeros(3), 18)
    field = Field(np.broadcast_to(np.array([0, 0, 0.5], np.float32), (*g.shape_zyx, 3)).copy(), g)
    r = compute_margin(Image(sheet, g), zone, field)
    assert r.tumour_volume_warped_ml == pytest.approx(r.tumour_volume_moving_ml, rel=0.05)
    assert r.warped_tumour.array.sum() >= 400


def test_empty_masks_are_refused() -> None:
    g = grid(ISO, 30.0)
    empty = Image(np.zeros(g.shape_zyx, np.uint8), g)
    ball = binary_ball(g, np.zeros(3), 8)
    with pytest.raises(IkrError, match="tumour.nii.gz: the tumour mask is empty"):
        compute_margin(empty, ball, None, names=("tumour.nii.gz", "zone.nii.gz", None))
    with pytest.raises(IkrError, match="zone.nii.gz: the ablation-zone mask is empty"):
        compute_margin(ball, empty, None, names=("tumour.nii.gz", "zone.nii.gz", None))


def test_tumour_leaving_the_field_of_view_is_refused() -> None:
    g = grid(ISO, 40.0)
    tumour, zone = binary_ball(g, np.zeros(3), 6), binary_ball(g, np.zeros(3), 12)
    field = Field(np.broadcast_to(np.array([0, 0, 15.0], np.float32), (*g.shape_zyx, 3)).copy(), g)
    with pytest.raises(IkrError, match="t.nrrd: .*field of view"):
        compute_margin(tumour, zone, field, names=("t.nrrd", "a.nrrd", "f.h5"))
    far = Field(np.broadcast_to(np.array([0, 0, 80.0], np.float32), (*g.shape_zyx, 3)).copy(), g)
    with pytest.raises(IkrError, match="field of view"):
        compute_margin(tumour, zone, far, names=("t.nrrd", "a.nrrd", "f.h5"))
