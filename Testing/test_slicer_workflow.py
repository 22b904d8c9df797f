"""Issue 21: the Slicer module's logic that runs outside Slicer, with real vtk, SimpleITK, files and sessions.

Pairing by stored point IDs (a drag a move, undone in one step), the module's own lists kept out of the pair
selectors, the run log and the quality verdict's words, the session kept with the scene, the working-grid float32
transform, transform export formats, which segmentations follow the moving volume, the margin colours, the
requirements and the lazy slicerio/highdicom imports.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import VTK_FLOAT

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field, sample_field
from ImplicitKernelRegistrationLib.core.geometry import Geometry, lps_ras
from ImplicitKernelRegistrationLib.io.transforms import read_field, write_field
from ImplicitKernelRegistrationLib.requirements import SLICER_REQUIREMENTS, unmet_requirements
from ImplicitKernelRegistrationLib.slicer_bridge import (
    OWN_LIST_ROLES,
    ROLE_ATTRIBUTE,
    ListPoint,
    RunLog,
    displacement_image_data,
    display_field,
    links_from_json,
    links_to_json,
    margin_lookup_table,
    pair_edit_line,
    point_selector_hidden_ids,
    quality_reasons,
    quality_summary,
    reconcile_pairs,
    register_blocker,
    registration_lines,
    residual_rms_mm,
    review_layout_xml,
    segmentations_following_moving,
    session_state_from_json,
    session_state_json,
    sync_lists_to_session,
    transform_action,
    transform_export_kind,
)

ROOT = Path(__file__).resolve().parents[1]


def _ras(lps: list[float]) -> np.ndarray:
    """An RAS position from LPS coordinates."""
    return lps_ras(np.asarray(lps, dtype=np.float64))


# ------------------------------------------------------------------------------------------ pairs by stored ID


def test_a_point_waiting_for_its_partner_is_kept_and_pairs_when_the_partner_comes() -> None:
    fixed = [ListPoint("F1", _ras([1.0, 2.0, 3.0]))]
    edits = reconcile_pairs({}, fixed, [], {})
    assert edits.empty and edits.delete_fixed == edits.delete_moving == []
    edits = reconcile_pairs({}, fixed, [ListPoint("M1", _ras([4.0, 5.0, 6.0]))], {})
    assert edits.add_links == [("F1", "M1")]
    np.testing.assert_allclose(edits.add_fixed_lps, [[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(edits.add_moving_lps, [[4.0, 5.0, 6.0]])
    # A third point on one side keeps waiting.
    edits = reconcile_pairs({}, fixed, [ListPoint("M1", _ras([4, 5, 6])), ListPoint("M2", _ras([0, 0, 0]))], {})
    assert edits.add_links == [("F1", "M1")]


def test_deleting_one_point_in_the_markups_module_removes_only_its_pair() -> None:
    """Pairing by list position would pair fixed 2 with moving 1 here (every later pair shifted); by ID only pair 1
    goes. Slicer numbers each list's points on its own, so both lists have points "1" and "2"."""
    session = {1: (np.array([0.0, 0, 0]), np.array([1.0, 0, 0])), 2: (np.array([5.0, 0, 0]), np.array([6.0, 0, 0]))}
    links = {1: ("1", "1"), 2: ("2", "2")}
    fixed = [ListPoint("2", _ras([5.0, 0, 0]))]  # fixed point 1 deleted
    moving = [ListPoint("1", _ras([1.0, 0, 0])), ListPoint("2", _ras([6.0, 0, 0]))]
    edits = reconcile_pairs(links, fixed, moving, session)
    assert edits.remove == [1]
    assert edits.delete_fixed == [] and edits.delete_moving == ["1"]
    assert edits.add_links == []
    # A new fixed point "3" waits even though a moving point "3" is linked elsewhere: the lists are not mixed.
    links = {2: ("2", "3")}
    moving = [ListPoint("3", _ras([6.0, 0, 0]))]
    edits = reconcile_pairs(
        links, [ListPoint("2", _ras([5.0, 0, 0])), ListPoint("3", _ras([9, 9, 9]))], moving, session
    )
    assert edits.empty


