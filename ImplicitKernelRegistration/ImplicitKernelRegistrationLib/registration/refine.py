"""Interactive refinement: a clicked pair is one more key; the field is rebuilt locally, no re-matching.

A user pair (fixed point p, moving point q, LPS mm) enters the kernel's key set with a higher trust
than automatic matches; automatic matches near it that contradict it are down-weighted. Because the
kernel is a weighted average, the reconstructed field passes near but not exactly through a pair, so
a small, compactly supported correction (Wendland C2 bumps, one per pair, solved jointly) makes the
field reproduce every pair exactly at its fixed point. With regions (the lungs, dense.py) a pair is a
key of the region of its fixed point and its correction stays inside that region. Only the control
points whose K nearest keys change, and the part of the grid those touch, are recomputed; undo
restores the previous field exactly. One undo step is one edit (an add of one pair, a remove, a move of a
pair to new points), or every edit made inside `one_step()` (what one action of the user changed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..core.correspondences import USER, Correspondences
from ..core.errors import IkrError
from ..core.fields import Field, jacobian_determinant, sample_field
from ..core.geometry import Geometry, Image, mm_to_voxels, voxels_to_mm
from .alignment import Alignment
from .dense import EMPTY_BOX, Box, DenseModel, box_slices, full_box, index_box, union_box
from .features import mind_ssc
from .pipeline import RegistrationConfig, RegistrationResult, load_kernel, resolve_device
from .preprocess import lung_mask, make_working_pair, normalise_ct, resample_to, to_tensor
from .residual import residual_shape

# A clicked pair gets the highest confidence an automatic match can have (1, the top of the range
# the kernel was trained on); its extra trust comes from down-weighting contradicting matches and
# from the exactness correction. Measured on 8 clicks of true matches in two abdominal cases (3 mm
# grid): confidence 4 gained more on average (0.44 mm near the click) but made 3 of 8 neighbourhoods
# worse; confidence 1 improved all 8 (0.21 mm with a 15 mm correction radius, 0.31 mm with 30 mm).
USER_CONFIDENCE = 1.0
CORRECTION_RADIUS_MM = 25.0  # support of the exactness correction around each pair (see above)
CONTRADICTION_RADIUS_MM = 20.0  # automatic matches this close to a pair are checked against it
CONTRADICTION_TOLERANCE_MM = 3.0  # ... and down-weighted when they disagree by more than about this
DISAGREEMENT_WARNING_MM = 10.0  # a pair this far from what the field said there gets a warning


@dataclass
class UserPair:
    """A clicked correspondence: fixed and moving points in LPS mm, an id that never changes, a label."""

    id: int
    fixed_lps: np.ndarray
    moving_lps: np.ndarray
    label: str = ""

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "id": self.id,
            "fixed_lps": [float(v) for v in self.fixed_lps],
            "moving_lps": [float(v) for v in self.moving_lps],
            "label": self.label,
        }

    @staticmethod
    def from_dict(data: dict) -> UserPair:
        """Inverse of to_dict."""
        return UserPair(
            int(data["id"]), np.asarray(data["fixed_lps"], float), np.asarray(data["moving_lps"], float), data["label"]
        )


def wendland(r: np.ndarray, radius: float) -> np.ndarray:
    """Wendland's C2 function (1 - r/R)^4 (4 r/R + 1), zero beyond R; positive definite in 3D."""
    t = np.clip(np.asarray(r, dtype=np.float64) / radius, 0.0, 1.0)
    return (1.0 - t) ** 4 * (4.0 * t + 1.0)


