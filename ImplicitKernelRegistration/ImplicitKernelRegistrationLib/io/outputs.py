"""The output folder of `ikr register`: field, transform, warped image, correspondences, session, report."""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.correspondences import Correspondences
from ..core.errors import IkrError
from ..core.fields import Field
from ..core.geometry import Image
from .atomic import atomic_directory, atomic_path, write_text_atomic
from .guard import end_journal, read_journal, start_journal
from .images import check_nifti_payload, first_line, native_output, write_image
from .transforms import write_field, write_transform

# The folder's format (session.json, correspondences.csv, report.json: WorkspaceFiles). Format 1 named its
# number "version" in session.json; format 2 names it "format_version" and is otherwise the same, so both read.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CORRESPONDENCE_HEADER = [
    "fixed_x",
    "fixed_y",
    "fixed_z",
    "moving_x",
    "moving_y",
    "moving_z",
    "confidence",
    "source",
]
OUTPUT_FILES = {
    "displacement": "displacement.nii.gz",
    "transform": "transform.h5",
    "warped": "warped.nii.gz",
    "correspondences": "correspondences.csv",
    "session": "session.json",
    "report": "report.json",
    "uncertainty": "uncertainty.nii.gz",
}
# The residual fitted to the images (registration/residual.py), when the registration fitted one: its grid
# (3, z, y, x) float32 in working voxels, so that reopening the folder needs neither the moving image nor a refit.
RESIDUAL_FILE = "residual.npy"


def correspondences_csv(corr: Correspondences) -> str:
    """Correspondences as CSV text in LPS mm (fixed point, moving point, confidence, source)."""
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CORRESPONDENCE_HEADER)
    moving = corr.moving_lps
    for i in range(len(corr)):
        source = "user" if corr.source[i] else "auto"
        row = [f"{v:.4f}" for v in (*corr.fixed_lps[i], *moving[i])]
        writer.writerow([*row, f"{corr.confidence[i]:.4f}", source])
    return buf.getvalue()


def read_correspondences_csv(path: str | os.PathLike, expected: dict | None = None) -> Correspondences:
    """Read a correspondences.csv written by `correspondences_csv`; check it against `expected` (count, SHA-256)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise IkrError(f"not a readable correspondences CSV ({err})", path) from err
    if expected:
        check_correspondences_text(text, expected, path)
    try:
        rows = list(csv.DictReader(_io.StringIO(text, newline="")))
        fixed = np.array([[float(r[k]) for k in CORRESPONDENCE_HEADER[:3]] for r in rows]).reshape(-1, 3)
        moving = np.array([[float(r[k]) for k in CORRESPONDENCE_HEADER[3:6]] for r in rows]).reshape(-1, 3)
        conf = np.array([float(r["confidence"]) for r in rows])
        source = np.array([1 if r["source"] == "user" else 0 for r in rows], dtype=np.int8)
    except (KeyError, ValueError, TypeError) as err:
        raise IkrError(f"not a readable correspondences CSV ({err})", path) from err
    return Correspondences(fixed, moving - fixed, conf, source)


def _sha256(data: bytes) -> str:
    """The hex SHA-256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


def correspondences_record(text: str) -> dict:
    """What session.json records of its correspondences.csv: the row count and the SHA-256 of the text."""
    return {"n": max(0, text.count("\n") - 1), "sha256": _sha256(text.encode("utf-8"))}


def check_correspondences_text(text: str, expected: dict, path: Path) -> None:
    """Refuse a correspondences.csv that is not the one session.json recorded (cut, edited or from elsewhere).

    `expected` holds the row count `n` and `sha256`; `also_sha256` (an interrupted write's new file) is accepted too.
    """
    found = correspondences_record(text)
    if found["sha256"] in (expected.get("sha256"), expected.get("also_sha256")):
        return
    raise IkrError(
        f"does not match session.json ({found['n']} rows where {expected.get('n')} were written, checksum differs):"
        " damaged, edited or from another registration; register again",
        path,
    )