def test_dragging_a_point_moves_its_pair() -> None:
    """A drag is a move of the pair (same id, links kept): one edit for Workspace.edit_pairs, not a remove and an add
    (which took two presses of Undo)."""
    session = {7: (np.array([0.0, 0, 0]), np.array([1.0, 0, 0]))}
    fixed = [ListPoint("A", _ras([0.0, 0, 2.0]))]
    moving = [ListPoint("B", _ras([1.0, 0, 0]))]
    edits = reconcile_pairs({7: ("A", "B")}, fixed, moving, session)
    assert edits.remove == [] and edits.add_links == [] and list(edits.move) == [7] and not edits.empty
    np.testing.assert_allclose(edits.move[7][0], [0.0, 0.0, 2.0])
    np.testing.assert_allclose(edits.move[7][1], [1.0, 0.0, 0.0])
    unchanged = reconcile_pairs({7: ("A", "B")}, [ListPoint("A", _ras([0.0, 0, 0]))], moving, session)
    assert unchanged.empty


def test_lists_follow_the_session_after_delete_or_undo() -> None:
    session = {2: (np.zeros(3), np.ones(3)), 3: (np.zeros(3), np.ones(3))}
    links = {1: ("1", "1"), 2: ("2", "2")}
    fixed = [ListPoint(i, _ras([0.0, 0, 0])) for i in ("1", "2", "3")]
    moving = [ListPoint(i, _ras([1.0, 1, 1])) for i in ("1", "2")]
    sync = sync_lists_to_session(links, fixed, moving, session)
    assert sync.links == {2: ("2", "2")}
    assert sync.delete_fixed == ["1"] and sync.delete_moving == ["1"]  # pair 1 is gone from the session
    assert sync.missing == [3]  # e.g. restored by undo: needs new points; fixed point 3 waits for a partner, untouched
    assert sync.move_back == {}


def test_an_undone_drag_puts_the_points_back() -> None:
    """Undo of a drag returns the pair to where it was; its points (still where they were dragged to) follow."""
    session = {5: (np.array([10.0, 20.0, 30.0]), np.array([11.0, 20.0, 30.0]))}
    fixed = [ListPoint("F", _ras([10.0, 20.0, 33.0]))]  # dragged 3 mm, then the drag was undone in the session
    moving = [ListPoint("M", _ras([11.0, 20.0, 30.0]))]
    sync = sync_lists_to_session({5: ("F", "M")}, fixed, moving, session)
    assert sync.links == {5: ("F", "M")} and sync.missing == [] and sync.delete_fixed == []
    assert list(sync.move_back) == [5]
    np.testing.assert_allclose(sync.move_back[5][0], _ras([10.0, 20.0, 30.0]))  # RAS, as the points take it
    np.testing.assert_allclose(sync.move_back[5][1], _ras([11.0, 20.0, 30.0]))


def test_links_round_trip_as_json() -> None:
    links = {3: ("vtkMRMLMarkupsFiducialNode1-0", "p2"), 10: ("a", "b")}
    assert links_from_json(links_to_json(links)) == links
    assert links_from_json("") == {}
    with pytest.raises(IkrError, match="pair links"):
        links_from_json("[1, 2")


def test_residual_rms() -> None:
    assert residual_rms_mm([]) == 0.0
    assert residual_rms_mm([{"residual_mm": 3.0}, {"residual_mm": 4.0}]) == pytest.approx(np.sqrt(12.5))


# ------------------------------------------------------------------------------------------ session in the scene


@pytest.fixture(scope="module")
def own_registration(phantom_case):
    """A registration of the phantom owned by this module (its sessions change the model in place)."""
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register

    config = RegistrationConfig(kernel="gaussian", spacing_mm=4.0, max_keypoints=512)
    return register(phantom_case.fixed, phantom_case.moving, config)


def test_a_session_reopens_from_the_scene_text_with_its_pairs(own_registration, phantom_case) -> None:
    from ImplicitKernelRegistrationLib.registration.refine import open_session, session_from_result

    result = own_registration
    session = session_from_result(result, phantom_case.fixed)
    p = phantom_case.landmarks_fixed_lps[:1]
    session.add_correspondences(p, phantom_case.landmarks_moving_lps[:1] + np.array([[1.5, 0.0, 0.0]]))
    saved = {
        "config": result.report["config"],
        "working_geometry": result.working_geometry.to_dict(),
        "alignment": result.alignment.to_dict(),  # as the module saves it
        "user": session.to_dict(),
    }
    text = session_state_json(saved, session.automatic)
    saved_again, automatic = session_state_from_json(text)
    assert len(automatic) == len(session.automatic)
    reopened = open_session(phantom_case.fixed, saved_again, automatic, phantom_case.moving)  # refits the residual
    assert [q.to_dict() for q in reopened.pairs] == [q.to_dict() for q in session.pairs]
    np.testing.assert_allclose(reopened.field.displacement_mm, session.field.displacement_mm, atol=1e-2)
    with pytest.raises(IkrError, match="session saved with the scene"):
        session_state_from_json(text.replace('"version": 1', '"version": 99'))


