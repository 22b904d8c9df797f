"""One registration folder and what is done to it: the service behind the `ikr` CLI and the Slicer module.

A `Workspace` owns one output folder (or, with no folder, a registration kept in memory only, as the
Slicer module has before an output folder is chosen):

- `register` into it: the inputs' fingerprints, the folder lock, overwrite rules (an earlier result is
  replaced only when asked; its clicked pairs are kept in user_pairs_before_overwrite.csv), every output
  written all or nothing (io.outputs);
- `open` it again; `refine` it in one step (add and remove clicked pairs, rewrite every output, as
  `ikr refine`), or edit pairs one at a time in memory (`add_pairs`, `remove_pair`, `undo`, as the
  Slicer module does), then `save_pairs` (session.json and correspondences.csv); refinement stays exact
  (registration.refine), and one user action (`edit_pairs`, `move_pair`) is one undo step;
- the expected-error map, click suggestions, margins and the margin report, exports.

Every write to the folder holds its lock (io.guard.folder_lock). A workspace that edits pairs one at a
time refuses to save over pairs another program wrote since it last read or wrote them (it says to
reopen), so no clinician's click is lost silently. The folder's format is io.outputs.WorkspaceFiles.
Nothing here imports torch at module import: the CLI's light commands stay light.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .core.errors import IkrError
from .io.guard import LOCK_WAIT_S

if TYPE_CHECKING:
    from .core.correspondences import Correspondences
    from .core.fields import Field
    from .core.geometry import Image
    from .registration.alignment import Alignment
    from .registration.pipeline import RegistrationConfig, RegistrationResult
    from .registration.refine import RefinementSession
    from .review.margin import MarginResult

Progress = Callable[[float, str], None]
PREVIOUS_PAIRS_FILE = "user_pairs_before_overwrite.csv"
SUGGESTIONS_FILE = "suggestions.csv"
MARGIN_FOLDER = "margin"
TRANSFORM_SUFFIXES = (".h5", ".tfm", ".txt", ".mat")  # an ITK transform file; other suffixes: a displacement image


def _say_on_stderr(message: str) -> None:
    """Tell the person at the terminal (stderr)."""
    print(message, file=sys.stderr, flush=True)


def is_registration_folder(folder: str | os.PathLike | None) -> bool:
    """Whether `folder` holds a registration (a session.json)."""
    from .io.outputs import OUTPUT_FILES

    return folder is not None and str(folder) not in ("", ".") and (Path(folder) / OUTPUT_FILES["session"]).is_file()


@dataclass
class Suggestions:
    """Where one clicked pair would remove the most expected error: fixed-space points and the error there."""

    points_lps: np.ndarray  # (k, 3) LPS mm, voxel centres of the expected-error map
    expected_error_mm: np.ndarray  # (k,) the map's value at each point

    def csv_text(self) -> str:
        """suggestions.csv: x, y, z (LPS mm), expected_error_mm."""
        lines = ["x,y,z,expected_error_mm"]
        for p, v in zip(self.points_lps, self.expected_error_mm, strict=True):
            lines.append(f"{p[0]:.2f},{p[1]:.2f},{p[2]:.2f},{v:.2f}")
        return "\n".join(lines) + "\n"


@dataclass
class MarginReview:
    """Margins of a tumour (moving) against an ablation zone (fixed) through the workspace's field.

    `interval`: the minimal margin's 5-95 % interval over the expected error (uncertainty.margin_interval),
    with `error_map` the map it came from; both None without a registration or when it is not available
    (`interval_problem` says why).
    """

    result: MarginResult
    interval: dict | None = None
    error_map: Image | None = None
    interval_problem: str | None = None

    def figures(self) -> dict:
        """margin.json's figures: the margin's and the interval's."""
        return {**self.result.figures(), **(self.interval or {})}


