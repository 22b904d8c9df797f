"""DICOM series: scan a folder, group by SeriesInstanceUID, check the stack and build an LPS Image.

Decisions:
- files are grouped by SeriesInstanceUID only; the same SOPInstanceUID twice in one series is refused
  (e.g. two copies of a series in different transfer syntaxes under one folder);
- a series is stacked along the slice normal (row direction x column direction), sorted by position;
- refused, with a message naming the series: mixed orientations, mixed Rows/Columns or pixel spacing,
  duplicate positions, a gap (slices further apart than 1.5x their thickness: missing slices), a single
  image (a volume is needed for registration), multi-frame or non-image objects (SEG, SR, ...);
- sheared stacks (gantry tilt) and uneven spacing without gaps are resampled onto a regular grid in the
  slice frame from each slice's ImagePositionPatient; `meta["resampled"]` says why;
- RescaleSlope/Intercept are applied per slice; integer results that fit stay int16 (HU exact), a
  series without rescaling keeps its stored dtype, anything else is float32;
- patient identifiers never enter `meta` unless `include_phi=True` is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from ..core.errors import IkrError
from ..core.geometry import Geometry, Image

NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "RTRECORD", "DOC"}
ORIENTATION_TOL = 1e-3  # direction cosines
POSITION_TOL_MM = 0.01
GAP_FACTOR = 1.5
SPACING_REL_TOL = 0.01


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder: what it is, and whether it stacks into a regular volume (and why not)."""

    series_uid: str
    modality: str
    description: str
    n_files: int
    consistent: bool
    reason: str
    files: tuple[Path, ...]

    def summary(self) -> dict:
        """A JSON-friendly description without file paths or patient identifiers."""
        return {
            "series_uid": self.series_uid,
            "modality": self.modality,
            "description": self.description,
            "n_files": self.n_files,
            "consistent": self.consistent,
            "reason": self.reason,
        }


@dataclass
class _Plan:
    """How a series stacks: sorted headers, positions in the slice frame, and whether to resample."""

    headers: list
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    spacing_xy: tuple[float, float]
    normal_pos: np.ndarray
    inplane_xy: np.ndarray
    resample_reason: str


def scan_folder(folder: str | os.PathLike) -> dict[str, list]:
    """Read the headers (no pixels) of every DICOM file under `folder`, grouped by SeriesInstanceUID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IkrError("not a folder", folder)
    if not os.access(folder, os.R_OK | os.X_OK):
        raise IkrError("this folder cannot be read (permission denied)", folder)
    groups: dict[str, list] = {}
    for path in sorted(_walk(folder)):
        ds = _checked_header(path)
        if ds is None or "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            continue
        ds.filename = str(path)
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not groups:
        raise IkrError("no DICOM files found in this folder (searched recursively)", folder)
    return groups


def _walk(folder: Path) -> Iterable[Path]:
    """Every regular, non-hidden file under `folder`."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield Path(root) / name


def _checked_header(path: Path) -> pydicom.Dataset | None:
    """The header of a file in a scanned folder: None for a file that is not DICOM; IkrError for one
    that cannot be read or that is DICOM (by suffix or preamble) but damaged, so nothing is skipped silently."""
    try:
        with open(path, "rb") as f:
            start = f.read(132)
    except OSError as err:
        raise IkrError(f"cannot be read ({err.strerror or err})", path) from err
    ds = read_header(path)
    looks_dicom = start[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom", ".ima")
    if looks_dicom and (ds is None or "SOPInstanceUID" not in ds):
        raise IkrError("is a damaged DICOM file (its header cannot be parsed); remove it or replace it", path)
    return ds


def read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file, or None when the file is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError):
        return None


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """Every series under `folder`, with whether it stacks into a volume (and why not)."""
    infos = []
    for uid, headers in scan_folder(folder).items():
        first = headers[0]
        try:
            plan = _plan(headers, uid)
            consistent = True
            reason = f"resampled: {plan.resample_reason}" if plan.resample_reason else "regular stack"
        except IkrError as err:
            name = _series_name(uid, headers)
            consistent, reason = False, err.problem.removeprefix(f"{name}: ").removeprefix(f"{name} ")
        infos.append(
            SeriesInfo(
                series_uid=uid,
                modality=str(first.get("Modality", "") or "unknown"),
                description=str(first.get("SeriesDescription", "") or ""),
                n_files=len(headers),
                consistent=consistent,
                reason=reason,
                files=tuple(Path(h.filename) for h in headers),
            )
        )
    return sorted(infos, key=lambda s: (s.modality, s.description, s.series_uid))