# ------------------------------------------------------------------------------------------ transforms


def _fine_field() -> Field:
    """A smooth field on a 1.5 mm grid, rotated about z."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    g = Geometry((64, 56, 40), (1.5, 1.5, 1.5), (-40.0, 10.0, 5.0), (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    x = g.grid_points_lps()
    d = np.stack([4.0 * np.sin(x[..., 1] / 25.0), 3.0 * np.cos(x[..., 0] / 30.0), 0.03 * x[..., 2]], axis=-1)
    return Field(d.astype(np.float32), g)


def test_slicer_gets_a_float32_field_on_the_working_grid_close_to_the_full_one() -> None:
    field = _fine_field()
    shown = display_field(field, 4.0)
    assert shown.displacement_mm.dtype == np.float32
    assert shown.displacement_mm.nbytes * 15 < field.displacement_mm.astype(np.float64).nbytes
    np.testing.assert_allclose(shown.geometry.corners_lps(), field.geometry.corners_lps(), atol=1e-6)
    rng = np.random.default_rng(0)
    idx = rng.uniform(0, np.asarray(field.geometry.size) - 1, size=(200, 3))
    points = field.geometry.index_to_lps(idx)
    gap = np.linalg.norm(sample_field(shown, points) - sample_field(field, points), axis=1)
    assert gap.max() < 0.2, gap.max()  # well under a millimetre for a smooth field
    image = displacement_image_data(shown)
    assert image.GetPointData().GetScalars().GetDataType() == VTK_FLOAT
    assert image.GetDimensions() == shown.geometry.size
    np.testing.assert_allclose(
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(-1, 3)[:, 2],
        shown.displacement_mm.reshape(-1, 3)[:, 2],
    )
    same = display_field(shown, 4.0)  # already that coarse: unchanged
    assert same.geometry == shown.geometry


def test_transform_export_formats_steer_nifti_to_h5(tmp_path) -> None:
    assert transform_export_kind(tmp_path / "t.h5") == "transform"
    assert transform_export_kind(tmp_path / "t.tfm") == "transform"
    assert transform_export_kind(tmp_path / "f.nrrd") == "field"
    with pytest.raises(IkrError, match=r"\.h5"):
        transform_export_kind(tmp_path / "f.nii.gz")
    with pytest.raises(IkrError, match="unsupported"):
        transform_export_kind(tmp_path / "f.png")


def test_why_nifti_is_refused_and_nrrd_is_read_as_a_resampling_field(tmp_path) -> None:
    """SimpleITK writes a vector NIfTI with intent 1007 (Slicer expects 1006); NRRD has no intent and no
    'displacement field type', which Slicer reads as a resampling (fixed -> moving) transform."""
    field = _fine_field()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(write_field(field, tmp_path / "f.nii.gz")))
    reader.ReadImageInformation()
    assert reader.GetMetaData("intent_code") == "1007"
    reader.SetFileName(str(write_field(field, tmp_path / "f.nrrd")))
    reader.ReadImageInformation()
    keys = reader.GetMetaDataKeys()
    assert "intent_code" not in keys and not any("displacement field type" in k for k in keys)
    back = read_field(tmp_path / "f.nrrd")
    np.testing.assert_allclose(back.displacement_mm, field.displacement_mm, atol=1e-5)


def test_volumes_under_another_transform_are_hardened_not_refused() -> None:
    assert transform_action([], "own") == "direct"
    assert transform_action(["own"], "own") == "direct"  # a second Register reads the moving volume as before
    assert transform_action(["regularisation"], "own") == "harden"
    assert transform_action(["regularisation", "own"], "own") == "harden"
    assert transform_action(["regularisation"], None) == "harden"


def test_segmentations_drawn_on_the_moving_ct_before_registration_follow_it() -> None:
    candidates = [
        ("drawn on moving", None, "moving"),
        ("drawn on fixed", None, "fixed"),
        ("loaded tumour", None, None),
        ("under another transform", "T", "moving"),
    ]
    follow = segmentations_following_moving(None, candidates, "moving", {"loaded tumour"})
    assert follow == ["drawn on moving", "loaded tumour"]
    # A moving volume under a regularisation transform R: its segmentations under R follow (R goes under).
    assert segmentations_following_moving("T", candidates, "moving", set()) == ["under another transform"]


# ------------------------------------------------------------------------------------------ margin colours


def test_margin_colours_are_red_below_0_yellow_to_5_green_from_5() -> None:
    lut = margin_lookup_table()
    red, yellow, green = (0.85, 0.1, 0.1), (0.95, 0.8, 0.1), (0.15, 0.65, 0.25)
    for margin, colour in [(-20.0, red), (-1.0, red), (-0.01, red), (0.0, yellow), (2.5, yellow), (4.99, yellow),
                           (5.0, green), (7.0, green), (50.0, green)]:  # fmt: skip
        rgb = [0.0, 0.0, 0.0]
        lut.GetColor(margin, rgb)
        np.testing.assert_allclose(rgb, colour, atol=0.01, err_msg=str(margin))  # 8-bit table values


# ------------------------------------------------------------------------------------------ requirements


def test_slicer_requirements_agree_with_pyproject() -> None:
    """One set of version bounds: each Slicer requirement is pyproject.toml's (torch: its pin lies in the range)."""
    from packaging.requirements import Requirement

    deps = {Requirement(d).name.lower(): Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["project"]["dependencies"]}  # fmt: skip
    for name, text in SLICER_REQUIREMENTS.items():
        req = Requirement(text)
        assert req.name.lower() in deps, name
        pinned = deps[req.name.lower()]
        if name == "torch":
            version = next(iter(pinned.specifier)).version
            assert req.specifier.contains(version), (text, str(pinned))
        else:
            assert req.specifier == pinned.specifier, (text, str(pinned))