class Workspace:
    """One registration folder (None: in memory only): register, open, refine, review and export it."""

    def __init__(
        self,
        folder: str | os.PathLike | None = None,
        command: str = "ikr",
        say: Callable[[str], None] | None = None,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        self.folder = Path(folder) if folder is not None and str(folder) not in ("", ".") else None
        self.command = command
        self.say = say or _say_on_stderr
        self.lock_wait_s = lock_wait_s
        self.saved: dict | None = None  # session.json's content (io.outputs.WorkspaceFiles.session)
        self.report: dict = {}
        self.fixed: Image | None = None
        self.moving: Image | None = None
        self.result: RegistrationResult | None = None  # a registration computed in this process
        self.session: RefinementSession | None = None
        self.automatic: Correspondences | None = None
        self.quality: dict | None = None
        self._error_map: Image | None = None
        self._seen_sha256: str | None = None  # correspondences.csv as this workspace last read or wrote it

    # ------------------------------------------------------------------------------------ the folder

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the folder's lock (nothing without a folder); remove temporaries of killed runs, saying so."""
        if self.folder is None:
            yield
            return
        from .io.guard import folder_lock, remove_stale_temporaries

        with folder_lock(self.folder, self.lock_wait_s, command=self.command):
            removed = remove_stale_temporaries(self.folder)
            if removed:
                self.say(
                    f"{self.command}: removed {removed} temporary files left by an interrupted run in {self.folder}"
                )
            yield

    def _check_writable(self) -> None:
        """Refuse a folder this process cannot write."""
        from .io.guard import check_writable

        if self.folder is not None:
            check_writable(self.folder)

    def _refuse_interrupted(self) -> None:
        """Refuse to read a folder whose last write was interrupted (its files may mix two generations)."""
        from .io.outputs import interrupted_generation

        if self.folder is not None and interrupted_generation(self.folder) is not None:
            problem = f"its last write was interrupted; run `ikr refine {self.folder}` to rebuild its outputs"
            raise IkrError(problem, self.folder)

    def _previous_pairs(self, overwrite: bool) -> list | None:
        """Refuse to register over an earlier ikr result unless `overwrite`; its clicked pairs (None: no result)."""
        from .io.outputs import check_output_folder, read_session

        if self.folder is None or not check_output_folder(self.folder):
            return None
        try:
            pairs = list(read_session(self.folder).get("user", {}).get("pairs", []))
        except (IkrError, AttributeError, TypeError):
            pairs = []
        if not overwrite:
            clicked = f" and {len(pairs)} clicked pairs" if pairs else ""
            raise IkrError(f"holds an earlier ikr result{clicked}; pass --overwrite to replace it", self.folder)
        return pairs

    def _keep_previous_pairs(self, pairs: list | None) -> None:
        """Write the clicked pairs of the result just replaced as a pair CSV `ikr refine --add` reads; say so."""
        if not pairs:
            return
        from .io.atomic import write_text_atomic

        lines = ["fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,label"]
        for p in pairs:
            label = str(p.get("label", "")).replace(",", " ").replace("\n", " ")
            lines.append(",".join(f"{v:.4f}" for v in (*p["fixed_lps"], *p["moving_lps"])) + f",{label}")
        path = write_text_atomic(self.folder / PREVIOUS_PAIRS_FILE, "\n".join(lines) + "\n")
        self.say(
            f"{self.command}: the {len(pairs)} clicked pairs of the replaced result are in {path};"
            f" apply them with: ikr refine {self.folder} --add {path}"
        )

    # ------------------------------------------------------------------------------------ register

    def register(
        self,
        fixed: Image | str | os.PathLike,
        moving: Image | str | os.PathLike,
        config: RegistrationConfig | dict | None = None,
        *,
        fixed_mask: Image | str | os.PathLike | None = None,
        moving_mask: Image | str | os.PathLike | None = None,
        landmarks: tuple | None = None,
        initial: Alignment | str | os.PathLike | None = None,
        inputs: dict | None = None,
        fixed_series: str | None = None,
        moving_series: str | None = None,
        overwrite: bool = False,
        check_memory: bool = True,
        progress: Progress | None = None,
    ) -> dict:
        """Register `moving` to `fixed` (image paths, DICOM folders or Images) into the folder; return the report.

        `landmarks`: (fixed, moving) point files or LPS arrays, for TRE figures; `initial`: a start transform
        (an ITK file or an Alignment); `inputs`: how the report names inputs given as Images. Paths are read
        under the folder lock, after the overwrite check. `progress(fraction, message)` may raise to cancel.
        """
        fallback_start = time.time()  # the command's start where /proc cannot tell the process's
        self._check_writable()
        with self._locked():
            previous = self._previous_pairs(overwrite)
            inputs = dict(inputs or {})
            fixed = self._input_image(fixed, fixed_series, "fixed", inputs)
            moving = self._input_image(moving, moving_series, "moving", inputs)
            fixed_mask = self._input_mask(fixed_mask)
            moving_mask = self._input_mask(moving_mask)
            landmarks = self._input_landmarks(landmarks, fixed, moving, inputs)
            initial = self._input_initial(initial, inputs)
            self._compute(fixed, moving, _config(config), fixed_mask, moving_mask, landmarks, initial, inputs,
                          check_memory, progress)  # fmt: skip
            if self.folder is not None:
                if progress is not None:
                    progress(1.0, "writing the output folder")
                self._write_everything(fallback_start, replace=previous is not None)
                self._keep_previous_pairs(previous)
        return self.report

    def _input_image(self, image: Image | str | os.PathLike, series_uid: str | None, role: str, inputs: dict) -> Image:
        """An input image as given, or read from its path (a DICOM folder: say which series and why)."""
        from .core.geometry import Image

        if isinstance(image, Image):
            inputs.setdefault(role, image.meta.get("path", f"{role} image (in memory)"))
            return image
        from .io.images import read_image
        from .registration.preprocess import check_voxel_spacing

        path = Path(image)
        read = read_image(path, series_uid=series_uid, choose_series=True)
        check_voxel_spacing(read, str(image))
        inputs[role] = str(path.resolve())
        choice = read.meta.get("series_choice")
        if choice:
            self.say(f"{self.command}: {role} image: {choice['why']}")
            inputs[f"{role}_series"] = choice
        return read

    @staticmethod
    def _input_mask(mask: Image | str | os.PathLike | None) -> Image | None:
        """A mask as given, or read from its path and checked to be a mask."""
        from .core.geometry import Image

        if mask is None or isinstance(mask, Image):
            return mask
        from .io.images import read_mask

        return read_mask(Path(mask))

    @staticmethod
    def _input_landmarks(landmarks: tuple | None, fixed: Image, moving: Image, inputs: dict) -> tuple | None:
        """Landmark arrays (LPS mm) from (fixed, moving) point files paired by order, or as given."""
        if landmarks is None:
            return None
        first, second = landmarks
        if isinstance(first, np.ndarray):
            return first, second
        from .io.points import pair_points, read_points

        f = read_points(Path(first), fixed.geometry)
        m = read_points(Path(second), moving.geometry)
        inputs["fixed_landmarks"] = str(Path(first).resolve())
        inputs["moving_landmarks"] = str(Path(second).resolve())
        fixed_lps, moving_lps, _ = pair_points(f, m, by="order")
        return fixed_lps, moving_lps

    @staticmethod
    def _input_initial(initial: Alignment | str | os.PathLike | None, inputs: dict) -> Alignment | None:
        """The start transform as given, or read from an ITK transform file."""
        if initial is None or not isinstance(initial, (str, os.PathLike)):
            return initial
        from .registration.alignment import read_initial_transform

        inputs["initial"] = str(Path(initial).resolve())
        return read_initial_transform(str(initial))

    def _compute(
        self,
        fixed: Image,
        moving: Image,
        config: RegistrationConfig,
        fixed_mask: Image | None,
        moving_mask: Image | None,
        landmarks: tuple | None,
        initial: Alignment | None,
        inputs: dict,
        check_memory: bool,
        progress: Progress | None,
    ) -> None:
        """Register, evaluate and compute the expected-error map; the workspace then holds them (nothing written)."""
        from .io.guard import fingerprint
        from .io.outputs import check_output_folder
        from .registration.memory import check_memory as check_peak_memory
        from .registration.pipeline import register
        from .review.quality import assess
        from .review.report import field_quality, landmark_errors
        from .review.uncertainty import expected_error_map

        if self.folder is not None:
            check_output_folder(self.folder)
        if check_memory:
            check_peak_memory(fixed.geometry, config.spacing_mm)
        result = register(fixed, moving, config, fixed_mask, moving_mask, progress, initial)
        report = dict(result.report)
        report["peak_memory_registration_mb"] = report["peak_memory_mb"]

        def figures() -> tuple[dict, dict]:
            """Field quality, TRE and the quality verdict (numpy and SimpleITK: they release the GIL)."""
            out = field_quality(result.field)
            if landmarks is not None:
                out.update(landmark_errors(result.field, *landmarks))
            n_consistent = report.get("n_keypoints_consistent")
            return out, assess(fixed, moving, result.field, result.correspondences, result.alignment, n_consistent)

        # The figures in a second thread while the expected-error map (torch) is computed: independent steps
        # that together take about a third of the command's time, most of it single-threaded.
        with ThreadPoolExecutor(max_workers=1) as pool:
            measured = pool.submit(figures)
            if progress is not None:
                progress(1.0, "computing the expected-error map")
            start = time.perf_counter()
            error_map = expected_error_map(result, moving=moving)
            uncertainty_s = round(time.perf_counter() - start, 3)
            quality_figures, quality = measured.result()
        report.update(quality_figures)
        report["inputs"] = inputs
        report["quality"] = quality
        report["uncertainty_s"] = uncertainty_s
        files = {r: fingerprint(inputs[r]) for r in ("fixed", "moving") if r in inputs and Path(inputs[r]).exists()}
        self.saved = {
            "inputs": inputs,
            "input_files": files,
            "config": config.to_dict(),
            "working_geometry": result.working_geometry.to_dict(),
            "alignment": result.alignment.to_dict(),
            "user": {"next_id": 1, "pairs": []},
        }
        self.saved["registration_id"] = report["registration_id"] = uuid.uuid4().hex
        self.report, self.result, self.fixed, self.moving = report, result, fixed, moving
        self.quality = report["quality"]
        self.automatic = result.correspondences
        self.session = None  # opened from the result when first needed (see refinement)
        self._error_map = error_map
        self._seen_sha256 = None

    def _write_everything(self, fallback_start: float | None = None, replace: bool = False) -> None:
        """Write every output of the current registration or session into the folder (io.outputs)."""
        from .core.fields import warp_image
        from .io.outputs import read_session, write_registration
        from .review.report import command_figures

        report = self.report

        def final_figures() -> dict:
            """The whole command's time and peak memory, once every other output is written."""
            figures = command_figures(report["device"], fallback_start)
            report.update(figures)
            return figures

        field, moving = self.field, self.moving
        warped = lambda: warp_image(moving, field)  # noqa: E731  (warped by a writer thread, beside the field's gzip)
        corr = self.correspondences()
        finals = final_figures if fallback_start is not None else None
        saved = {**self.saved, "user": self._user()}
        # the residual is written with the registration; a refinement leaves it in place, and the file with it
        residual = None if saved.get("residual") else self._residual()
        write_registration(self.folder, field, warped, corr, report, saved, self._error_map, finals, replace, residual)
        self.saved = {k: v for k, v in read_session(self.folder).items() if k not in ("files",)}
        self.report["generation"] = self.saved.get("generation")
        self._seen_sha256 = (self.saved.get("correspondences") or {}).get("sha256")

    def _residual(self) -> np.ndarray | None:
        """The residual grid (3, z, y, x) of the registration in memory, if it fitted one (None otherwise)."""
        model = self.session.model if self.session is not None else getattr(self.result, "model", None)
        residual = getattr(model, "residual", None)
        return None if residual is None else residual[0].detach().cpu().numpy()

    # ------------------------------------------------------------------------------------ open

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike,
        fixed: Image | None = None,
        moving: Image | None = None,
        command: str = "ikr",
        say: Callable[[str], None] | None = None,
    ) -> Workspace:
        """A workspace on an existing registration folder (session.json read and checked; the rest when needed).

        `fixed`/`moving`: the input images when the caller holds them (the Slicer module, whose inputs are
        scene nodes); otherwise they are read from the paths session.json records, after checking their
        fingerprints.
        """
        from .io.outputs import read_session

        workspace = cls(folder, command, say)
        workspace.saved = read_session(folder)
        workspace.fixed, workspace.moving = fixed, moving
        return workspace

    @classmethod
    def from_state(
        cls,
        saved: dict,
        automatic: Correspondences,
        fixed: Image,
        moving: Image | None = None,
        folder: str | os.PathLike | None = None,
    ) -> Workspace:
        """A workspace from a session kept elsewhere (e.g. with a Slicer scene): session.json's content and matches."""
        workspace = cls(folder)
        workspace.saved = {k: v for k, v in saved.items() if k not in ("version", "format_version", "files")}
        workspace.fixed, workspace.moving, workspace.automatic = fixed, moving, automatic
        return workspace

    def state(self) -> tuple[dict, Correspondences]:
        """What `from_state` needs: session.json's content with the current pairs, and the automatic matches."""
        self.ensure_session()
        return {**self.saved, "user": self._user()}, self.session.automatic

    def _inputs_from_folder(self, roles: tuple[str, ...] = ("fixed", "moving")) -> None:
        """Read the input images session.json names (those not held), refusing any that changed since registration."""
        self._read_inputs(self._check_inputs(roles))

    def _read_inputs(self, roles: list[str]) -> None:
        """Read input images from the paths session.json records."""
        from .io.images import read_image

        for role in roles:
            setattr(self, role, read_image(Path(self.saved["inputs"][role]), series_uid=self._series_uid(role)))

    def _check_inputs(self, roles: tuple[str, ...] = ("fixed", "moving")) -> list[str]:
        """Refuse recorded inputs (of those not held) that are gone or changed; return the roles not held."""
        from .io.guard import check_fingerprint

        missing = [role for role in roles if getattr(self, role) is None]
        for role, recorded in (self.saved.get("input_files") or {}).items():
            if role in missing:
                check_fingerprint(role, recorded)
        return missing

    def _series_uid(self, role: str) -> str | None:
        """The DICOM series a registration used for one input (None for image files)."""
        choice = self.saved["inputs"].get(f"{role}_series")
        return choice.get("uid") if isinstance(choice, dict) else None

    def _read_folder(self) -> None:
        """Read session.json, report.json and the automatic correspondences; images when not held (checked)."""
        from .core.correspondences import AUTOMATIC
        from .io.outputs import interrupted_generation, read_workspace_files

        journal = interrupted_generation(self.folder)
        files = read_workspace_files(self.folder, report=True)
        saved, report = files.session, files.report
        if saved.get("registration_id") and report.get("registration_id") not in (None, saved["registration_id"]):
            problem = "session.json and report.json come from different registrations: register again"
            raise IkrError(problem, self.folder)
        if journal is not None:
            self.say(
                f"{self.command}: the last write of {self.folder} was interrupted; rebuilding every output from"
                f" session.json (generation {saved.get('generation', '?')})"
            )
        self.saved, self.report = saved, report
        self._seen_sha256 = (saved.get("correspondences") or {}).get("sha256")
        missing = self._check_inputs()
        sha = journal.get("correspondences_sha256") if journal else None
        files = read_workspace_files(self.folder, correspondences=True, also_sha256=sha)
        self._read_inputs(missing)
        everything = files.correspondences
        self.automatic = everything.subset(everything.source == AUTOMATIC)

    def ensure_session(self) -> RefinementSession:
        """The refinement session: from the registration just computed, else rebuilt from what was saved."""
        if self.session is not None:
            return self.session
        from .registration.refine import open_session, session_from_result

        if self.result is not None:
            self.session = session_from_result(self.result, self.fixed)
        elif self.saved is None:
            raise IkrError("register first (or open the output folder of an earlier registration)")
        else:
            from .io.outputs import read_residual

            if self.automatic is None:
                self._read_folder()
            residual = read_residual(self.folder, self.saved) if self.folder is not None else None
            self.session = open_session(self.fixed, self.saved, self.automatic, self.moving, residual=residual)
        return self.session

    @property
    def field(self) -> Field:
        """The current field (fixed grid; after the clicked pairs)."""
        if self.session is None and self.result is not None:
            return self.result.field
        return self.ensure_session().field

    @property
    def has_registration(self) -> bool:
        """Whether a registration is held or saved (the field can be had)."""
        return self.result is not None or self.session is not None or self.saved is not None

    def correspondences(self) -> Correspondences:
        """The automatic correspondences and the clicked pairs, as correspondences.csv lists them."""
        if self.session is None and self.result is not None:
            return self.result.correspondences
        session = self.ensure_session()
        automatic = self.automatic if self.automatic is not None else session.automatic
        return automatic.concat(session.user_correspondences())

    def _user(self) -> dict:
        """The clicked pairs and next id as session.json holds them."""
        if self.session is None:
            return self.saved.get("user", {"next_id": 1, "pairs": []})
        return self.session.to_dict()

    # ------------------------------------------------------------------------------------ refine

    def refine(
        self, add: tuple | Sequence[str | os.PathLike] | None = None, remove: Sequence[int] = (), match: str = "order"
    ) -> dict:
        """Remove clicked pairs by id and add pairs; rewrite every output; return the report.

        `add`: (fixed_lps, moving_lps, labels), or point files (read_user_pairs: a pair CSV, or a fixed and a
        moving point file paired by `match`). The folder is read again under its lock (so a refine never
        loses another's pairs) and written file by file under its journal, session.json last
        (io.outputs.write_registration).
        """
        from .io.images import check_readable
        from .io.outputs import read_session
        from .registration.refine import check_moving_points
        from .review.quality import assess
        from .review.report import field_quality, landmark_errors

        if self.folder is None:
            raise IkrError("refine needs an output folder (edit pairs in memory with add_pairs)")
        check_readable(self.folder)
        self._check_writable()
        if add is not None and not (len(add) == 3 and isinstance(add[0], np.ndarray)):
            add = read_user_pairs(add, match)
        with self._locked():
            self.result = self.session = self.automatic = None
            self.saved = read_session(self.folder)
            self._read_folder()
            if add is not None:
                check_moving_points(add[1], self.moving.geometry)
            start = time.perf_counter()
            session = self.ensure_session()
            opened_s = time.perf_counter() - start
            start = time.perf_counter()
            for pair_id in remove:
                session.remove_correspondence(pair_id)
            if add is not None:
                session.add_correspondences(add[0], add[1], list(add[2]))
            refine_s = time.perf_counter() - start
            report = self.report
            report.update(field_quality(session.field))
            report.update({"refine_s": round(refine_s, 3), "session_open_s": round(opened_s, 3)})
            report["user_pairs"] = session.feedback()
            report["quality"] = assess(
                self.fixed, self.moving, session.field, self.correspondences(), session.model.alignment
            )
            inputs = self.saved["inputs"]
            if "fixed_landmarks" in inputs:
                landmarks = self._input_landmarks(
                    (inputs["fixed_landmarks"], inputs["moving_landmarks"]), self.fixed, self.moving, {}
                )
                report.update(landmark_errors(session.field, *landmarks))
            self.quality = report["quality"]
            self._error_map = None
            self._error_map = self.expected_error()
            self._write_everything()
        return self.report

    @property
    def pairs(self) -> list:
        """The clicked pairs (registration.refine.UserPair: id, fixed_lps, moving_lps, label), oldest first."""
        return list(self.ensure_session().pairs) if self.has_registration else []

    def add_pairs(self, fixed_lps: np.ndarray, moving_lps: np.ndarray, labels: list[str] | None = None) -> list[int]:
        """Add clicked pairs (LPS mm) in memory (save_pairs keeps them in the folder); their ids."""
        ids = self.ensure_session().add_correspondences(fixed_lps, moving_lps, labels)
        self._error_map = None
        return ids

    def remove_pair(self, pair_id: int) -> None:
        """Remove one clicked pair by id, in memory (save_pairs keeps the change in the folder)."""
        self.ensure_session().remove_correspondence(pair_id)
        self._error_map = None

    def move_pair(self, pair_id: int, fixed_lps: np.ndarray, moving_lps: np.ndarray) -> None:
        """Move one clicked pair to new points (LPS mm; a dragged point) in memory: same id and label, one undo step."""
        self.ensure_session().move_correspondence(pair_id, fixed_lps, moving_lps)
        self._error_map = None

    def edit_pairs(
        self,
        remove: Sequence[int] = (),
        move: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
        add: tuple[np.ndarray, np.ndarray] | None = None,
        labels: list[str] | None = None,
    ) -> list[int]:
        """Remove pairs by id, move pairs (id -> (fixed, moving) LPS mm) and add pairs, in memory, as ONE undo step
        (what one action of the user changed, e.g. a point dragged and let go); the ids of the added pairs."""
        session = self.ensure_session()
        ids: list[int] = []
        try:
            with session.one_step():
                for pair_id in remove:
                    session.remove_correspondence(pair_id)
                for pair_id, (fixed_lps, moving_lps) in (move or {}).items():
                    session.move_correspondence(pair_id, fixed_lps, moving_lps)
                if add is not None and len(add[0]):
                    ids = session.add_correspondences(add[0], add[1], labels)
        finally:
            self._error_map = None
        return ids

    def undo(self) -> None:
        """Undo the last step (an add, remove or move, or one edit_pairs), in memory; the field returns exactly."""
        self.ensure_session().undo()
        self._error_map = None

    def save_pairs(self) -> None:
        """Write session.json and correspondences.csv (the other outputs stay until `refine` or a registration).

        Nothing happens without a folder holding a registration. Refused when the folder holds another
        registration, or when its pairs changed since this workspace last read or wrote them.
        """
        if not is_registration_folder(self.folder):
            return
        from .io.outputs import read_session, write_session

        with self._locked():
            on_disk = read_session(self.folder)
            ours, theirs = self.saved.get("registration_id"), on_disk.get("registration_id")
            if ours and theirs and ours != theirs:
                raise IkrError("holds another registration than the one being edited; register again", self.folder)
            sha = (on_disk.get("correspondences") or {}).get("sha256")
            if self._seen_sha256 is not None and sha != self._seen_sha256:
                raise IkrError(
                    "its clicked pairs were changed by another program since they were opened here;"
                    " reopen the folder (nothing was saved)",
                    self.folder,
                )
            saved = {k: v for k, v in on_disk.items() if k != "files"}
            saved["user"] = self._user()
            write_session(self.folder, saved, self.correspondences())
            self.saved = {k: v for k, v in read_session(self.folder).items() if k != "files"}
            self._seen_sha256 = (self.saved.get("correspondences") or {}).get("sha256")

    def feedback(self) -> list[dict]:
        """Per clicked pair: id, label, residual and warnings (registration.refine)."""
        return self.ensure_session().feedback() if self.has_registration else []

    # ------------------------------------------------------------------------------------ review

    def expected_error(self) -> Image:
        """The expected registration error (mm, fixed grid) of the current field.

        Computed (review.uncertainty.expected_error_map) for a registration or session held here; for a
        folder only opened, read from its uncertainty.nii.gz (refused when its last write was interrupted).
        """
        if self._error_map is not None:
            return self._error_map
        if self.result is None and self.session is None and self.folder is not None:
            from .io.images import read_image
            from .io.outputs import OUTPUT_FILES

            self._refuse_interrupted()
            path = self.folder / OUTPUT_FILES["uncertainty"]
            if not path.is_file():
                raise IkrError(
                    "this output folder has no expected-error map (made by an older version: register again)", path
                )
            self._error_map = read_image(path)
            return self._error_map
        from .review.uncertainty import expected_error_map

        session = self.ensure_session()
        self._error_map = expected_error_map(session, moving=self.moving)
        return self._error_map

    def _fixed_image(self) -> Image:
        """The fixed image: held, or read from the path session.json records (checked)."""
        if self.fixed is None:
            self._inputs_from_folder(("fixed",))
        return self.fixed

    def suggest(self, n: int = 5, near_mask: Image | str | os.PathLike | None = None) -> Suggestions:
        """Up to `n` fixed-space points where one clicked pair would remove the most expected error.

        Inside the fixed CT's body and, with `near_mask` (fixed space: e.g. the tumour), near it
        (review.uncertainty.suggest_clicks). Each point is a voxel centre of the map, so its value is
        read there exactly (nearest voxel; interpolating at a voxel centre gives the same up to rounding,
        and near the border falls outside the grid).
        """
        from .core.geometry import Image
        from .registration.preprocess import body_mask
        from .review.uncertainty import suggest_clicks

        error = self.expected_error()
        fixed = self._fixed_image()
        body = Image(body_mask(fixed).astype(np.uint8), fixed.geometry)
        if near_mask is not None and not isinstance(near_mask, Image):
            from .io.images import read_image

            near_mask = read_image(Path(near_mask))
        points = suggest_clicks(error, n, near_mask=near_mask, region=body).reshape(-1, 3)
        index = np.rint(error.geometry.lps_to_index(points)).astype(int).reshape(-1, 3)
        index = np.clip(index, 0, np.asarray(error.geometry.size) - 1)
        values = error.array[index[:, 2], index[:, 1], index[:, 0]].astype(np.float64)
        return Suggestions(points, values)

    def write_suggestions(self, suggestions: Suggestions) -> Path:
        """Write suggestions.csv into the folder."""
        from .io.atomic import write_text_atomic

        return write_text_atomic(self.folder / SUGGESTIONS_FILE, suggestions.csv_text())

    def to_fixed(self, mask: Image) -> Image:
        """A mask on the moving image carried onto the fixed grid through the current field (labels)."""
        from .core.fields import warp_labels

        return warp_labels(mask, self.field)

    def warped_moving(self) -> Image:
        """The moving image resampled onto the fixed grid through the current field."""
        from .core.fields import warp_image

        if self.moving is None:
            self._inputs_from_folder()
        return warp_image(self.moving, self.field)

    def warped_labels(self, mask: Image) -> Image:
        """A mask on the moving image resampled onto the fixed grid (nearest neighbour, uint8)."""
        from .core.fields import warp_image

        warped = warp_image(mask, self.field, interpolation="nearest", default_value=0)
        return warped.with_array(warped.array.astype(np.uint8))

    def export_warped_labels(
        self,
        mask: Image,
        name: str,
        path: str | os.PathLike,
        writer: Callable[[Image, Path], None] | None = None,
    ) -> Path:
        """Write a moving-image mask warped onto the fixed grid as a label file, atomically.

        The library writes NIfTI, NRRD and .seg.nrrd (io.segmentations); `writer(labels, temporary_path)`
        writes it instead where the caller has a better writer (Slicer's own for .seg.nrrd); the temporary
        path keeps the file's suffix.
        """
        from .io.atomic import atomic_path
        from .io.segmentations import write_labels

        labels = self.warped_labels(mask)
        if writer is None:
            return write_labels(labels, {1: name}, path)
        with atomic_path(path) as tmp:
            writer(labels, tmp)
        return Path(path)

    def export_transform(self, path: str | os.PathLike) -> Path:
        """Save the current field: .h5/.tfm/.txt/.mat as an ITK transform, other suffixes as a displacement image."""
        from .io.transforms import write_field, write_transform

        name = Path(path).name.lower()
        writer = write_transform if name.endswith(TRANSFORM_SUFFIXES) else write_field
        return writer(self.field, path)

    # ------------------------------------------------------------------------------------ margins

    def margin(self, tumour: Image, ablation: Image, thresholds_mm: Sequence[float] = (0.0, 5.0)) -> MarginReview:
        """Margins of a tumour mask (moving image) against an ablation zone (fixed image) through the field.

        Without a registration the two are compared as they lie (identity). With one, also the minimal
        margin's 5-95 % interval over the expected error; when that cannot be had, `interval_problem` says why.
        """
        from .review.margin import compute_margin
        from .review.uncertainty import margin_interval

        field = self.field if self.has_registration else None
        result = compute_margin(tumour, ablation, field, tuple(thresholds_mm))
        review = MarginReview(result)
        if field is None:
            return review
        try:
            error = self.expected_error()
            interval = margin_interval(tumour, ablation, field, error, point=result)
        except IkrError as err:
            review.interval_problem = err.problem
            return review
        interval.pop("sampled_min_margins_mm", None)
        review.interval, review.error_map = interval, error
        return review

    @staticmethod
    def write_margin_review(
        outdir: str | os.PathLike, review: MarginReview, inputs: dict, background: Image | None = None
    ) -> dict:
        """Write the margin report folder (review.margin_report) of a MarginReview; margin.json's content."""
        from .review.margin_report import write_margin_report

        info = {"inputs": dict(inputs)}
        if review.interval is not None:
            info["inputs"].setdefault("uncertainty", "expected-error map of the registration")
        return write_margin_report(outdir, review.result, info, background, review.error_map, review.interval)

    def margin_report(
        self,
        tumour: str | os.PathLike,
        ablation: str | os.PathLike,
        outdir: str | os.PathLike | None = None,
        *,
        thresholds_mm: Sequence[float] = (0.0, 5.0),
        pre_image: str | os.PathLike | None = None,
        post_image: str | os.PathLike | None = None,
        tumour_label: int | None = None,
        ablation_label: int | None = None,
        with_interval: bool = True,
        include_phi: bool = False,
    ) -> dict:
        """The margin report of a tumour (pre-ablation, moving) and an ablation zone (post, fixed) in this folder.

        Through the folder's displacement field (and, `with_interval`, its expected-error map); written to
        `outdir` (default: FOLDER/margin). Returns margin.json's content (`ikr margin` on the folder's files).
        """
        from .io.outputs import OUTPUT_FILES
        from .review.margin_report import run_margin

        self._refuse_interrupted()
        uncertainty = self.folder / OUTPUT_FILES["uncertainty"] if with_interval else None
        return run_margin(
            tumour,
            ablation,
            self.folder / OUTPUT_FILES["displacement"],
            outdir if outdir is not None else self.folder / MARGIN_FOLDER,
            thresholds_mm=tuple(thresholds_mm),
            include_phi=include_phi,
            pre_image_path=pre_image,
            post_image_path=post_image,
            tumour_label=tumour_label,
            ablation_label=ablation_label,
            uncertainty_path=uncertainty,
        )


