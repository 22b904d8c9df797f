"""Slicer-facing conversions (pure numpy/vtk, no `slicer`): volumes, grid transforms, point lists, margin models.

Slicer works in RAS; the library in LPS. Every conversion here goes through `geometry.lps_ras`.

Grid transforms: a library Field maps fixed points to moving points (p -> p + d(p)), the ITK
resampling direction. In Slicer that is the moving volume's transform *from parent*
(`vtkMRMLTransformNode.SetAndObserveTransformFromParent`): a world (fixed) point p shows the moving
voxel at p + d(p). `vtkOrientedGridTransform` applies x -> x + d(index(x)) with
index(x) = (R S)^-1 (x - origin), the same as ITK's DisplacementFieldTransform, so the grid's origin,
direction columns and displacement vectors are all converted LPS -> RAS (x and y negated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkFloatArray, vtkLookupTable
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from .core.correspondences import AUTOMATIC, Correspondences
from .core.errors import IkrError
from .core.fields import Field, resample_field
from .core.geometry import Geometry, Image, lps_ras

if TYPE_CHECKING:
    from .registration.alignment import Alignment

# ----------------------------------------------------------------------------- volumes


def alignment_from_ras_to_parent(to_parent_ras: np.ndarray) -> Alignment:
    """A linear transform node's matrix (RAS, to parent: it puts the moving volume onto the fixed one) as the
    library's start alignment (fixed -> moving, LPS): its inverse, RAS <-> LPS by geometry.lps_ras."""
    from .registration.alignment import (
        Alignment,  # here: alignment imports torch, which the module loads only when needed
    )

    inverse = np.linalg.inv(np.asarray(to_parent_ras, dtype=np.float64).reshape(4, 4))
    return Alignment.from_point_map(lambda lps: lps_ras(lps_ras(lps) @ inverse[:3, :3].T + inverse[:3, 3]))


def ijk_to_ras_matrix(geometry: Geometry) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a grid (Slicer's volume node matrix; IJK = index (x, y, z))."""
    m = geometry.index_to_lps_matrix()
    m[:3, :] = lps_ras(m[:3, :].T).T
    return m


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, size_xyz: tuple[int, int, int]) -> Geometry:
    """The Geometry of a grid given its 4x4 IJK-to-RAS matrix and its size (x, y, z)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    lps = lps_ras(m[:3, :].T).T  # 3 x 4: axis columns and origin in LPS
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise IkrError(f"the volume's IJK-to-RAS matrix has a zero spacing ({spacing.tolist()})")
    direction = lps[:, :3] / spacing[None, :]
    return Geometry(
        size=tuple(int(v) for v in size_xyz),
        spacing_mm=tuple(float(v) for v in spacing),
        origin_lps=tuple(float(v) for v in lps[:, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def image_from_volume_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray, meta: dict | None = None) -> Image:
    """An Image from a Slicer volume's voxel array (k, j, i) = (z, y, x) and its IJK-to-RAS matrix (copied)."""
    array = np.array(array_kji, copy=True)
    if array.ndim != 3:
        raise IkrError(f"expected a scalar 3D volume, got an array of shape {array.shape}")
    size = (array.shape[2], array.shape[1], array.shape[0])
    return Image(array, geometry_from_ijk_to_ras(ijk_to_ras, size), dict(meta or {}))


# ----------------------------------------------------------------------------- grid transforms


@dataclass
class GridArrays:
    """A displacement grid in RAS: vectors (z, y, x, 3), origin, spacing and direction (columns = axes)."""

    displacement_ras: np.ndarray
    origin_ras: np.ndarray
    spacing_mm: np.ndarray
    direction_ras: np.ndarray


def grid_arrays(field: Field) -> GridArrays:
    """The field as RAS grid arrays for a vtkOrientedGridTransform used as a transform *from parent*."""
    g = field.geometry
    return GridArrays(
        displacement_ras=lps_ras(field.displacement_mm),
        origin_ras=lps_ras(np.asarray(g.origin_lps)),
        spacing_mm=np.asarray(g.spacing_mm, dtype=np.float64),
        direction_ras=lps_ras(g.direction_matrix.T).T,
    )