@dataclass
class WorkspaceFiles:
    """What a registration folder records besides its images: session.json, correspondences.csv, report.json.

    `session` holds inputs, input_files (fingerprints), config, working_geometry, alignment, user (the
    clicked pairs and next id), registration_id, generation and, once written, files and the
    correspondences' record (row count, SHA-256); `correspondences` every automatic and user match (None
    when not read); `report` the figures of report.json ({} when not read).
    """

    session: dict
    correspondences: Correspondences | None = None
    report: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def session_json(self) -> dict:
        """session.json's content as written: the format version first, then the session's fields."""
        body = {k: v for k, v in self.session.items() if k not in ("version", "format_version")}
        return {"format_version": self.format_version, **body}


def _format_of(session: object) -> object:
    """The format number a session.json states (format 1 under "version")."""
    if not isinstance(session, dict):
        return None
    return session.get("format_version", session.get("version"))


def read_workspace_files(
    outdir: str | os.PathLike, report: bool = False, correspondences: bool = False, also_sha256: str | None = None
) -> WorkspaceFiles:
    """Read a registration folder's session.json (always), report.json and correspondences.csv (when asked).

    An unknown format is a one-line error naming session.json; correspondences.csv must be the one
    session.json recorded (or, `also_sha256`, the one an interrupted write was putting in place).
    """
    outdir = Path(outdir)
    path = outdir / OUTPUT_FILES["session"]
    if not path.is_file():
        raise IkrError("not an ikr output folder (no session.json)", outdir)
    try:
        session = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IkrError(f"the session file is unreadable ({err})", path) from err
    found = _format_of(session)
    if found not in READABLE_FORMATS:
        raise IkrError(f"session version {found!r} is not supported (this program reads {FORMAT_VERSION})", path)
    _check_session_fields(session, path)
    files = WorkspaceFiles({k: v for k, v in session.items() if k not in ("version", "format_version")})
    if report:
        files.report = read_report(outdir)
    if correspondences:
        expected = files.session.get("correspondences")
        if expected and also_sha256:
            expected = {**expected, "also_sha256": also_sha256}
        files.correspondences = read_correspondences_csv(outdir / OUTPUT_FILES["correspondences"], expected)
    return files


def read_session(outdir: str | os.PathLike) -> dict:
    """The session.json of an `ikr register` output folder, checked for a format this program reads."""
    return read_workspace_files(outdir).session


def _check_session_fields(session: dict, path: Path) -> None:
    """Refuse a session.json that lacks what refinement needs (inputs, config, a valid working grid)."""
    from ..core.geometry import Geometry

    inputs = session.get("inputs")
    if not isinstance(inputs, dict) or not all(isinstance(inputs.get(k), str) for k in ("fixed", "moving")):
        raise IkrError("is incomplete: it has no 'inputs' with the fixed and moving image paths", path)
    if not isinstance(session.get("config"), dict):
        raise IkrError("is incomplete: it has no registration 'config'", path)
    try:
        geometry = Geometry.from_dict(session["working_geometry"])
        ok = min(geometry.size) >= 1 and min(geometry.spacing_mm) > 0
    except (KeyError, TypeError, ValueError) as err:
        raise IkrError(f"has no valid 'working_geometry' ({type(err).__name__}: {err})", path) from err
    if not ok:
        raise IkrError(f"has an invalid 'working_geometry' (size {geometry.size}, spacing {geometry.spacing_mm})", path)


def read_report(outdir: str | os.PathLike) -> dict:
    """The report.json of an output folder (one-line error when it is missing or damaged)."""
    path = Path(outdir) / OUTPUT_FILES["report"]
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise IkrError("is missing from this output folder: register again", path) from err
    except (OSError, ValueError) as err:
        raise IkrError(f"is damaged ({err}): register again", path) from err
    if not isinstance(report, dict):
        raise IkrError("is damaged (not a JSON object): register again", path)
    return report


def write_session(outdir: str | os.PathLike, session: dict, correspondences: Correspondences) -> None:
    """Write correspondences.csv, then session.json recording its row count and checksum (each atomically)."""
    outdir = Path(outdir)
    text = correspondences_csv(correspondences)
    write_text_atomic(outdir / OUTPUT_FILES["correspondences"], text)
    session = {**session, "files": OUTPUT_FILES, "correspondences": correspondences_record(text)}
    content = WorkspaceFiles(session).session_json()
    write_text_atomic(outdir / OUTPUT_FILES["session"], json.dumps(content, indent=2, default=str))