class RefinementSession:
    """The automatic correspondences, the user pairs, and the field they give on the fixed grid."""

    def __init__(
        self, model: DenseModel, target: Geometry, automatic: Correspondences, pairs: list[UserPair] | None = None
    ) -> None:
        self.model = model.copy()  # the session edits its own copy, never the registration it was given
        self.target = target
        self.automatic = automatic.subset(automatic.confidence > 0)
        self.pairs: list[UserPair] = []
        self.next_id = 1
        self.history: list[list[tuple[str, UserPair, dict]]] = []  # undo steps, each the edits it undoes
        self._open_step: list[tuple[str, UserPair, dict]] | None = None  # collects the edits of one_step()
        self.disagreement_mm: dict[int, float] = {}
        for pair in pairs or []:
            self.pairs.append(pair)
            self.next_id = max(self.next_id, pair.id + 1)
        self.model.set_keys(*self._keys())
        self.base = self.model.field_on(target)
        self.field = Field(self.base.displacement_mm.copy(), target)
        if self.pairs:
            self._rebuild(full_box(self.target))

    # ------------------------------------------------------------------------------------ edits

    def add_correspondences(
        self, fixed_lps: np.ndarray, moving_lps: np.ndarray, labels: list[str] | None = None
    ) -> list[int]:
        """Add clicked pairs (LPS mm, (N, 3) each); rebuild the field locally; return their ids."""
        fixed_lps = np.atleast_2d(np.asarray(fixed_lps, dtype=np.float64))
        moving_lps = np.atleast_2d(np.asarray(moving_lps, dtype=np.float64))
        self._check_points(fixed_lps, moving_lps)
        labels = labels or [""] * len(fixed_lps)
        ids = []
        for p, q, label in zip(fixed_lps, moving_lps, labels, strict=True):
            pair = UserPair(self.next_id, p, q, label or f"pair {self.next_id}")
            self.next_id += 1
            self._apply("add", pair)
            ids.append(pair.id)
        return ids

    def remove_correspondence(self, pair_id: int) -> None:
        """Remove a user pair by id and rebuild the field locally."""
        self._apply("remove", self._pair(pair_id))

    def move_correspondence(self, pair_id: int, fixed_lps: np.ndarray, moving_lps: np.ndarray) -> None:
        """Move a user pair to new points (LPS mm; a dragged point): same id, label and place in the list.

        Removed and added again (so its disagreement is measured against the field without it) as one undo step.
        """
        old = self._pair(pair_id)
        p = np.asarray(fixed_lps, dtype=np.float64).reshape(1, 3)
        q = np.asarray(moving_lps, dtype=np.float64).reshape(1, 3)
        self._check_points(p, q)
        position = self.pairs.index(old)
        with self.one_step():
            self._apply("remove", old)
            self._apply("add", UserPair(old.id, p[0], q[0], old.label), position)

    @contextmanager
    def one_step(self) -> Iterator[None]:
        """Every edit made inside is undone by one `undo` (nested: the outermost step counts).

        When an edit inside fails, the edits made before it stay applied and still form one undo step.
        """
        if self._open_step is not None:
            yield
            return
        self._open_step = []
        try:
            yield
        finally:
            step, self._open_step = self._open_step, None
            if step:
                self.history.append(step)

    def undo(self) -> None:
        """Undo the last step (one edit, or the edits of one `one_step`); the field returns exactly to what it was."""
        if not self.history:
            raise IkrError("nothing to undo")
        for action, pair, saved in reversed(self.history.pop()):
            self._undo_edit(action, pair, saved)

    def _undo_edit(self, action: str, pair: UserPair, saved: dict) -> None:
        """Undo one edit recorded by _apply."""
        if action == "add":
            self.pairs = [p for p in self.pairs if p.id != pair.id]
            if saved["disagreement"] is None:
                self.disagreement_mm.pop(pair.id, None)
            else:
                self.disagreement_mm[pair.id] = saved["disagreement"]
        else:
            self.pairs.insert(saved["position"], pair)
        self.model.restore(saved["control"], saved["values"], saved["neighbours"], saved["kth"], self._keys())
        region = box_slices(saved["box"])
        self.base.displacement_mm[region] = saved["base"]
        self.field.displacement_mm[region] = saved["field"]

    # --------------------------------------------------------------------------------- feedback

    def feedback(self) -> list[dict]:
        """Per user pair: residual after reconstruction (mm), disagreement with the field before it, warnings."""
        out = []
        for pair in self.pairs:
            residual = float(
                np.linalg.norm(pair.fixed_lps + sample_field(self.field, pair.fixed_lps[None])[0] - pair.moving_lps)
            )
            warnings = []
            disagreement = self.disagreement_mm.get(pair.id)
            if disagreement is not None and disagreement > DISAGREEMENT_WARNING_MM:
                warnings.append(
                    f"moves the field by {disagreement:.1f} mm here: check that the two points show the same anatomy"
                )
            min_j = self._min_jacobian_near(pair.fixed_lps)
            if min_j <= 0:
                warnings.append(f"the field folds near this pair (Jacobian {min_j:.2f}): the pair may be wrong")
            out.append(
                {
                    "id": pair.id,
                    "label": pair.label,
                    "fixed_lps": pair.fixed_lps.tolist(),
                    "moving_lps": pair.moving_lps.tolist(),
                    "residual_mm": residual,
                    "disagreement_mm": disagreement,
                    "min_jacobian_nearby": min_j,
                    "warnings": warnings,
                }
            )
        return out

    def user_correspondences(self) -> Correspondences:
        """The user pairs as Correspondences (source USER, confidence 1)."""
        if not self.pairs:
            return Correspondences(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, np.int8))
        fixed = np.array([p.fixed_lps for p in self.pairs])
        moving = np.array([p.moving_lps for p in self.pairs])
        return Correspondences(fixed, moving - fixed, np.ones(len(fixed)), np.full(len(fixed), USER, np.int8))

    def to_dict(self) -> dict:
        """The user pairs and the next id (what a saved session needs besides the automatic matches)."""
        return {"next_id": self.next_id, "pairs": [p.to_dict() for p in self.pairs]}

    # -------------------------------------------------------------------------------- internals

    def _check_points(self, fixed_lps: np.ndarray, moving_lps: np.ndarray) -> None:
        """Refuse NaN, unpaired or out-of-image points."""
        if fixed_lps.shape != moving_lps.shape or fixed_lps.shape[1:] != (3,):
            raise IkrError(
                f"{len(fixed_lps)} fixed points but {len(moving_lps)} moving points: every point needs a partner"
            )
        if not (np.all(np.isfinite(fixed_lps)) and np.all(np.isfinite(moving_lps))):
            raise IkrError("a clicked point has a NaN or infinite coordinate")
        outside = ~self.target.contains_lps(fixed_lps)
        if np.any(outside):
            raise IkrError(
                f"fixed point {fixed_lps[outside][0].round(1).tolist()} (LPS mm) lies outside the fixed image"
            )

    def _keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Automatic keys (down-weighted where they contradict a pair) then user keys, in working voxels.

        The model's residual (residual.py) stays in place under refinement, so a user key carries what
        the kernel must add to it: (q - p) - residual(p).
        """
        working = self.model.working
        conf = self.automatic.confidence.copy()
        user = self.user_correspondences()
        for p, d in zip(user.fixed_lps, user.displacement_mm, strict=True):
            near = np.linalg.norm(self.automatic.fixed_lps - p, axis=1) < CONTRADICTION_RADIUS_MM
            diff = np.linalg.norm(self.automatic.displacement_mm[near] - d, axis=1)
            conf[near] *= np.exp(-0.5 * (diff / CONTRADICTION_TOLERANCE_MM) ** 2)
        fixed = np.concatenate([self.automatic.fixed_lps, user.fixed_lps])
        moving = np.concatenate([self.automatic.moving_lps, user.moving_lps])
        disp = self.model.key_displacement_mm(fixed, moving)  # in the aligned space of the keys
        if len(user):
            user_xyz = torch.tensor(working.lps_to_index(user.fixed_lps), dtype=torch.float32)
            disp[len(self.automatic) :] -= voxels_to_mm(self.model.residual_at(user_xyz).cpu().numpy(), working)
        conf = np.concatenate([np.maximum(conf, 1e-6), np.full(len(user), USER_CONFIDENCE)])
        return key_tensors(fixed, disp, conf, working, self.model.device)

    def _pair_box(self, pairs: list[UserPair]) -> Box:
        """The index box within the correction radius of any of `pairs` (empty when none)."""
        if not pairs:
            return EMPTY_BOX
        idx = self.target.lps_to_index(np.array([p.fixed_lps for p in pairs]))
        reach = CORRECTION_RADIUS_MM / np.asarray(self.target.spacing_mm) + 1
        return index_box(idx.min(axis=0) - reach, idx.max(axis=0) + reach, self.target)

    def _pair(self, pair_id: int) -> UserPair:
        """The user pair with this id (refused when there is none)."""
        pair = next((p for p in self.pairs if p.id == pair_id), None)
        if pair is None:
            known = ", ".join(str(p.id) for p in self.pairs) or "none"
            raise IkrError(f"there is no user pair with id {pair_id} (ids: {known})")
        return pair

    def _apply(self, action: str, pair: UserPair, position: int | None = None) -> None:
        """Add (at `position`, default last) or remove one pair, recompute the affected region, remember how to undo
        it: as its own undo step, or in the step one_step() collects. An added pair's disagreement is measured
        against the field before it."""
        before_pairs = list(self.pairs)
        saved_model = (self.model.values.clone(), self.model.neighbours.clone(), self.model.kth_distance.clone())
        if action == "add":
            position = len(self.pairs) if position is None else position
            saved = {"position": position, "disagreement": self.disagreement_mm.get(pair.id)}
            before = sample_field(self.field, pair.fixed_lps[None])[0]
            self.disagreement_mm[pair.id] = float(np.linalg.norm(pair.moving_lps - pair.fixed_lps - before))
            self.pairs.insert(position, pair)
        else:
            saved = {"position": next(i for i, p in enumerate(self.pairs) if p.id == pair.id)}
            self.pairs = [p for p in self.pairs if p.id != pair.id]
        control = self.model.update_keys(*self._keys())
        box = union_box(self.model.target_box(self.target, control), self._pair_box(before_pairs + [pair]))
        region = box_slices(box)
        saved.update(
            {
                "control": control,
                "values": saved_model[0][control],
                "neighbours": saved_model[1][control],
                "kth": saved_model[2][control],
                "box": box,
                "base": self.base.displacement_mm[region].copy(),
                "field": self.field.displacement_mm[region].copy(),
            }
        )
        edit = (action, pair, saved)
        if self._open_step is not None:
            self._open_step.append(edit)
        else:
            self.history.append([edit])
        self._rebuild(box)

    def _rebuild(self, box: Box) -> None:
        """Recompute the kernel field in an index box, then add the exactness correction of every pair."""
        if any(hi <= lo for lo, hi in box):
            return
        region = box_slices(box)
        self.model.field_on(self.target, box, out=self.base)
        self.field.displacement_mm[region] = self.base.displacement_mm[region]
        if not self.pairs:
            return
        fixed = np.array([p.fixed_lps for p in self.pairs])
        wanted = np.array([p.moving_lps - p.fixed_lps for p in self.pairs])
        residual = wanted - sample_field(self.base, fixed)
        weights = self.model.target_weights(self.target)
        if weights is None:
            gram = wendland(np.linalg.norm(fixed[:, None] - fixed[None], axis=-1), CORRECTION_RADIUS_MM)
        else:
            gram = self._region_gram(fixed, weights)
        coef = np.linalg.solve(gram + 1e-9 * np.eye(len(fixed)), residual)
        for pair, c in zip(self.pairs, coef, strict=True):
            (z0, z1), (y0, y1), (x0, x1) = _intersect(self._pair_box([pair]), box)
            if z1 <= z0 or y1 <= y0 or x1 <= x0:
                continue
            zz, yy, xx = np.meshgrid(np.arange(z0, z1), np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
            pts = self.target.index_to_lps(np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1))
            weight = wendland(np.linalg.norm(pts - pair.fixed_lps, axis=1), CORRECTION_RADIUS_MM)
            if weights is not None:
                weight *= weights[self._region_of(pair.fixed_lps[None])[0], z0:z1, y0:y1, x0:x1].ravel()
            bump = (weight[:, None] * c[None]).reshape(z1 - z0, y1 - y0, x1 - x0, 3)
            self.field.displacement_mm[z0:z1, y0:y1, x0:x1] += bump.astype(np.float32)

    def _region_of(self, points_lps: np.ndarray) -> np.ndarray:
        """The region (N,) of fixed points, as their keys have it (dense.DenseModel.region_at)."""
        working = torch.tensor(self.model.working.lps_to_index(points_lps), dtype=torch.float32)
        return self.model.region_at(working).cpu().numpy()

    def _region_gram(self, fixed: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """gram[i, j]: pair j's correction (a Wendland bump times its region's weight), sampled at pair i's fixed
        point as sample_field samples the field (trilinear between voxels), so that solving with it is exact."""
        own = self._region_of(fixed)
        idx = self.target.lps_to_index(fixed)
        lo = np.floor(idx)
        frac = idx - lo
        size = np.asarray(self.target.size)
        gram = np.zeros((len(fixed), len(fixed)))
        for corner in np.ndindex(2, 2, 2):
            offset = np.asarray(corner)
            c = np.clip(lo + offset, 0, size - 1).astype(int)
            w = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
            region_weight = weights[own[None, :], c[:, 2, None], c[:, 1, None], c[:, 0, None]]  # (corner i, pair j)
            pts = self.target.index_to_lps(c.astype(np.float64))
            basis = wendland(np.linalg.norm(pts[:, None] - fixed[None], axis=-1), CORRECTION_RADIUS_MM)
            gram += w[:, None] * basis * region_weight
        return gram

    def _min_jacobian_near(self, point_lps: np.ndarray) -> float:
        """The smallest Jacobian determinant of the field within the correction radius of a point."""
        idx = np.round(self.target.lps_to_index(point_lps[None])[0]).astype(int)
        reach = np.ceil(CORRECTION_RADIUS_MM / np.asarray(self.target.spacing_mm)).astype(int) + 1
        lo = np.maximum(idx - reach, 0)
        hi = np.minimum(idx + reach + 1, np.asarray(self.target.size))
        sub = self.field.displacement_mm[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        if min(sub.shape[:3]) < 3:
            return 1.0
        origin = self.target.index_to_lps(lo[None].astype(float))[0]
        geom = Geometry(tuple(int(v) for v in hi - lo), self.target.spacing_mm, tuple(origin), self.target.direction)
        return float(jacobian_determinant(Field(np.ascontiguousarray(sub), geom)).min())


def key_tensors(
    fixed_lps: np.ndarray, displacement_mm: np.ndarray, confidence: np.ndarray, working: Geometry, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys in LPS mm -> the kernel's tensors: positions and displacements in working voxels, confidences."""
    return (
        torch.tensor(working.lps_to_index(fixed_lps), dtype=torch.float32, device=device),
        torch.tensor(mm_to_voxels(displacement_mm, working), dtype=torch.float32, device=device),
        torch.tensor(confidence, dtype=torch.float32, device=device),
    )


