"""Refinement: a clicked pair is reproduced, the update is local, removal and undo are exact."""

from __future__ import annotations

import numpy as np
import pytest

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import transform_points
from ImplicitKernelRegistrationLib.registration.refine import session_from_result


@pytest.fixture
def session(phantom_case, phantom_registration):
    """A fresh refinement session on the phantom registration."""
    return session_from_result(phantom_registration, phantom_case.fixed)


def test_session_starts_from_the_registered_field(session, phantom_registration):
    assert np.array_equal(session.field.displacement_mm, phantom_registration.field.displacement_mm)


def test_added_pairs_are_reproduced_within_half_a_millimetre(session, phantom_case):
    p = phantom_case.landmarks_fixed_lps[:5]
    q = phantom_case.landmarks_moving_lps[:5] + np.array([1.5, -1.0, 2.0])  # deliberately off the automatic field
    session.add_correspondences(p, q)
    assert np.all(np.linalg.norm(transform_points(session.field, p) - q, axis=1) < 0.5)
    assert all(item["residual_mm"] < 0.5 for item in session.feedback())


def test_update_is_local(session, phantom_case):
    before = session.field.displacement_mm.copy()
    p = phantom_case.landmarks_fixed_lps[:1]
    session.add_correspondences(p, phantom_case.landmarks_moving_lps[:1] + 3.0)
    changed = np.any(session.field.displacement_mm != before, axis=-1)
    assert changed.any()
    assert changed.mean() < 0.25  # most of the volume is untouched
    # only control points whose K nearest keys include the pair are recomputed; with K = 30 those
    # reach far where keypoints are sparse, but far from the pair (beyond 60 mm) the change is
    # negligible: under 1 % of the change at the pair
    pts = session.target.grid_points_lps()
    far = np.linalg.norm(pts - p[0], axis=-1) > 60.0
    moved = np.linalg.norm(session.field.displacement_mm - before, axis=-1)
    assert moved[far].max() < 0.01 * moved.max()


def test_local_update_equals_full_rebuild(session, phantom_case, phantom_registration):
    from ImplicitKernelRegistrationLib.registration.refine import RefinementSession

    session.add_correspondences(phantom_case.landmarks_fixed_lps[:3], phantom_case.landmarks_moving_lps[:3] + 2.0)
    full = RefinementSession(
        phantom_registration.model, phantom_case.fixed.geometry, phantom_registration.correspondences, session.pairs
    )
    assert np.allclose(full.field.displacement_mm, session.field.displacement_mm, atol=1e-4)


def test_remove_and_undo_restore_the_field_exactly(session, phantom_case):
    original = session.field.displacement_mm.copy()
    ids = session.add_correspondences(phantom_case.landmarks_fixed_lps[:2], phantom_case.landmarks_moving_lps[:2] + 2)
    with_pairs = session.field.displacement_mm.copy()
    session.remove_correspondence(ids[1])
    session.remove_correspondence(ids[0])
    assert np.allclose(session.field.displacement_mm, original, atol=1e-5)
    session.undo()
    session.undo()
    assert np.array_equal(session.field.displacement_mm, with_pairs)
    session.undo()
    session.undo()
    assert np.array_equal(session.field.displacement_mm, original)
    assert session.pairs == []


def test_a_moved_pair_keeps_its_id_label_and_place_and_one_undo_restores_it(session, phantom_case):
    """A dragged point (issue 21): the pair moves as one undo step, exactly reproduced where it now is."""
    p, q = phantom_case.landmarks_fixed_lps[:2], phantom_case.landmarks_moving_lps[:2] + 1.0
    ids = session.add_correspondences(p, q, ["first", "second"])
    placed = session.field.displacement_mm.copy()
    disagreement = session.feedback()[0]["disagreement_mm"]
    new_p, new_q = p[0] + np.array([0.0, 0.0, 3.0]), q[0] + np.array([2.0, 0.0, 3.0])
    session.move_correspondence(ids[0], new_p, new_q)
    assert [(x.id, x.label) for x in session.pairs] == [(ids[0], "first"), (ids[1], "second")]
    assert np.linalg.norm(transform_points(session.field, new_p[None])[0] - new_q) < 0.5
    assert session.feedback()[0]["disagreement_mm"] != disagreement
    assert len(session.history) == 3  # two adds, one move
    session.undo()
    assert np.array_equal(session.field.displacement_mm, placed)
    np.testing.assert_array_equal(session.pairs[0].fixed_lps, p[0])
    assert [x.id for x in session.pairs] == ids and session.feedback()[0]["disagreement_mm"] == disagreement


def test_edits_of_one_step_are_undone_together_even_when_one_fails(session, phantom_case):
    before = session.field.displacement_mm.copy()
    p, q = phantom_case.landmarks_fixed_lps[:2], phantom_case.landmarks_moving_lps[:2] + 1.0
    with pytest.raises(IkrError, match="no user pair"), session.one_step():
        session.add_correspondences(p, q)  # two adds, one step
        with session.one_step():  # nested: still the outer step
            session.remove_correspondence(session.pairs[0].id)
        session.remove_correspondence(42)
    assert len(session.pairs) == 1 and len(session.history) == 1
    session.undo()
    assert np.array_equal(session.field.displacement_mm, before) and session.pairs == []


def test_a_wild_pair_is_kept_but_warned_about(session, phantom_case):
    p = phantom_case.landmarks_fixed_lps[:1]
    session.add_correspondences(p, p + np.array([[25.0, 0.0, 0.0]]))
    item = session.feedback()[0]
    assert item["warnings"], item
    assert len(session.pairs) == 1