def _write_all(
    folder: Path,
    field: Field,
    warped: Image | Callable[[], Image],
    correspondences: Correspondences,
    report: dict,
    session: dict,
    uncertainty: Image | None,
    shown: Path | None = None,
    final_figures: Callable[[], dict] | None = None,
    residual: bytes | None = None,
) -> None:
    """Write every output file into a folder, each atomically; check each was written whole (errors name `shown`).

    `final_figures`, called once the large files are written, adds figures measured at the end (peak
    memory, command time) to the report.
    """
    shown = shown or folder
    with native_output():  # a failed write makes ITK's C libraries print pages; the error below says it in a line
        try:
            _write_files(folder, field, warped, correspondences, report, session, uncertainty, final_figures, residual)
        except (RuntimeError, OSError) as err:
            reason = getattr(err, "strerror", None) or first_line(err)
            raise IkrError(f"cannot write the outputs (disk full or not writable?): {reason}", shown) from err
        except IkrError as err:
            raise IkrError(err.problem, shown / Path(err.path or "").name) from err


def _whole(path: Path) -> None:
    """Refuse a NIfTI file that was written short (ITK's NIfTI writer reports a full disk only on stderr)."""
    try:
        check_nifti_payload(path)
    except IkrError as err:
        raise IkrError("was not written completely (disk full?)", path) from err


def _written_whole(write: Callable[..., Path], *args: object) -> None:
    """Write one NIfTI output and check it was written whole."""
    _whole(write(*args))


def _write_made(image: Image | Callable[[], Image], path: Path) -> Path:
    """Write an image, or the image a function makes (called here, in the writer's thread)."""
    if not isinstance(image, Image):
        try:
            image = image()
        except RuntimeError as err:  # SimpleITK's: not a write error, so not reported as one
            raise IkrError(f"cannot make this image: {first_line(err)}", path) from err
    return write_image(image, path)