def _intersect(a: Box, b: Box) -> Box:
    """The intersection of two index boxes (possibly empty)."""
    return tuple((max(x[0], y[0]), min(x[1], y[1])) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def check_moving_points(moving_lps: np.ndarray, moving: Geometry, source: object | None = None) -> None:
    """Refuse clicked moving points that lie outside the moving image (a wrong file or a wrong coordinate system)."""
    points = np.atleast_2d(np.asarray(moving_lps, dtype=np.float64))
    if not np.all(np.isfinite(points)):
        raise IkrError("a clicked moving point has a NaN or infinite coordinate", source)
    outside = ~moving.contains_lps(points)
    if np.any(outside):
        raise IkrError(
            f"moving point {points[outside][0].round(1).tolist()} (LPS mm) lies outside the moving image", source
        )


def session_from_result(result: RegistrationResult, fixed: Image) -> RefinementSession:
    """A refinement session on a registration just computed (in memory, e.g. in Slicer)."""
    return RefinementSession(result.model, fixed.geometry, result.correspondences)


def open_session(
    fixed: Image,
    saved: dict,
    automatic: Correspondences,
    moving: Image | None = None,
    fixed_mask: Image | None = None,
    residual: np.ndarray | None = None,
) -> RefinementSession:
    """Rebuild a session from a saved one (session.json's content) and its automatic correspondences.

    When the registration fitted a residual (config residual_iterations > 0) it is the saved grid
    `residual` (3, z, y, x; io.outputs.read_residual). A folder written before the grid was saved has
    none: the residual is then fitted again, the same way, on the kernel field of the automatic
    correspondences, which needs `moving` (and the fixed mask the registration was given, if any).
    """
    try:
        # A session saved before the residual stage existed had none, and none saved before it was robust.
        old = {"residual_iterations": 0, "residual_robust": 0.0, "lung_regions": False}
        config = RegistrationConfig.from_dict({**old, **saved["config"]})
        working = Geometry.from_dict(saved["working_geometry"])
        pairs = [UserPair.from_dict(p) for p in saved.get("user", {}).get("pairs", [])]
        next_id = int(saved.get("user", {}).get("next_id", 1))
    except (KeyError, TypeError, ValueError) as err:
        raise IkrError(f"the saved session is incomplete or from an incompatible version ({err})") from err
    try:
        alignment = Alignment.from_dict(saved["alignment"]) if saved.get("alignment") else None
    except (KeyError, TypeError, ValueError) as err:
        raise IkrError(f"the saved session's alignment is unreadable ({err})") from err
    device = resolve_device(config.device)
    kernel = load_kernel(config, device)
    fixed_hu = resample_to(fixed, working)
    features = mind_ssc(to_tensor(normalise_ct(fixed_hu.array), device))
    regions = None
    if config.lung_regions:  # the registration's lung mask, built again the same way (make_working_pair)
        lungs = lung_mask(fixed_hu)
        regions = torch.from_numpy(lungs).to(device) if lungs.any() else None
    model = DenseModel(kernel, features, working, config.control_step_vox, alignment=alignment, regions=regions)
    if config.residual_iterations > 0 and residual is not None:
        if residual.shape != (3, *residual_shape(working.shape_zyx, config.residual_step_vox)):
            raise IkrError(f"the saved residual's grid {list(residual.shape)} does not fit the working grid")
        model.residual = torch.from_numpy(np.asarray(residual, dtype=np.float32))[None].to(device)
    elif config.residual_iterations > 0:
        if moving is None:
            raise IkrError("the saved registration fitted a residual to the images: reopening needs the moving image")
        start = None if alignment is None else alignment.to_sitk()
        pair = make_working_pair(fixed, moving, config.spacing_mm, device, fixed_mask, alignment=start)
        auto = automatic.subset(automatic.confidence > 0)
        keys = model.key_displacement_mm(auto.fixed_lps, auto.moving_lps)
        model.set_keys(*key_tensors(auto.fixed_lps, keys, auto.confidence, working, device))
        model.fit_residual(mind_ssc(pair.moving), pair.fixed_mask, config.residual_settings(), config.seed)
    session = RefinementSession(model, fixed.geometry, automatic, pairs)
    session.next_id = max(session.next_id, next_id)
    return session