def read_series(
    folder: str | os.PathLike, series_uid: str | None = None, include_phi: bool = False, choose: bool = False
) -> Image:
    """Read one series of a DICOM folder as an LPS Image (resampled onto a regular grid when sheared).

    With several image series and no `series_uid`, `choose` picks the one a radiologist would register
    (`choose_series`) and records which and why in `meta["series_choice"]`; without it they are listed.
    """
    groups = scan_folder(folder)
    choice = None
    if series_uid is None and choose and len(_image_groups(groups)) > 1:
        choice = choose_series(groups, folder)
        series_uid = choice["uid"]
    elif series_uid is not None and len(groups) > 1:
        choice = {"uid": series_uid, "why": f"series {series_uid}, as asked"}
    uid = _choose_series(groups, series_uid, folder)
    try:
        plan = _plan(groups[uid], uid)
    except IkrError as err:
        raise IkrError(err.problem, err.path or folder) from None
    slices = [_slice_values(h, uid) for h in plan.headers]
    array, geometry = _stack(plan, slices) if not plan.resample_reason else _resample(plan, slices)
    meta = _meta(plan, uid, include_phi)
    if choice is not None:
        meta["series_choice"] = choice
    image = Image(_final_dtype(array, plan.headers), geometry, meta)
    return image


AXIAL_COS = 0.87  # slice normal within about 30 degrees of the patient's head-foot axis
COVERAGE_TIE = 0.95  # coverages within 5 % of the largest count as equally large


def _image_groups(groups: dict[str, list]) -> dict[str, list]:
    """The series that hold images (not SEG, SR, RT objects...)."""
    return {u: h for u, h in groups.items() if _modality(h[0]) not in NON_IMAGE_MODALITIES}


def _candidate(uid: str, headers: list) -> tuple[dict | None, str]:
    """A series' facts for choosing it (None and why not when it is no candidate)."""
    try:
        plan = _plan(headers, uid)
    except IkrError as err:
        name = _series_name(uid, headers)
        return None, err.problem.removeprefix(f"{name}: ").removeprefix(f"{name} ")
    image_type = " ".join(str(v) for v in (headers[0].get("ImageType", []) or [])).upper()
    if "LOCALIZER" in image_type:
        return None, "a localizer (scout)"
    if abs(plan.normal[2]) < AXIAL_COS:
        return None, "not axial"
    step = float(np.median(np.diff(plan.normal_pos)))
    facts = {
        "uid": uid,
        "description": str(headers[0].get("SeriesDescription", "") or ""),
        "modality": _modality(headers[0]) or "unknown",
        "n_slices": len(headers),
        "slice_spacing_mm": round(step, 3),
        "coverage_mm": round(float(plan.normal_pos[-1]) + step, 1),
        "regular": not plan.resample_reason,
        "study": str(headers[0].get("StudyInstanceUID", "") or ""),
        "series_number": int(headers[0].get("SeriesNumber", 0) or 0),
    }
    return facts, ""