def field_from_grid_arrays(grid: GridArrays) -> Field:
    """Inverse of grid_arrays: a Field (LPS, fixed -> moving) from RAS grid arrays."""
    d = np.asarray(grid.displacement_ras)
    direction = lps_ras(np.asarray(grid.direction_ras, dtype=np.float64).T).T
    geometry = Geometry(
        size=(d.shape[2], d.shape[1], d.shape[0]),
        spacing_mm=tuple(float(v) for v in grid.spacing_mm),
        origin_lps=tuple(float(v) for v in lps_ras(np.asarray(grid.origin_ras))),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return Field(lps_ras(d).astype(np.float32), geometry)


def displacement_image_data(field: Field) -> vtkImageData:
    """The RAS displacement grid as vtkImageData (origin, spacing, 3 float32 components; no direction).

    float32 halves the memory of Slicer's copy (and of each scene save) against float64; Slicer's
    vtkOrientedGridTransform interpolates a float grid as it does a double one.

    The grid's direction goes to vtkOrientedGridTransform.SetGridDirectionMatrix (see
    `grid_direction_matrix`), as Slicer's own DICOM plugins do.
    """
    grid = grid_arrays(field)
    image = vtkImageData()
    image.SetDimensions(*field.geometry.size)
    image.SetOrigin(*grid.origin_ras)
    image.SetSpacing(*grid.spacing_mm)
    vectors = numpy_support.numpy_to_vtk(
        np.ascontiguousarray(grid.displacement_ras.reshape(-1, 3), dtype=np.float32), deep=True
    )
    vectors.SetName("displacement")
    image.GetPointData().SetScalars(vectors)
    return image


def grid_direction_matrix(field: Field) -> vtkMatrix4x4:
    """The 4x4 grid direction matrix (RAS; upper 3x3 = axis directions) for SetGridDirectionMatrix."""
    matrix = vtkMatrix4x4()
    direction = grid_arrays(field).direction_ras
    for row in range(3):
        for col in range(3):
            matrix.SetElement(row, col, float(direction[row, col]))
    return matrix


def display_field(field: Field, spacing_mm: float) -> Field:
    """The field Slicer is given: on a grid of about `spacing_mm` (the working grid's) over the same box, float32.

    The full-resolution field of a 512 x 512 x 300 CT is 0.9 GB in float32 (1.9 GB float64, per scene save);
    the registration's working grid (2 mm by default) is about 60 times smaller, and Slicer interpolates a
    grid transform linearly. The field is smooth at that scale (its control points are 3 working voxels apart),
    so the displayed transform differs from the library's by well under a millimetre (measured in
    Testing/test_slicer_bridge.py). A grid already that coarse is returned as it is.
    """
    g = field.geometry
    extent_mm = (np.asarray(g.size) - 1) * np.asarray(g.spacing_mm)
    size = np.maximum(np.ceil(extent_mm / float(spacing_mm)).astype(int) + 1, 2)
    if np.all(size >= np.asarray(g.size)):
        return Field(np.asarray(field.displacement_mm, dtype=np.float32), g)
    spacing = extent_mm / np.maximum(size - 1, 1)
    spacing = np.where(extent_mm > 0, spacing, np.asarray(g.spacing_mm))
    coarse = Geometry(
        size=tuple(int(v) for v in size),
        spacing_mm=tuple(float(v) for v in spacing),
        origin_lps=g.origin_lps,
        direction=g.direction,
    )
    return resample_field(field, coarse)


def field_from_image_data(image: vtkImageData, direction: vtkMatrix4x4) -> Field:
    """Read a grid transform's RAS displacement vtkImageData and direction matrix back as a Field."""
    scalars = image.GetPointData().GetScalars()
    if scalars is None or scalars.GetNumberOfComponents() != 3:
        raise IkrError("the grid transform holds no 3-component displacement grid")
    nx, ny, nz = image.GetDimensions()
    d = numpy_support.vtk_to_numpy(scalars).reshape(nz, ny, nx, 3).astype(np.float64)
    r = np.array([[direction.GetElement(i, j) for j in range(3)] for i in range(3)])
    return field_from_grid_arrays(GridArrays(d, np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing()), r))