def test_unmet_requirements_check_versions() -> None:
    versions = {"torch": "2.13.0+cpu", "numpy": "2.1.0", "scipy": "1.10.1", "SimpleITK": "", "vtk": None}
    unmet = unmet_requirements({k: SLICER_REQUIREMENTS[k] for k in versions}, versions.get)
    assert unmet == {"scipy": "version 1.10.1, needs >=1.11", "vtk": "missing"}
    assert unmet_requirements(SLICER_REQUIREMENTS) == {}  # this environment has them all


def test_segmentations_imports_without_slicerio_or_highdicom(tmp_path) -> None:
    """Slicer ships neither: plain label maps still read and write; .seg.nrrd needs slicerio only when used."""
    code = f"""
import sys
sys.modules["slicerio"] = None
sys.modules["highdicom"] = None
import numpy as np
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.segmentations import read_labels, write_labels
labels = Image(np.eye(4, dtype=np.uint8)[None].repeat(3, 0), Geometry((4, 4, 3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)))
path = write_labels(labels, {{1: "tumour"}}, {str(tmp_path / "t.nii.gz")!r})
back, names = read_labels(path)
assert int(back.array.sum()) == 12, back.array.sum()
try:
    write_labels(labels, {{1: "tumour"}}, {str(tmp_path / "t.seg.nrrd")!r})
except ImportError:
    print("seg.nrrd needs slicerio")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["seg.nrrd", "needs", "slicerio", "ok"]


def test_review_layout_is_three_linked_axial_views_fixed_moving_fused() -> None:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(review_layout_xml())
    assert root.tag == "layout" and root.get("type") == "horizontal"
    views = root.findall("./item/view")
    assert [v.get("singletontag") for v in views] == ["Red", "Yellow", "Green"]
    props = [{p.get("name"): p.text for p in v.findall("property")} for v in views]
    assert [p["viewlabel"] for p in props] == ["fixed", "moving", "fused"]
    assert {p["orientation"] for p in props} == {"Axial"}
    assert all(v.get("class") == "vtkMRMLSliceNode" for v in views)


def test_register_button_says_why_it_is_disabled() -> None:
    assert register_blocker("vtkMRMLScalarVolumeNode1", "vtkMRMLScalarVolumeNode2") == ""
    assert register_blocker(None, None) == "choose the fixed volume and the moving volume"
    assert register_blocker("a", None) == "choose the moving volume"
    assert "same volume" in register_blocker("a", "a")
    assert "running" in register_blocker("a", "b", running=True)


# ------------------------------------------------------------------------------------------ the module's own lists


def test_the_pair_selectors_leave_out_the_module_s_own_lists_and_the_other_pair_list() -> None:
    lists = [
        ("vtkMRMLMarkupsFiducialNode1", "correspondences"),
        ("vtkMRMLMarkupsFiducialNode2", None),  # the user's fixed points
        ("vtkMRMLMarkupsFiducialNode3", None),  # the user's moving points
        ("vtkMRMLMarkupsFiducialNode4", "suggestions"),
        ("vtkMRMLMarkupsFiducialNode5", "something else"),  # another module's attribute value: not ours
    ]
    fixed_selector = point_selector_hidden_ids(lists, "vtkMRMLMarkupsFiducialNode3")
    assert fixed_selector == [f"vtkMRMLMarkupsFiducialNode{i}" for i in (1, 4, 3)]
    assert point_selector_hidden_ids(lists, None) == ["vtkMRMLMarkupsFiducialNode1", "vtkMRMLMarkupsFiducialNode4"]
    assert point_selector_hidden_ids([], "x") == ["x"]
    assert set(OWN_LIST_ROLES) == {"correspondences", "suggestions"}
    assert ROLE_ATTRIBUTE.startswith("ImplicitKernelRegistration.")


# ------------------------------------------------------------------------------------------ the run log


class _Clock:
    """A clock the test moves by hand (seconds since the epoch), so the log's times are known."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_the_run_log_stamps_steps_messages_the_verdict_and_the_time() -> None:
    clock = _Clock(1_700_000_000.0)
    log = RunLog(clock=clock)
    shown: list[str] = []
    log.listeners.append(shown.append)
    log.begin("Register 'moving' to 'fixed' (cpu, 3 mm grid)")
    clock.now += 1.25
    log.progress(0.05, "detecting keypoints")
    assert log.progress(0.05, "detecting keypoints") is None  # a repeated step is not written again
    clock.now += 10.0
    log.progress(0.5, "scale 2/3: matching")
    log.say("ImplicitKernelRegistration: removed 2 temporary files")
    log.warn("the GPU ran out of memory; this registration ran on the CPU")
    quality = {"verdict": "doubtful", "reasons": ["body_dice 0.90 < 0.93"]}
    log.verdict(quality)
    clock.now += 0.5
    log.end("done")
    assert shown == log.lines and len(shown) == 8
    stamp = time.strftime("%H:%M:%S", time.localtime(clock.now))
    assert shown[-1] == f"{stamp}  == done after 11.8 s"
    bodies = [line.split("  ", 1)[1] for line in shown]
    assert bodies[0] == "== Register 'moving' to 'fixed' (cpu, 3 mm grid)"
    assert bodies[1] == "  5 %  detecting keypoints  [1.2 s]"
    assert bodies[2] == " 50 %  scale 2/3: matching  [11.2 s]"
    assert bodies[4].startswith("WARNING: the GPU ran out of memory")
    assert bodies[5:7] == ["quality: doubtful", "  - overlap of the two bodies 0.90 < 0.93 (body_dice)"]
    assert log.text() == "\n".join(shown)
    short = RunLog(clock=clock, max_lines=3)
    for i in range(5):
        short.say(f"line {i}")
    assert [line.split("  ", 1)[1] for line in short.lines] == ["line 2", "line 3", "line 4"]


