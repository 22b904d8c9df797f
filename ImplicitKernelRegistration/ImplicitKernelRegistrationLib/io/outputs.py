"""The output folder of `ikr register`: field, transform, warped image, correspondences, session, report."""

from __future__ import annotations

import csv
import io as _io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..correspondences import Correspondences
from ..errors import IkrError
from ..fields import Field
from ..geometry import Image
from .atomic import atomic_directory, write_text_atomic
from .images import write_image
from .transforms import write_field, write_transform

SESSION_VERSION = 1
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


def read_correspondences_csv(path: str | os.PathLike) -> Correspondences:
    """Read a correspondences.csv written by `correspondences_csv`."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        fixed = np.array([[float(r[k]) for k in CORRESPONDENCE_HEADER[:3]] for r in rows]).reshape(-1, 3)
        moving = np.array([[float(r[k]) for k in CORRESPONDENCE_HEADER[3:6]] for r in rows]).reshape(-1, 3)
        conf = np.array([float(r["confidence"]) for r in rows])
        source = np.array([1 if r["source"] == "user" else 0 for r in rows], dtype=np.int8)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise IkrError(f"not a readable correspondences CSV ({err})", path) from err
    return Correspondences(fixed, moving - fixed, conf, source)


def read_session(outdir: str | os.PathLike) -> dict:
    """The session.json of an `ikr register` output folder, checked for a version this program reads."""
    path = Path(outdir) / OUTPUT_FILES["session"]
    if not path.is_file():
        raise IkrError("not an ikr output folder (no session.json)", Path(outdir))
    try:
        session = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IkrError(f"the session file is unreadable ({err})", path) from err
    if not isinstance(session, dict) or session.get("version") != SESSION_VERSION:
        found = session.get("version") if isinstance(session, dict) else None
        raise IkrError(f"session version {found!r} is not supported (this program reads {SESSION_VERSION})", path)
    return session


def write_session(outdir: str | os.PathLike, session: dict, correspondences: Correspondences) -> None:
    """Write session.json and correspondences.csv (each atomically): what refinement needs to resume."""
    outdir = Path(outdir)
    write_text_atomic(outdir / OUTPUT_FILES["correspondences"], correspondences_csv(correspondences))
    session = {"version": SESSION_VERSION, **session, "files": OUTPUT_FILES}
    write_text_atomic(outdir / OUTPUT_FILES["session"], json.dumps(session, indent=2, default=str))


def _write_all(
    folder: Path,
    field: Field,
    warped: Image,
    correspondences: Correspondences,
    report: dict,
    session: dict,
    uncertainty: Image | None,
    final_figures: Callable[[], dict] | None = None,
) -> None:
    """Write every output file into an existing folder, each atomically; report.json last.

    The four large files are written by two threads (ITK's writers and zlib release the GIL): the
    displacement field (the longest, about 2 CPU s at 320 x 233 x 188) on one, the warped image, the
    expected-error map and transform.h5 on the other. On 2 cores this takes about 60 % of the time of
    one after the other; more threads were no faster there and held every file's buffers at once
    (+500 MB peak on that grid, against +250 MB for two). `final_figures`, called once they are all
    written, adds figures measured at the end (peak memory, command time) to the report.
    """
    jobs: list[tuple[Callable[..., object], tuple]] = [(write_field, (field, folder / OUTPUT_FILES["displacement"]))]
    jobs.append((write_image, (warped, folder / OUTPUT_FILES["warped"])))
    if uncertainty is not None:
        jobs.append((write_image, (uncertainty, folder / OUTPUT_FILES["uncertainty"])))
    jobs.append((write_transform, (field, folder / OUTPUT_FILES["transform"])))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        for future in futures:
            future.result()  # the first failure is raised here, after every thread has ended
    write_session(folder, session, correspondences)
    if final_figures is not None:
        report = {**report, **final_figures()}
    write_text_atomic(folder / OUTPUT_FILES["report"], json.dumps(report, indent=2, default=str))


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
    warped: Image,
    correspondences: Correspondences,
    report: dict,
    session: dict,
    uncertainty: Image | None = None,
    final_figures: Callable[[], dict] | None = None,
) -> Path:
    """Write every output of a registration into `outdir` (with the expected-error map when given).

    `final_figures()`, when given, is called after every other file is written and its figures
    join the report (report.json is written last).

    A new folder is written all or nothing (a temporary folder, renamed); an existing ikr output
    folder (refinement) is updated file by file, each file atomically. Any other non-empty folder
    is refused, so nothing of the user's is overwritten.
    """
    outdir = Path(outdir)
    existing = check_output_folder(outdir)
    if existing:
        _write_all(outdir, field, warped, correspondences, report, session, uncertainty, final_figures)
    else:
        with atomic_directory(outdir) as tmp:
            _write_all(tmp, field, warped, correspondences, report, session, uncertainty, final_figures)
    return outdir