# ----------------------------------------------------------------------------- point lists and pairs


@dataclass
class ListPoint:
    """A placed control point of a Slicer point list: its persistent ID (GetNthControlPointID) and RAS position."""

    point_id: str
    ras: np.ndarray


@dataclass
class PairEdits:
    """What the point lists ask of the session (see reconcile_pairs); every point array is LPS (N, 3)."""

    add_links: list[tuple[str, str]]  # (fixed point ID, moving point ID) of each new pair, in placing order
    add_fixed_lps: np.ndarray
    add_moving_lps: np.ndarray
    remove: list[int]  # session pair IDs to remove (a point of the pair was deleted)
    delete_fixed: list[str]  # fixed point IDs whose partner was deleted: the pair is gone, so is this point
    delete_moving: list[str]  # the same for moving points
    move: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)  # dragged: id -> points

    @property
    def empty(self) -> bool:
        """Whether nothing changes."""
        return not (self.add_links or self.remove or self.delete_fixed or self.delete_moving or self.move)


def reconcile_pairs(
    links: dict[int, tuple[str, str]],
    fixed: list[ListPoint],
    moving: list[ListPoint],
    session_pairs: dict[int, tuple[np.ndarray, np.ndarray]],
    tolerance_mm: float = 0.01,
) -> PairEdits:
    """Compare the two point lists with the session's pairs, pairing points by their stored IDs.

    `links` maps each session pair ID to the IDs of its fixed and moving points (IDs are unique within one
    list only: Slicer numbers each list's points on its own, so the two lists are never mixed). A linked pair
    with a point deleted in the lists is removed (its surviving partner is deleted too); a linked pair whose point
    was dragged is moved (it keeps its ID, label and links: Workspace.edit_pairs makes that one undo step).
    Points not linked to a pair wait for a partner: the k-th waiting fixed point pairs with the k-th waiting
    moving point, in list order; an extra point on one side keeps waiting (it is never deleted). Deleting a pair
    in the Markups module therefore never shifts any other pair.
    """
    f_by_id = {p.point_id: p for p in fixed}
    m_by_id = {p.point_id: p for p in moving}
    remove, delete_fixed, delete_moving = [], [], []
    add_links, add_f, add_m = [], [], []
    move = {}
    linked_f, linked_m = set(), set()
    for pair_id, (fid, mid) in sorted(links.items()):
        if pair_id not in session_pairs:
            continue  # stale link (sync_lists_to_session prunes it)
        linked_f.add(fid)
        linked_m.add(mid)
        f, m = f_by_id.get(fid), m_by_id.get(mid)
        if f is None or m is None:
            remove.append(pair_id)
            delete_fixed += [fid] if f is not None else []
            delete_moving += [mid] if m is not None else []
            continue
        f_lps, m_lps = lps_ras(np.asarray(f.ras, dtype=np.float64)), lps_ras(np.asarray(m.ras, dtype=np.float64))
        old_f, old_m = (np.asarray(v, dtype=np.float64) for v in session_pairs[pair_id])
        if np.linalg.norm(f_lps - old_f) > tolerance_mm or np.linalg.norm(m_lps - old_m) > tolerance_mm:
            move[pair_id] = (f_lps, m_lps)
    waiting_f = [p for p in fixed if p.point_id not in linked_f]
    waiting_m = [p for p in moving if p.point_id not in linked_m]
    for f, m in zip(waiting_f, waiting_m, strict=False):
        add_links.append((f.point_id, m.point_id))
        add_f.append(lps_ras(np.asarray(f.ras, dtype=np.float64)))
        add_m.append(lps_ras(np.asarray(m.ras, dtype=np.float64)))
    return PairEdits(
        add_links,
        np.asarray(add_f, dtype=np.float64).reshape(-1, 3),
        np.asarray(add_m, dtype=np.float64).reshape(-1, 3),
        remove,
        delete_fixed,
        delete_moving,
        move,
    )