def read_user_pairs(paths: Sequence[str | os.PathLike], match: str = "order") -> tuple:
    """Clicked pairs from a pair CSV, or from two point files (fixed, moving) matched by order or label."""
    from .io.points import pair_points, read_point_pairs, read_points

    if len(paths) == 1:
        fixed, moving = read_point_pairs(Path(paths[0]))
    elif len(paths) == 2:
        fixed, moving = read_points(Path(paths[0])), read_points(Path(paths[1]))
    else:
        raise IkrError("--add takes a pair CSV, or a fixed and a moving point file")
    return pair_points(fixed, moving, by=match)


def margin_files(
    tumour: str | os.PathLike,
    ablation: str | os.PathLike,
    transform: str | os.PathLike | None,
    outdir: str | os.PathLike,
    **options: object,
) -> dict:
    """`ikr margin` on any files: the margin report of a tumour and ablation zone through a transform file."""
    from .review.margin_report import run_margin

    return run_margin(tumour, ablation, transform, outdir, **options)


def margin_lines(figures: dict) -> list[str]:
    """The key margin figures of margin.json for a person, one line each."""
    from .review.margin import fraction_key

    point = ", ".join(f"{v:.1f}" for v in figures["min_margin_point_lps"])
    surface = ", ".join(
        f"margin >= {t:g} mm {100 * figures[fraction_key(t)]:.0f} %"
        for t in figures.get("thresholds_mm", [])
        if fraction_key(t) in figures
    )
    return [
        f"minimal ablative margin {figures['min_margin_mm']:.1f} mm at ({point}) LPS mm",
        f"coverage {figures['coverage_percent']:.1f} %, tumour volume outside the zone "
        f"{figures['outside_volume_ml']:.2f} ml; tumour surface with {surface or 'no threshold asked'}",
    ]


def _config(config: RegistrationConfig | dict | None) -> RegistrationConfig:
    """A RegistrationConfig from one, from a dict of its fields, or the defaults."""
    from .registration.pipeline import RegistrationConfig

    if isinstance(config, RegistrationConfig):
        return config
    return RegistrationConfig.from_dict(dict(config or {}))