def _write_files(
    folder: Path,
    field: Field,
    warped: Image | Callable[[], Image],
    correspondences: Correspondences,
    report: dict,
    session: dict,
    uncertainty: Image | None,
    final_figures: Callable[[], dict] | None = None,
    residual: bytes | None = None,
) -> None:
    """Write every output file into an existing folder, each atomically; report.json, then session.json last.

    The large files are written by two threads (ITK's writers, HDF5 and zlib release the GIL): on 2 cores
    this takes about 60 % of the time of one after the other; more threads were no faster there and held
    every file's buffers at once (+500 MB peak on the 1.5 mm thorax, against +250 MB for two). Each NIfTI
    file is checked whole. The first thread writes the field: displacement.nii.gz, then transform.h5 (the
    two largest); the second makes and writes the warped image (`warped` may be a function that makes it),
    then the expected-error map. transform.h5 is only started once displacement.nii.gz is known to be
    written whole: HDF5 can crash the process at exit when its own write fails, and a full disk (or a
    file-size limit) fails the NIfTI file first, half the size.
    """

    def field_files() -> None:
        """displacement.nii.gz, checked whole, then transform.h5."""
        _written_whole(write_field, field, folder / OUTPUT_FILES["displacement"])
        write_transform(field, folder / OUTPUT_FILES["transform"])

    def image_files() -> None:
        """warped.nii.gz, then uncertainty.nii.gz when there is a map; each checked whole."""
        _written_whole(_write_made, warped, folder / OUTPUT_FILES["warped"])
        if uncertainty is not None:
            _written_whole(write_image, uncertainty, folder / OUTPUT_FILES["uncertainty"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(field_files), pool.submit(image_files)]
        for future in futures:
            future.result()  # the first failure is raised here, after every thread has ended
    if residual is not None:
        with atomic_path(folder / RESIDUAL_FILE) as tmp:
            tmp.write_bytes(residual)
    if final_figures is not None:
        report = {**report, **final_figures()}
    write_text_atomic(folder / OUTPUT_FILES["report"], json.dumps(report, indent=2, default=str))
    write_session(folder, session, correspondences)  # last: it commits the clicked pairs


def check_output_folder(outdir: str | os.PathLike) -> bool:
    """Refuse an output path that is a file or a non-empty folder of something else; True if an ikr folder."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise IkrError("the output path exists and is not a folder", outdir)
    existing = outdir.is_dir() and any(outdir.iterdir())
    if existing and not (outdir / OUTPUT_FILES["session"]).is_file():
        raise IkrError("the output folder exists and holds other files; choose a new or empty folder", outdir)
    return existing


def write_registration(
    outdir: str | os.PathLike,
    field: Field,
    warped: Image | Callable[[], Image],
    correspondences: Correspondences,
    report: dict,
    session: dict,
    uncertainty: Image | None = None,
    final_figures: Callable[[], dict] | None = None,
    replace: bool = False,
    residual: np.ndarray | None = None,
) -> Path:
    """Write every output of a registration into `outdir` (with the expected-error map when given).

    A new folder (or, with `replace`, a new version of an existing one) is written all or nothing:
    a temporary folder, renamed. An existing ikr output folder (refinement) is updated file by file,
    each file atomically, under a journal, session.json last; the generation number goes up by one.
    Any other non-empty folder is refused, so nothing of the user's is overwritten. `warped` may be a
    function that makes the warped image (called while the field is written). `final_figures()`,
    when given, is called after the large files are written and its figures join the report. `residual`
    (3, z, y, x), when given, goes to residual.npy, its checksum to session.json (`read_residual`).
    """
    outdir = Path(outdir)
    existing = check_output_folder(outdir)
    generation = int(session.get("generation", 0) or 0) + 1
    session = {**session, "generation": generation}
    payload = None
    if residual is not None:
        payload = residual_bytes(residual)
        session["residual"] = {"file": RESIDUAL_FILE, "shape": list(residual.shape), "sha256": _sha256(payload)}
    report = {**report, "generation": generation}
    if existing and not replace:
        _update_in_place(
            outdir, generation, field, warped, correspondences, report, session, uncertainty, final_figures, payload
        )
    else:
        with atomic_directory(outdir) as tmp:
            _write_all(
                tmp, field, warped, correspondences, report, session, uncertainty, outdir, final_figures, payload
            )
    return outdir


def residual_bytes(residual: np.ndarray) -> bytes:
    """A residual grid as the bytes of residual.npy (float32)."""
    buf = _io.BytesIO()
    np.save(buf, np.ascontiguousarray(residual, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def read_residual(outdir: str | os.PathLike, session: dict) -> np.ndarray | None:
    """The residual grid a registration folder recorded (None when session.json records none).

    A missing, damaged or different residual.npy is a one-line error naming it.
    """
    record = session.get("residual")
    if not record:
        return None
    path = Path(outdir) / RESIDUAL_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IkrError(f"is missing or unreadable ({err.strerror or err}): register again", path) from err
    if _sha256(data) != record.get("sha256"):
        raise IkrError("does not match session.json (checksum differs): damaged or from another registration", path)
    return np.load(_io.BytesIO(data), allow_pickle=False)


def _update_in_place(
    outdir: Path,
    generation: int,
    field: Field,
    warped: Image | Callable[[], Image],
    correspondences: Correspondences,
    report: dict,
    session: dict,
    uncertainty: Image | None,
    final_figures: Callable[[], dict] | None = None,
    residual: bytes | None = None,
) -> None:
    """Write every file into a hidden staging folder, then move them in under a journal, session.json last.

    A failure while writing leaves the folder as it was; a kill while moving leaves the journal, which
    the next refine sees (it rebuilds every output from session.json, which still holds the old pairs).
    """
    staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=outdir))
    try:
        _write_all(
            staging, field, warped, correspondences, report, session, uncertainty, outdir, final_figures, residual
        )
        text = (staging / OUTPUT_FILES["correspondences"]).read_text(encoding="utf-8")
        start_journal(outdir, generation, correspondences_record(text)["sha256"])
        files = [*OUTPUT_FILES.values(), RESIDUAL_FILE]
        names = [n for n in files if (staging / n).exists() and n != OUTPUT_FILES["session"]]
        for name in [*names, OUTPUT_FILES["session"]]:
            os.replace(staging / name, outdir / name)
        end_journal(outdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def interrupted_generation(outdir: str | os.PathLike) -> dict | None:
    """The journal of an interrupted write in this folder (None when its outputs are consistent)."""
    return read_journal(outdir)