@dataclass
class ListSync:
    """What the point lists need after the session changed on its own (see sync_lists_to_session)."""

    links: dict[int, tuple[str, str]]  # the links that still hold
    delete_fixed: list[str]  # fixed point IDs linked to a pair the session no longer has
    delete_moving: list[str]
    missing: list[int]  # session pair IDs that need new points (no link)
    move_back: dict[int, tuple[np.ndarray, np.ndarray]]  # linked pairs whose points are elsewhere: id -> RAS points


def sync_lists_to_session(
    links: dict[int, tuple[str, str]],
    fixed: list[ListPoint],
    moving: list[ListPoint],
    session_pairs: dict[int, tuple[np.ndarray, np.ndarray]],
    tolerance_mm: float = 0.01,
) -> ListSync:
    """After the session changed on its own (delete in the table, undo, a reopened session): what the lists need.

    Links hold while their pair is in the session and both points are present; the points of a pair the session
    no longer has are deleted; a pair without points gets new ones; a linked pair whose points are not where the
    session has it (an undone drag) has its points put back (`move_back`, RAS). Points that wait for a partner
    (linked to nothing) are left alone.
    """
    f_by_id = {p.point_id: p for p in fixed}
    m_by_id = {p.point_id: p for p in moving}
    kept, delete_fixed, delete_moving, move_back = {}, [], [], {}
    for pair_id, (fid, mid) in links.items():
        if pair_id in session_pairs and fid in f_by_id and mid in m_by_id:
            kept[pair_id] = (fid, mid)
            want = [lps_ras(np.asarray(v, dtype=np.float64)) for v in session_pairs[pair_id]]
            have = [np.asarray(f_by_id[fid].ras, dtype=np.float64), np.asarray(m_by_id[mid].ras, dtype=np.float64)]
            if any(np.linalg.norm(w - h) > tolerance_mm for w, h in zip(want, have, strict=True)):
                move_back[pair_id] = (want[0], want[1])
        else:
            delete_fixed += [fid] if fid in f_by_id else []
            delete_moving += [mid] if mid in m_by_id else []
    missing = sorted(pair_id for pair_id in session_pairs if pair_id not in kept)
    return ListSync(kept, delete_fixed, delete_moving, missing, move_back)


def links_to_json(links: dict[int, tuple[str, str]]) -> str:
    """The pair links as JSON text (kept in the parameter node, so a reloaded scene keeps its pairs)."""
    return json.dumps({str(k): list(v) for k, v in sorted(links.items())})


def links_from_json(text: str) -> dict[int, tuple[str, str]]:
    """Inverse of links_to_json ('' gives no links)."""
    if not text:
        return {}
    try:
        return {int(k): (str(v[0]), str(v[1])) for k, v in json.loads(text).items()}
    except (ValueError, TypeError, IndexError, AttributeError) as err:
        raise IkrError(f"the saved pair links are unreadable ({err})") from err