def choose_series(groups: dict[str, list], folder: object) -> dict:
    """The series a radiologist would register: an axial CT volume, largest coverage, thinnest regular slices.

    Refuses (listing the series) when no series qualifies or the qualifying ones belong to more than one
    study, since then the choice is the user's.
    """
    images = _image_groups(groups)
    found, rejected = [], []
    for uid, headers in images.items():
        facts, why_not = _candidate(uid, headers)
        if facts is None:
            rejected.append(f"'{headers[0].get('SeriesDescription', '') or uid}': {why_not}")
        else:
            found.append(facts)
    if any(f["modality"] == "CT" for f in found):
        rejected += [
            f"'{f['description'] or f['uid']}': {f['modality']}, not CT" for f in found if f["modality"] != "CT"
        ]
        found = [f for f in found if f["modality"] == "CT"]
    hint = f"choose one with --fixed-series/--moving-series (register) or --series (info): {_uid_list(images)}"
    if not found:
        raise IkrError(f"no series here is an axial image volume; {hint}", folder)
    if len({f["study"] for f in found}) > 1:
        raise IkrError(f"the volumes here belong to {len({f['study'] for f in found})} studies; {hint}", folder)
    widest = max(f["coverage_mm"] for f in found)
    wide = [f for f in found if f["coverage_mm"] >= COVERAGE_TIE * widest]
    best = min(wide, key=lambda f: (not f["regular"], f["slice_spacing_mm"], f["series_number"], f["uid"]))
    rejected += [
        f"'{f['description'] or f['uid']}': {f['coverage_mm']:g} mm coverage, {f['slice_spacing_mm']:g} mm slices"
        + ("" if f["regular"] else ", irregular")
        for f in found
        if f is not best
    ]
    why = (
        f"chose series {best['uid']} ('{best['description']}', {best['modality']}, {best['n_slices']} axial slices"
        f" {best['slice_spacing_mm']:g} mm apart covering {best['coverage_mm']:g} mm) of {len(images)} image series:"
        " the axial CT volume with the largest coverage and the thinnest regular slices"
        + (f"; not chosen: {'; '.join(rejected)}" if rejected else "")
    )
    return {**{k: v for k, v in best.items() if k != "study"}, "why": why}


def _choose_series(groups: dict[str, list], series_uid: str | None, folder: object) -> str:
    """The series to read: the one asked for, or the only image series in the folder."""
    if series_uid is not None:
        if series_uid not in groups:
            raise IkrError(f"no series with SeriesInstanceUID {series_uid}; found: {_uid_list(groups)}", folder)
        return series_uid
    images = {u: h for u, h in groups.items() if _modality(h[0]) not in NON_IMAGE_MODALITIES}
    if len(images) == 1:
        return next(iter(images))
    if not images:
        raise IkrError(f"no image series here, only: {_uid_list(groups)}", folder)
    raise IkrError(
        f"{len(images)} image series found; pass --series with one of: {_uid_list(images)}",
        folder,
    )


def _uid_list(groups: dict[str, list]) -> str:
    """'UID (modality 'description', N files)' for each series, separated by semicolons."""
    parts = []
    for uid, headers in groups.items():
        desc = str(headers[0].get("SeriesDescription", "") or "")
        parts.append(f"{uid} ({_modality(headers[0])} '{desc}', {len(headers)} files)")
    return "; ".join(parts)


def _modality(ds: pydicom.Dataset) -> str:
    """The Modality attribute, upper case ('' when absent)."""
    return str(ds.get("Modality", "") or "").upper()


def _series_name(uid: str, headers: list) -> str:
    """A short name for messages: the description and the UID."""
    desc = str(headers[0].get("SeriesDescription", "") or "")
    return f"series '{desc}' ({uid})" if desc else f"series {uid}"


def _plan(headers: list, uid: str) -> _Plan:
    """Check that a series stacks into a volume and work out how (refuse with a reason otherwise)."""
    name = _series_name(uid, headers)
    _check_kind(headers, name)
    row, col = _common_orientation(headers, name)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    spacing_xy = _common_grid(headers, name)
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[i] for i in order]
    rel = positions[order] - positions[order[0]]
    normal_pos = rel @ normal
    inplane = np.stack([rel @ row, rel @ col], axis=1)
    reason = _check_spacing(headers, normal_pos, inplane, name)
    return _Plan(headers, row, col, normal, spacing_xy, normal_pos, inplane, reason)


def _check_kind(headers: list, name: str) -> None:
    """Refuse non-image objects, multi-frame files, colour images, duplicates and single images."""
    modality = _modality(headers[0])
    if modality in NON_IMAGE_MODALITIES:
        raise IkrError(f"{name} is not an image volume (modality {modality})")
    for h in headers:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows") if k not in h]
        if missing:
            raise IkrError(f"{name}: {Path(h.filename).name} lacks {', '.join(missing)}; cannot place it in space")
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            raise IkrError(f"{name}: multi-frame files are not supported ({Path(h.filename).name})")
        if int(h.get("SamplesPerPixel", 1) or 1) != 1:
            raise IkrError(f"{name}: colour images are not supported ({Path(h.filename).name})")
    sops = [str(h.SOPInstanceUID) for h in headers]
    if len(set(sops)) != len(sops):
        raise IkrError(
            f"{name} contains the same SOPInstanceUID more than once (two copies of the series in one folder?)"
        )
    if len(headers) < 2:
        raise IkrError(f"{name} has a single image; a volume of at least 2 slices is needed")