def test_bad_clicks_are_refused_and_the_session_is_unchanged(session, phantom_case):
    p = phantom_case.landmarks_fixed_lps[:2]
    before = session.field.displacement_mm.copy()
    with pytest.raises(IkrError, match="NaN"):
        session.add_correspondences(np.array([[np.nan, 0, 0]]), p[:1])
    with pytest.raises(IkrError, match="partner"):
        session.add_correspondences(p, p[:1])
    with pytest.raises(IkrError, match="outside"):
        session.add_correspondences(p[:1] + 5000.0, p[:1])
    with pytest.raises(IkrError, match="no user pair"):
        session.remove_correspondence(42)
    with pytest.raises(IkrError, match="nothing to undo"):
        session.undo()
    assert np.array_equal(session.field.displacement_mm, before)
    assert session.pairs == []


# ----------------------------------------------------------------------- region-aware (lungs)


@pytest.fixture(scope="module")
def lung_registration(phantom_case):
    """The phantom case registered at 3 mm with region-aware neighbourhoods (its automatic lung mask)."""
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register

    config = RegistrationConfig(kernel="gaussian", spacing_mm=3.0, max_keypoints=1024, lung_regions=True)
    return register(phantom_case.fixed, phantom_case.moving, config)


def _near_pleura(session, inside: bool, distance_mm: float = 4.0) -> np.ndarray:
    """A fixed point (1, 3) LPS about `distance_mm` from the lung boundary, inside or outside the lungs."""
    from scipy import ndimage

    lungs = session.model.target_weights(session.target)[1] > 0.5
    side = lungs if inside else ~lungs
    depth = ndimage.distance_transform_edt(side, sampling=session.target.spacing_mm[::-1])
    centre = np.asarray(session.target.size[::-1]) / 2.0
    candidates = np.argwhere(side & (np.abs(depth - distance_mm) < 1.0))
    zyx = candidates[np.argmin(np.linalg.norm(candidates - centre, axis=1))]  # central, away from the volume's edge
    return session.target.index_to_lps(zyx[::-1][None].astype(np.float64))


def test_the_report_lists_the_lung_mask_with_its_volume(lung_registration):
    line = lung_registration.report["masks"]["lungs"]
    assert "automatic lung mask" in line and " ml" in line
    assert lung_registration.model.n_regions == 2


def test_a_click_near_the_pleura_is_exact_and_stays_on_its_side(lung_registration, phantom_case):
    session = session_from_result(lung_registration, phantom_case.fixed)
    lung_weight = session.model.target_weights(session.target)[1]  # 1 in the lungs, 0 beyond a few mm outside
    before = session.field.displacement_mm.copy()
    p = _near_pleura(session, inside=True)
    q = transform_points(session.field, p) + np.array([[2.5, -1.5, 3.0]])  # the lung slides here
    session.add_correspondences(p, q)
    assert np.linalg.norm(transform_points(session.field, p) - q) < 0.5
    assert session.feedback()[0]["residual_mm"] < 0.5
    moved = np.linalg.norm(session.field.displacement_mm - before, axis=-1) > 1e-6
    near = np.linalg.norm(session.target.grid_points_lps() - p[0], axis=-1) < 20.0
    assert moved[near & (lung_weight == 1)].any()
    assert not moved[near & (lung_weight == 0)].any()  # the chest wall a few mm away did not follow
    # and from the other side: a click in the chest wall leaves the lung as it was
    session.undo()
    assert np.array_equal(session.field.displacement_mm, before)
    p_out = _near_pleura(session, inside=False)
    session.add_correspondences(p_out, transform_points(session.field, p_out) + 2.0)
    assert session.feedback()[0]["residual_mm"] < 0.5
    moved = np.linalg.norm(session.field.displacement_mm - before, axis=-1) > 1e-6
    near = np.linalg.norm(session.target.grid_points_lps() - p_out[0], axis=-1) < 20.0
    assert moved[near & (lung_weight == 0)].any()
    assert not moved[near & (lung_weight == 1)].any()


def test_region_aware_local_update_equals_full_rebuild(lung_registration, phantom_case):
    from ImplicitKernelRegistrationLib.registration.refine import RefinementSession

    session = session_from_result(lung_registration, phantom_case.fixed)
    fixed = np.concatenate([_near_pleura(session, True), _near_pleura(session, False, 6.0)])
    session.add_correspondences(fixed, transform_points(session.field, fixed) + 2.0)
    full = RefinementSession(
        lung_registration.model, phantom_case.fixed.geometry, lung_registration.correspondences, session.pairs
    )
    assert np.allclose(full.field.displacement_mm, session.field.displacement_mm, atol=1e-4)
    assert all(item["residual_mm"] < 0.5 for item in full.feedback())


def test_a_region_aware_session_reopens_with_its_regions(lung_registration, phantom_case):
    from ImplicitKernelRegistrationLib.registration.refine import open_session

    session = session_from_result(lung_registration, phantom_case.fixed)
    p = _near_pleura(session, inside=True)
    session.add_correspondences(p, transform_points(session.field, p) + 2.0)
    saved = {
        "config": lung_registration.report["config"],
        "working_geometry": lung_registration.working_geometry.to_dict(),
        "alignment": lung_registration.alignment.to_dict(),
        "user": session.to_dict(),
    }
    residual = lung_registration.model.residual[0].numpy()  # saved in the folder as residual.npy
    reopened = open_session(phantom_case.fixed, saved, lung_registration.correspondences, residual=residual)
    assert reopened.model.n_regions == 2
    np.testing.assert_allclose(reopened.field.displacement_mm, session.field.displacement_mm, atol=1e-3)