def pairs_ras(feedback: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fixed and moving RAS points (N, 3) and labels of a session's user pairs (from `feedback()`)."""
    fixed = np.asarray([p["fixed_lps"] for p in feedback], dtype=np.float64).reshape(-1, 3)
    moving = np.asarray([p["moving_lps"] for p in feedback], dtype=np.float64).reshape(-1, 3)
    return lps_ras(fixed), lps_ras(moving), [str(p["label"]) for p in feedback]


def feedback_rows(feedback: list[dict]) -> list[tuple[str, str, str, str]]:
    """Table rows (id, label, residual mm, warnings) for the refinement pair table."""
    return [
        (str(p["id"]), str(p["label"]), f"{p['residual_mm']:.2f}", "; ".join(p["warnings"]) or "ok") for p in feedback
    ]


def register_blocker(fixed_id: str | None, moving_id: str | None, running: bool = False) -> str:
    """Why Register cannot run now ('' when it can): shown as the disabled button's tooltip."""
    if running:
        return "a registration is running (Cancel stops it)"
    if not fixed_id or not moving_id:
        return "choose the " + " and the ".join(
            name for name, node in (("fixed volume", fixed_id), ("moving volume", moving_id)) if not node
        )
    if fixed_id == moving_id:
        return "the fixed and the moving volume are the same volume"
    return ""


# ----------------------------------------------------------------------------- the module's own point lists

# The module marks the point lists it makes for itself (read-only displays) with a node attribute, saved with the
# scene. The pair-list selectors leave them out (qMRMLSortFilterProxyModel.hiddenNodeIDs); the display selectors
# show only the list of their role (qMRMLNodeComboBox.addAttribute).
ROLE_ATTRIBUTE = "ImplicitKernelRegistration.Role"
OWN_LIST_ROLES = ("correspondences", "suggestions")


def point_selector_hidden_ids(lists: list[tuple[str, str | None]], other_pair_list_id: str | None) -> list[str]:
    """The point-list node IDs a pair-list selector (fixed or moving points) leaves out.

    `lists` are (node ID, its ROLE_ATTRIBUTE value or None) of every point list in the scene: the module's own
    lists (correspondences, suggested clicks) are left out, and so is the other pair list (one list cannot hold
    both the fixed and the moving points of the pairs).
    """
    hidden = [node_id for node_id, role in lists if role in OWN_LIST_ROLES]
    if other_pair_list_id and other_pair_list_id not in hidden:
        hidden.append(other_pair_list_id)
    return hidden


# ----------------------------------------------------------------------------- what the panel tells

# Plain words for the quality measurements (review.quality.QUALITY_THRESHOLDS) in the verdict's reasons.
QUALITY_WORDS = {
    "ncc_after": "image similarity after registration",
    "body_dice": "overlap of the two bodies",
    "moving_coverage": "part of the fixed body the moving CT covers",
    "keys_coherent_fraction": "matches moving with their neighbours",
    "keys_consistent_fraction": "matches passing the forward/backward check",
}


def quality_reasons(quality: dict) -> list[str]:
    """The verdict's reasons in plain words ("image similarity after registration 0.75 < 0.80 (ncc_after)")."""
    out = []
    for reason in quality.get("reasons", []):
        name, _, rest = str(reason).partition(" ")
        out.append(f"{QUALITY_WORDS[name]} {rest} ({name})" if name in QUALITY_WORDS and rest else str(reason))
    return out


def quality_summary(quality: dict | None) -> str:
    """The quality verdict for the panel, shown after Register: one line, its reasons after it ('' without one)."""
    if not quality:
        return ""
    verdict = str(quality.get("verdict", "?"))
    if verdict == "ok":
        return "Quality: ok (similarity, body overlap, coverage and matches within their usual ranges)"
    advice = "do not use it before checking it" if verdict == "failed" else "check it in the fused view"
    return f"Quality: {verdict.upper()} ({advice}): " + "; ".join(quality_reasons(quality))


def registration_lines(report: dict) -> list[str]:
    """The timing and size of a registration (Workspace.report) for the run log."""
    lines = []
    runtime, device = report.get("runtime_s"), report.get("device", "?")
    if runtime is not None:
        lines.append(f"registered in {float(runtime):.1f} s on {device}")
    keys = report.get("n_keypoints")
    if keys is not None:
        consistent = report.get("n_keypoints_consistent")
        lines.append(f"{keys} keypoints" + (f", {consistent} kept by the forward/backward check" if consistent else ""))
    memory = report.get("peak_memory_registration_mb", report.get("peak_memory_mb"))
    if memory is not None:
        lines.append(f"peak memory {float(memory) / 1024:.2f} GB")
    if report.get("uncertainty_s") is not None:
        lines.append(f"expected-error map in {float(report['uncertainty_s']):.1f} s")
    return lines


def pair_edit_line(edits: dict[str, list[int]], seconds: float, feedback: list[dict], action: str = "pairs") -> str:
    """One run-log line for an edit of the pairs (`action`: "pairs", "undo"): what changed ("added": [ids], "moved",
    "deleted", "restored"), how long the field took, and the pairs' residual RMS."""
    done = ", ".join(f"{what} {' '.join(str(i) for i in ids)}" for what, ids in edits.items() if ids) or "no change"
    rms = residual_rms_mm(feedback)
    return f"{action}: {done}; field updated in {seconds:.2f} s; {len(feedback)} pairs, residual RMS {rms:.2f} mm"


class RunLog:
    """The panel's run log: time-stamped lines of progress, messages, warnings, the verdict and the timing.

    Each line goes to every listener (the panel's text box, Python's logging) as it comes; `lines` keeps the last
    `max_lines`. A run (`begin` .. `end`) stamps its progress with the seconds since it began; `clock` gives the
    time (seconds since the epoch).
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_lines: int = 1000) -> None:
        self.clock = clock
        self.max_lines = max_lines
        self.lines: list[str] = []
        self.listeners: list[Callable[[str], None]] = []
        self.started: float | None = None
        self._last_progress = ""

    def _add(self, text: str) -> str:
        """Stamp a line with the time of day, keep it and hand it to the listeners."""
        line = f"{time.strftime('%H:%M:%S', time.localtime(self.clock()))}  {text}"
        self.lines.append(line)
        del self.lines[: -self.max_lines]
        for listener in list(self.listeners):
            listener(line)
        return line

    def elapsed_s(self) -> float:
        """Seconds since the run began (0 outside a run)."""
        return 0.0 if self.started is None else max(self.clock() - self.started, 0.0)

    def begin(self, title: str) -> str:
        """Start a run."""
        self.started, self._last_progress = self.clock(), ""
        return self._add(f"== {title}")

    def progress(self, fraction: float, message: str) -> str | None:
        """A step of the run (the library's progress callback); a step repeated as it is is not written again."""
        if message == self._last_progress:
            return None
        self._last_progress = message
        return self._add(f"{100 * float(fraction):3.0f} %  {message}  [{self.elapsed_s():.1f} s]")

    def say(self, message: str) -> str:
        """A message of the library (the Workspace's `say`)."""
        return self._add(message)

    def warn(self, message: str) -> str:
        """A warning."""
        return self._add(f"WARNING: {message}")

    def verdict(self, quality: dict | None) -> list[str]:
        """The quality verdict, one line per reason."""
        if not quality:
            return []
        lines = [self._add(f"quality: {quality.get('verdict', '?')}")]
        return lines + [self._add(f"  - {reason}") for reason in quality_reasons(quality)]

    def end(self, outcome: str) -> str:
        """End the run: 'done', 'cancelled', 'failed: why', with its time."""
        line = self._add(f"== {outcome} after {self.elapsed_s():.1f} s")
        self.started = None
        return line

    def text(self) -> str:
        """Every kept line."""
        return "\n".join(self.lines)


def residual_rms_mm(feedback: list[dict]) -> float:
    """The root-mean-square residual over a session's user pairs (0 without pairs)."""
    residuals = np.asarray([p["residual_mm"] for p in feedback], dtype=np.float64)
    return float(np.sqrt(np.mean(residuals**2))) if len(residuals) else 0.0


# ----------------------------------------------------------------------------- a session kept with the scene

SCENE_SESSION_VERSION = 1


def session_state_json(saved: dict, automatic: Correspondences) -> str:
    """What reopening a refinement session needs (session.json's content and the automatic matches) as JSON text.

    Slicer keeps it in a text node saved with the scene, so a reloaded scene can edit pairs and export
    without an output folder. `saved` holds "config", "working_geometry" and "user" (as session.json).
    """
    auto = automatic.subset(automatic.source == AUTOMATIC)
    state = {
        "version": SCENE_SESSION_VERSION,
        "session": saved,
        "automatic": {
            "fixed_lps": np.round(auto.fixed_lps, 4).tolist(),
            "displacement_mm": np.round(auto.displacement_mm, 4).tolist(),
            "confidence": np.round(auto.confidence, 6).tolist(),
        },
    }
    return json.dumps(state, default=str)


def session_state_from_json(text: str) -> tuple[dict, Correspondences]:
    """Inverse of session_state_json: (the saved session dict, the automatic correspondences)."""
    try:
        state = json.loads(text)
        if state.get("version") != SCENE_SESSION_VERSION:
            raise ValueError(f"version {state.get('version')!r}, this module reads {SCENE_SESSION_VERSION}")
        auto = state["automatic"]
        corr = Correspondences(auto["fixed_lps"], auto["displacement_mm"], auto["confidence"])
        return state["session"], corr
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise IkrError(f"the session saved with the scene is unreadable ({err})") from err


# ----------------------------------------------------------------------------- transforms, segmentations, export

# Transform export from Slicer: Slicer reads a NIfTI displacement field expecting intent code 1006
# (NIFTI_INTENT_DISPVECT; vtkMRMLTransformStorageNode::ReadFromImageFile warns otherwise) while SimpleITK writes
# a vector image with intent 1007 (NIFTI_INTENT_VECTOR) and cannot write 1006 (see io/transforms.py). NRRD has no
# intent code, and Slicer reads a NRRD grid without a "displacement field type" key as a resampling transform,
# which the field is. So the module writes .h5/.tfm (ITK transform) or .nrrd/.mha and steers .nii.gz to .h5.
SLICER_TRANSFORM_SUFFIXES = {".h5": "transform", ".tfm": "transform", ".nrrd": "field", ".mha": "field"}


def transform_export_kind(path: str | os.PathLike) -> str:
    """'transform' (ITK transform file) or 'field' (vector image) for an export path; refuses NIfTI with advice."""
    name = Path(path).name.lower()
    if name.endswith((".nii.gz", ".nii")):
        raise IkrError(
            "Slicer warns when it loads a NIfTI displacement field written here (intent code 1007, it expects 1006): "
            "export the transform as .h5 (or the field as .nrrd)",
            Path(path),
        )
    suffix = Path(name).suffix
    if suffix not in SLICER_TRANSFORM_SUFFIXES:
        raise IkrError(f"unsupported transform file type {suffix!r}; use .h5, .tfm, .nrrd or .mha", Path(path))
    return SLICER_TRANSFORM_SUFFIXES[suffix]


def transform_action(parent_ids: list[str], own_id: str | None) -> str:
    """How to read a volume whose chain of parent transforms (nearest first) is `parent_ids`.

    'direct': no transform, or only the module's own (its voxels are read in their own frame: the module's
    transform is what it computes, so a second Register reads the moving volume as the first did);
    'harden': another transform (e.g. the regularisation transform Slicer's DICOM reader puts over a tilted or
    unevenly spaced CT) comes first: a temporary hardened copy is read.
    """
    foreign = [t for t in parent_ids if t != own_id]
    return "harden" if foreign else "direct"


def segmentations_following_moving(
    moving_parent_id: str | None,
    candidates: list[tuple[str, str | None, str | None]],
    moving_id: str,
    chosen_ids: set[str],
) -> list[str]:
    """Segmentation node IDs to put under the module's transform when the moving volume first goes under it.

    `candidates` are (segmentation ID, its parent transform ID, its reference-geometry volume ID). A
    segmentation drawn on the moving CT before registration lies in the moving CT's frame: it must follow the
    moving volume under the transform (else Slicer would resample it through the transform when it is exported
    against the moving volume, and the library would warp it a second time). Those are the segmentations with
    the same parent transform as the moving volume had that were drawn on it (their reference geometry is the
    moving volume) or that the module uses as moving-side inputs (`chosen_ids`: tumour, moving mask).
    A segmentation drawn after registration, in the views where the moving CT is shown registered, lies in
    the fixed frame and is not moved: Slicer's export through the transform is then what brings it back.
    """
    return [
        seg_id
        for seg_id, parent_id, reference_id in candidates
        if parent_id == moving_parent_id and (reference_id == moving_id or seg_id in chosen_ids)
    ]


# The module's review layout: three linked axial slice views side by side. The view colours are Slicer's own
# for these singleton tags (vtkMRMLLayoutLogic); the layout ID is the module's (any number Slicer does not use).
REVIEW_LAYOUT_ID = 8621
REVIEW_VIEWS = (("Red", "fixed", "#F34A33"), ("Yellow", "moving", "#EDD54C"), ("Green", "fused", "#6EB04B"))


def review_layout_xml() -> str:
    """Slicer layout XML: fixed | moving | fused axial slice views in one row."""
    items = "".join(
        f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
        '<property name="orientation" action="default">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{colour}</property>'
        "</view></item>"
        for tag, label, colour in REVIEW_VIEWS
    )
    return f'<layout type="horizontal">{items}</layout>'


# Margin colours (mm): red where the tumour is not covered (< 0), yellow for a thin margin (0-5), green >= 5.
MARGIN_CLASSES = ((-np.inf, 0.0, "tumour outside the zone (< 0 mm)", (0.85, 0.1, 0.1)),
                  (0.0, 5.0, "thin margin (0-5 mm)", (0.95, 0.8, 0.1)),
                  (5.0, np.inf, "margin >= 5 mm", (0.15, 0.65, 0.25)))  # fmt: skip
MARGIN_TABLE_RANGE_MM = (-5.0, 10.0)
MARGIN_TABLE_STEP_MM = 0.5


def margin_color_table() -> list[tuple[str, tuple[float, float, float]]]:
    """(name, RGB) entries of the clinical margin colour table, mapped linearly onto MARGIN_TABLE_RANGE_MM.

    One entry per 0.5 mm, each coloured by the class its centre falls in, so the colour changes exactly at
    0 and 5 mm; margins beyond the range take the end colours (red below -5, green above 10).
    """
    lo, hi = MARGIN_TABLE_RANGE_MM
    n = int(round((hi - lo) / MARGIN_TABLE_STEP_MM))
    out = []
    for i in range(n):
        centre = lo + (i + 0.5) * MARGIN_TABLE_STEP_MM
        low, high, name, rgb = next(c for c in MARGIN_CLASSES if c[0] <= centre < c[1])
        out.append((name, rgb))
    return out


def margin_lookup_table() -> vtkLookupTable:
    """The margin colour table as a vtkLookupTable over MARGIN_TABLE_RANGE_MM (what Slicer's colour node maps)."""
    table = margin_color_table()
    lut = vtkLookupTable()
    lut.SetNumberOfTableValues(len(table))
    for i, (_, rgb) in enumerate(table):
        lut.SetTableValue(i, *rgb, 1.0)
    lut.SetTableRange(*MARGIN_TABLE_RANGE_MM)
    return lut


# ----------------------------------------------------------------------------- margins and weights


def margin_polydata_ras(points_lps: np.ndarray, triangles: np.ndarray, margins_mm: np.ndarray) -> vtkPolyData:
    """The tumour surface in RAS with point scalars `margin_mm`, ready for a Slicer model node."""
    from .review.margin import Surface

    poly = Surface(lps_ras(points_lps), np.asarray(triangles)).to_vtk()
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(margins_mm, dtype=np.float32), deep=True)
    if not isinstance(scalars, vtkFloatArray):
        raise IkrError("could not convert the margins to a vtk float array")
    scalars.SetName("margin_mm")
    poly.GetPointData().SetScalars(scalars)
    return poly