def _common_orientation(headers: list, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The shared row and column directions (refuse mixed orientations)."""
    iops = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.max(np.abs(iops - iops[0])) > ORIENTATION_TOL:
        n_distinct = len({tuple(np.round(v, 3)) for v in iops})
        raise IkrError(f"{name} mixes {n_distinct} slice orientations; it is not one volume")
    row = iops[0, :3] / np.linalg.norm(iops[0, :3])
    col = iops[0, 3:] / np.linalg.norm(iops[0, 3:])
    return row, col


def _common_grid(headers: list, name: str) -> tuple[float, float]:
    """The shared (x, y) pixel spacing (refuse mixed Rows/Columns or PixelSpacing)."""
    shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(shapes) > 1:
        raise IkrError(f"{name} mixes image sizes (Rows x Columns): {sorted(shapes)}")
    spacings = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
    if np.max(np.abs(spacings - spacings[0])) > 1e-4:
        raise IkrError(f"{name} mixes pixel spacings")
    return float(spacings[0, 1]), float(spacings[0, 0])


def _check_spacing(headers: list, normal_pos: np.ndarray, inplane: np.ndarray, name: str) -> str:
    """Refuse duplicates and gaps; return why the stack must be resampled ('' when it is regular)."""
    steps = np.diff(normal_pos)
    if np.any(steps < POSITION_TOL_MM):
        k = int(np.argmin(steps))
        raise IkrError(f"{name} has two slices at the same position ({normal_pos[k]:.2f} mm along the normal)")
    median = float(np.median(steps))
    thick = [float(h.get("SliceThickness", 0) or 0) for h in headers]
    for k, step in enumerate(steps):
        neighbours = [steps[j] for j in (k - 1, k + 1) if 0 <= j < len(steps)]
        regular = min(neighbours) if neighbours else median  # the spacing of the run around this step
        expected = max(thick[k], thick[k + 1], regular) if len(steps) > 2 else max(thick[k], thick[k + 1], median)
        if step > GAP_FACTOR * expected + POSITION_TOL_MM:
            raise IkrError(
                f"{name} has a gap: slices {step:.2f} mm apart where {expected:.2f} mm is expected "
                "(missing slices); it is not one volume"
            )
    reasons = []
    shear = float(np.max(np.abs(inplane)))
    if shear > POSITION_TOL_MM:
        tilt = float(headers[0].get("GantryDetectorTilt", 0) or 0)
        reasons.append(f"slices are sheared by up to {shear:.1f} mm in plane (gantry tilt {tilt:g} deg)")
    if np.max(steps) - np.min(steps) > max(POSITION_TOL_MM, SPACING_REL_TOL * median):
        reasons.append(f"slice spacing varies from {np.min(steps):.2f} to {np.max(steps):.2f} mm")
    return "; ".join(reasons)


def _slice_values(ds_header: pydicom.Dataset, uid: str) -> np.ndarray:
    """Decode one slice and apply its rescale slope/intercept (float64 values)."""
    path = Path(ds_header.filename)
    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except Exception as err:  # decoders raise many types; report them as one user-facing error
        syntax = getattr(getattr(ds_header, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise IkrError(f"cannot decode pixel data (transfer syntax {syntax}): {err}", path) from err
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise IkrError(f"unexpected pixel array shape {stored.shape}", path)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept == 0.0:
        return stored
    return stored.astype(np.float64) * slope + intercept


def _final_dtype(array: np.ndarray, headers: list) -> np.ndarray:
    """Keep stored dtypes when nothing was rescaled; int16 when values are integral and fit; else float32."""
    if array.dtype != np.float64:
        return array
    if np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)):
        info = np.iinfo(np.int16)
        if array.min() >= info.min and array.max() <= info.max:
            return array.astype(np.int16)
    return array.astype(np.float32)


def _stack(plan: _Plan, slices: list[np.ndarray]) -> tuple[np.ndarray, Geometry]:
    """Stack a regular series along the normal."""
    dtypes = {s.dtype for s in slices}
    array = np.stack(slices if len(dtypes) == 1 else [s.astype(np.float64) for s in slices], axis=0)
    step = float(np.mean(np.diff(plan.normal_pos)))
    origin = np.array([float(v) for v in plan.headers[0].ImagePositionPatient])
    return array, _geometry(array.shape, plan, (*plan.spacing_xy, step), origin)


def _geometry(shape_zyx: tuple, plan: _Plan, spacing: tuple, origin: np.ndarray) -> Geometry:
    """The Geometry of a grid in the slice frame (columns: row, column and normal directions)."""
    direction = np.column_stack([plan.row, plan.col, plan.normal]) + 0.0  # no negative zeros
    return Geometry(
        size=(int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])),
        spacing_mm=tuple(float(v) for v in spacing),
        origin_lps=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _resample(plan: _Plan, slices: list[np.ndarray]) -> tuple[np.ndarray, Geometry]:
    """Resample a sheared or unevenly spaced stack onto a regular grid in the slice frame.

    Each slice is shifted in plane by its own offset (from its ImagePositionPatient) onto a common
    in-plane grid, then output planes are interpolated linearly along the normal between the two
    nearest input slices. The first and last slices lie exactly on output planes.
    """
    sx, sy = plan.spacing_xy
    lo = np.floor(plan.inplane_xy.min(axis=0) / (sx, sy) + 1e-6)
    hi = np.ceil(plan.inplane_xy.max(axis=0) / (sx, sy) - 1e-6)
    rows, cols = slices[0].shape
    out_shape = (rows + int(hi[1] - lo[1]), cols + int(hi[0] - lo[0]))
    fill = float(min(float(s.min()) for s in slices))
    canvases = []
    for values, (a, b) in zip(slices, plan.inplane_xy, strict=True):
        offset = (lo[1] - b / sy, lo[0] - a / sx)  # output (row, col) + offset = input (row, col)
        canvases.append(
            ndimage.affine_transform(
                values.astype(np.float32), np.eye(2), offset=offset, output_shape=out_shape, order=1, cval=fill
            )
        )
    span = float(plan.normal_pos[-1])
    median = float(np.median(np.diff(plan.normal_pos)))
    nz = max(2, int(round(span / median)) + 1)
    dz = span / (nz - 1)
    out = np.empty((nz, *out_shape), dtype=np.float32)
    for j in range(nz):
        t = j * dz
        k = int(np.clip(np.searchsorted(plan.normal_pos, t, side="right") - 1, 0, len(slices) - 2))
        w = float(np.clip((t - plan.normal_pos[k]) / (plan.normal_pos[k + 1] - plan.normal_pos[k]), 0.0, 1.0))
        out[j] = (1.0 - w) * canvases[k] + w * canvases[k + 1]
    origin = np.array([float(v) for v in plan.headers[0].ImagePositionPatient])
    origin = origin + lo[0] * sx * plan.row + lo[1] * sy * plan.col
    return out, _geometry(out.shape, plan, (sx, sy, dz), origin)


def _meta(plan: _Plan, uid: str, include_phi: bool) -> dict:
    """Non-identifying facts about the series (plus PatientName/ID only when asked)."""
    first = plan.headers[0]
    meta = {
        "format": "DICOM",
        "modality": _modality(first) or "unknown",
        "series_instance_uid": uid,
        "series_description": str(first.get("SeriesDescription", "") or ""),
        "study_date": str(first.get("StudyDate", "") or ""),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "") or ""),
        "transfer_syntax_uid": str(getattr(first.file_meta, "TransferSyntaxUID", "")),
        "n_source_slices": len(plan.headers),
        "resampled": plan.resample_reason,
    }
    if not plan.resample_reason:
        meta["sop_instance_uids"] = [str(h.SOPInstanceUID) for h in plan.headers]
    else:
        meta["source_slice_normal_mm"] = [float(v) for v in plan.normal_pos]
    if include_phi:
        meta["PatientName"] = str(first.get("PatientName", "") or "")
        meta["PatientID"] = str(first.get("PatientID", "") or "")
    return meta