def test_the_quality_verdict_for_the_panel_names_its_reasons_in_words() -> None:
    assert quality_summary(None) == ""
    assert quality_summary({"verdict": "ok", "reasons": []}).startswith("Quality: ok")
    failed = {"verdict": "failed", "reasons": ["ncc_after 0.45 < 0.80", "keys_coherent_fraction 0.85 < 0.90"]}
    text = quality_summary(failed)
    assert text.startswith("Quality: FAILED (do not use it before checking it): ")
    assert "image similarity after registration 0.45 < 0.80 (ncc_after)" in text
    assert "matches moving with their neighbours 0.85 < 0.90 (keys_coherent_fraction)" in text
    assert quality_reasons({"reasons": ["something new 1 < 2"]}) == ["something new 1 < 2"]  # unknown: as it is


def test_registration_and_pair_edit_lines() -> None:
    report = {"runtime_s": 42.04, "device": "cpu", "n_keypoints": 2048, "n_keypoints_consistent": 1900,
              "peak_memory_registration_mb": 1536.0, "uncertainty_s": 3.2}  # fmt: skip
    assert registration_lines(report) == [
        "registered in 42.0 s on cpu",
        "2048 keypoints, 1900 kept by the forward/backward check",
        "peak memory 1.50 GB",
        "expected-error map in 3.2 s",
    ]
    assert registration_lines({}) == []
    feedback = [{"residual_mm": 3.0}, {"residual_mm": 4.0}]
    line = pair_edit_line({"added": [3], "moved": [], "deleted": [1, 2]}, 0.123, feedback)
    assert line == "pairs: added 3, deleted 1 2; field updated in 0.12 s; 2 pairs, residual RMS 3.54 mm"
    assert pair_edit_line({}, 0.0, []).startswith("pairs: no change;")
    assert pair_edit_line({"moved back": [4]}, 0.0, [], action="undo").startswith("undo: moved back 4;")
