"""Point sets (landmarks, clicked pairs): CSV, Slicer markups (.mrk.json, .fcsv) and DIR-Lab voxel text.

Every reader returns points in ITK LPS millimetres; RAS files are converted through `lps_ras`.

Formats (chosen by suffix, or by content when the suffix says nothing):
- CSV (`.csv`, `.tsv`): a header row, then one point per row. Coordinate columns `x,y,z` (LPS mm),
  or Slicer's control-point table columns `l,p,s` (LPS) or `r,a,s` (RAS); an optional `label`
  column; any other column is kept as text in `PointSet.extra`. Point pairs use the header
  `fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z` and `read_point_pairs`.
- Slicer markups JSON (`.mrk.json`): the first markup of type "Fiducial" (a point list) is read.
  Its `coordinateSystem` is honoured; when absent it is LPS, as in Slicer's JSON reader and the
  schema's default. Only `coordinateUnits` "mm" is accepted.
- Legacy Slicer `.fcsv`: the `# CoordinateSystem = ...` line gives RAS or LPS (also as the old
  numbers 0 = RAS, 1 = LPS); a file without that line is RAS (files from before Slicer 4.11 and
  slicerio read it the same way). Columns id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,
  associatedNodeID, then (Slicer 5) positionStatus (0 undefined, 1 preview, 2 defined, 3 missing).
- DIR-Lab voxel text (`.txt`): three whitespace-separated columns of 1-based voxel indices
  (x, y, z) per line; needs the image geometry (see `read_dirlab_points`).

Control points that are not placed (Slicer position status other than "defined") are left out of
`points_lps`; their labels are listed in `PointSet.undefined_labels`, and pairing by order refuses
such sets because their order no longer lines up.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import IkrError
from ..core.geometry import Geometry, lps_ras
from .atomic import write_text_atomic

MARKUPS_SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/"
    "Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"
)
COORDINATE_SYSTEMS = ("LPS", "RAS")
PAIR_COLUMNS = ("fixed_x", "fixed_y", "fixed_z", "moving_x", "moving_y", "moving_z")
FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
FCSV_STATUS = {"0": "undefined", "1": "preview", "2": "defined", "3": "missing"}
_CSV_AXES = {("x", "y", "z"): "LPS", ("l", "p", "s"): "LPS", ("r", "a", "s"): "RAS"}


@dataclass
class PointSet:
    """N points in LPS mm with a label each; `extra` holds other per-point columns as text."""

    points_lps: np.ndarray
    labels: list[str] | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)
    undefined_labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Coerce the points to (N, 3) float64, default labels to "1".."N", and check the lengths."""
        self.points_lps = np.asarray(self.points_lps, dtype=np.float64).reshape(-1, 3)
        n = len(self.points_lps)
        self.labels = [str(i + 1) for i in range(n)] if self.labels is None else list(self.labels)
        if len(self.labels) != n:
            raise ValueError(f"{len(self.labels)} labels for {n} points")
        for name, values in self.extra.items():
            if len(values) != n:
                raise ValueError(f"extra column {name!r} has {len(values)} values for {n} points")

    def __len__(self) -> int:
        """The number of points."""
        return len(self.points_lps)


# ---------------------------------------------------------------- public API


def read_points(
    path: str | os.PathLike, image_geometry: Geometry | None = None, *, dirlab_flip_z: bool = False
) -> PointSet:
    """Read points (CSV, .mrk.json, .fcsv, DIR-Lab .txt) in LPS mm; check them against `image_geometry`."""
    text = _read_text(path)
    kind = _detect_format(path, text)
    if kind == "dirlab":
        return read_dirlab_points(path, image_geometry, flip_z=dirlab_flip_z)
    readers = {"csv": _parse_csv_points, "markups": _parse_markups_json, "fcsv": _parse_fcsv}
    point_set = readers[kind](text, path)
    if image_geometry is not None:
        check_points_inside(point_set.points_lps, image_geometry, path, point_set.labels)
    return point_set


def read_point_pairs(path: str | os.PathLike) -> tuple[PointSet, PointSet]:
    """Read a pair CSV (fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z[,label]) as (fixed, moving)."""
    rows, header = _csv_rows(_read_text(path), path)
    missing = [c for c in PAIR_COLUMNS if c not in header]
    if missing:
        raise IkrError(f"a point-pair CSV needs the columns {', '.join(PAIR_COLUMNS)}; missing {missing}", path)
    values = _numeric_columns(rows, header, PAIR_COLUMNS, path)
    labels = _label_column(rows, header)
    extra = _extra_columns(rows, header, set(PAIR_COLUMNS) | {"label"})
    fixed = PointSet(values[:, :3], labels, extra)
    moving = PointSet(values[:, 3:], list(fixed.labels), {k: list(v) for k, v in extra.items()})
    return fixed, moving


def read_dirlab_points(path: str | os.PathLike, image_geometry: Geometry | None, *, flip_z: bool = False) -> PointSet:
    """Read DIR-Lab 1-based voxel indices (x y z per line) and map them to LPS mm on `image_geometry`.

    DIR-Lab landmark files give 1-based (x, y, z) voxel indices on the raw `.img` volume, with z the
    slice number in the order the raw file stores its slices; index i maps to grid index i - 1.
    Conversion scripts in the field commonly flip the superior-inferior axis when turning the raw
    volumes into .mha/.nii (the raw stack is reported to start at the superior end, so it looks
    upside down with an identity direction). We assume by default (`flip_z=False`) that the image
    whose geometry is given keeps the raw slice order. Pass `flip_z=True` when it was flipped: slice
    z then lands on grid index size_z - z.
    """
    if image_geometry is None:
        raise IkrError("DIR-Lab voxel files hold voxel indices; the image geometry is needed to place them", path)
    rows = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3:
            raise IkrError(f"line {line_no}: expected 3 voxel indices (x y z), found {len(fields)} values", path)
        rows.append([_number(v, f"line {line_no}", path) for v in fields])
    if not rows:
        raise IkrError("no points in the file", path)
    index = np.asarray(rows) - 1.0
    if flip_z:
        index[:, 2] = (image_geometry.size[2] - 1) - index[:, 2]
    points = image_geometry.index_to_lps(index)
    point_set = PointSet(points)
    check_points_inside(points, image_geometry, path, point_set.labels)
    return point_set


def write_points(point_set: PointSet, path: str | os.PathLike, coordinate_system: str = "LPS") -> Path:
    """Write a point set atomically as CSV, .mrk.json or .fcsv (by suffix), in LPS or RAS."""
    coordinate_system = _coordinate_system(coordinate_system, path)
    name = Path(path).name.lower()
    if name.endswith(".mrk.json") or name.endswith(".json"):
        return write_text_atomic(path, _markups_json_text(point_set, coordinate_system))
    if name.endswith(".fcsv"):
        return write_text_atomic(path, _fcsv_text(point_set, coordinate_system))
    if name.endswith(".csv"):
        return write_text_atomic(path, _csv_points_text(point_set, coordinate_system))
    raise IkrError("cannot write points here: use a .csv, .mrk.json or .fcsv file name", path)


def pair_points(fixed: PointSet, moving: PointSet, by: str = "order") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair clicked points by list order or by label: (fixed_lps (N,3), moving_lps (N,3), labels)."""
    if by == "order":
        return _pair_by_order(fixed, moving)
    if by == "label":
        return _pair_by_label(fixed, moving)
    raise IkrError(f"unknown pairing {by!r}: use 'order' or 'label'")


def check_points_inside(
    points: np.ndarray,
    geometry: Geometry,
    path: str | os.PathLike | None = None,
    labels: list[str] | None = None,
) -> None:
    """Raise IkrError naming the points (LPS mm) that lie outside the image grid (half a voxel margin)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    outside = np.flatnonzero(~geometry.contains_lps(points))
    if len(outside) == 0:
        return
    names = labels if labels is not None else [str(i + 1) for i in range(len(points))]
    shown = ", ".join(f"{names[i]!r} at LPS ({', '.join(f'{v:.1f}' for v in points[i])})" for i in outside[:5])
    more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
    raise IkrError(f"{len(outside)} of {len(points)} points lie outside the image: {shown}{more}", path)


# ---------------------------------------------------------------- reading helpers


def _read_text(path: str | os.PathLike) -> str:
    """The file's text (UTF-8, a byte-order mark dropped); IkrError when missing, unreadable or empty."""
    p = Path(path)
    if p.is_dir():
        raise IkrError("is a folder, not a point file", path)
    if not p.is_file():
        raise IkrError("no such file", path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IkrError(f"not a UTF-8 text file (byte {exc.start})", path) from None
    except OSError as exc:
        raise IkrError(f"cannot be read ({exc.strerror or exc})", path) from None
    if not text.strip():
        raise IkrError("the file is empty", path)
    return text


def _detect_format(path: str | os.PathLike, text: str) -> str:
    """The format name ('csv', 'markups', 'fcsv', 'dirlab') from the suffix, else from the content."""
    name = Path(path).name.lower()
    if name.endswith(".json"):
        return "markups"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    first = text.lstrip()
    if first.startswith(("{", "[")):
        return "markups"
    if first.startswith("# Markups fiducial file version") or "# columns = id," in text[:2000]:
        return "fcsv"
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "dirlab" if lines and _all_numbers(lines[0]) else "csv"


def _all_numbers(line: str) -> bool:
    """Whether every comma/whitespace-separated field of the line reads as a number."""
    try:
        [float(v) for v in line.replace(",", " ").split()]
    except ValueError:
        return False
    return True


def _number(value: str, where: str, path: str | os.PathLike, column: str | None = None) -> float:
    """Parse one finite float, or raise IkrError saying where and which value."""
    what = f"column {column!r} " if column else ""
    try:
        number = float(value)
    except ValueError:
        raise IkrError(f"{where}: {what}value {value.strip()!r} is not a number", path) from None
    if not math.isfinite(number):
        raise IkrError(f"{where}: {what}value {value.strip()!r} is not finite", path)
    return number


def _csv_rows(text: str, path: str | os.PathLike) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """Rows (line number, fields) after the header, and the lower-cased header; every row has its length."""
    reader = csv.reader(io.StringIO(text), delimiter=_csv_delimiter(text, path))
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    for fields in reader:
        if not fields or all(not f.strip() for f in fields) or fields[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [f.strip().lower() for f in fields]
            if len(set(header)) != len(header):
                raise IkrError(f"line {reader.line_num}: the header repeats a column name", path)
            continue
        if len(fields) != len(header):
            raise IkrError(
                f"line {reader.line_num}: expected {len(header)} columns like the header, got {len(fields)}",
                path,
            )
        rows.append((reader.line_num, fields))
    if header is None:
        raise IkrError("the file is empty", path)
    if not rows:
        raise IkrError("no points in the file (only a header)", path)
    return rows, header


def _csv_delimiter(text: str, path: str | os.PathLike) -> str:
    """Comma, or tab (.tsv, or a header with tabs and no comma), or semicolon (spreadsheet exports)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    header = lines[0] if lines else ""
    if Path(path).name.lower().endswith(".tsv") or ("\t" in header and "," not in header):
        return "\t"
    return ";" if (";" in header and "," not in header) else ","


def _numeric_columns(
    rows: list[tuple[int, list[str]]], header: list[str], columns: tuple[str, ...], path: str | os.PathLike
) -> np.ndarray:
    """The named columns of every row as an (N, len(columns)) float array, checked finite."""
    idx = [header.index(c) for c in columns]
    return np.array(
        [[_number(fields[i], f"line {line_no}", path, header[i]) for i in idx] for line_no, fields in rows],
        dtype=np.float64,
    ).reshape(len(rows), len(columns))


def _label_column(rows: list[tuple[int, list[str]]], header: list[str]) -> list[str] | None:
    """The `label` column's values (stripped), or None when there is none."""
    if "label" not in header:
        return None
    i = header.index("label")
    return [fields[i].strip() for _, fields in rows]


def _extra_columns(rows: list[tuple[int, list[str]]], header: list[str], known: set[str]) -> dict[str, list[str]]:
    """Every column not in `known`, as text per row."""
    return {name: [fields[i] for _, fields in rows] for i, name in enumerate(header) if name not in known}


def _parse_csv_points(text: str, path: str | os.PathLike) -> PointSet:
    """Parse a point CSV whose header names x,y,z (LPS), l,p,s (LPS) or r,a,s (RAS) and maybe label."""
    rows, header = _csv_rows(text, path)
    if set(PAIR_COLUMNS) <= set(header):
        raise IkrError("this is a point-pair CSV (fixed_x..moving_z); read it with read_point_pairs", path)
    axes = next((a for a in _CSV_AXES if set(a) <= set(header)), None)
    if axes is None:
        raise IkrError(f"the header must name the columns x,y,z (LPS mm), l,p,s or r,a,s; found {header}", path)
    defined = _defined_rows(rows, header, path)
    labels = _label_column(rows, header) or [str(i + 1) for i in range(len(rows))]
    kept = [row for row, ok in zip(rows, defined, strict=True) if ok]
    if not kept:
        raise IkrError("no defined points in the file", path)
    points = _numeric_columns(kept, header, axes, path)
    if _CSV_AXES[axes] == "RAS":
        points = lps_ras(points)
    extra = _extra_columns(kept, header, set(axes) | {"label", "defined"})
    kept_labels = [label for label, ok in zip(labels, defined, strict=True) if ok]
    undefined = [label for label, ok in zip(labels, defined, strict=True) if not ok]
    return PointSet(points, kept_labels, extra, undefined)


def _defined_rows(rows: list[tuple[int, list[str]]], header: list[str], path: str | os.PathLike) -> list[bool]:
    """Which rows are placed points, from Slicer's optional `defined` column (1/true or 0/false)."""
    if "defined" not in header:
        return [True] * len(rows)
    i = header.index("defined")
    flags = []
    for line_no, fields in rows:
        value = fields[i].strip().lower()
        if value not in ("1", "0", "true", "false"):
            raise IkrError(f"line {line_no}: column 'defined' must be 0/1 or true/false, found {value!r}", path)
        flags.append(value in ("1", "true"))
    return flags


def _coordinate_system(value: object, path: str | os.PathLike, where: str = "") -> str:
    """'LPS' or 'RAS' (also Slicer's old numbers 0 = RAS, 1 = LPS), else IkrError."""
    text = str(value).strip().upper()
    text = {"0": "RAS", "1": "LPS"}.get(text, text)
    if text not in COORDINATE_SYSTEMS:
        raise IkrError(f"{where}unknown coordinate system {value!r}: expected LPS or RAS", path)
    return text


def _parse_markups_json(text: str, path: str | os.PathLike) -> PointSet:
    """Parse the first point list ("Fiducial") of a Slicer markups JSON file."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IkrError(f"not valid JSON (line {exc.lineno}: {exc.msg})", path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise IkrError("not a Slicer markups file: no 'markups' list at the top level", path)
    markups = [m for m in doc["markups"] if isinstance(m, dict)]
    point_lists = [m for m in markups if m.get("type") == "Fiducial"]
    if not point_lists:
        types = sorted({str(m.get("type")) for m in markups}) or ["none"]
        raise IkrError(f"the markups file holds no point list (markup types: {', '.join(types)})", path)
    markup = point_lists[0]
    system = _coordinate_system(markup.get("coordinateSystem", "LPS"), path, "markup: ")
    _check_units(markup.get("coordinateUnits", "mm"), path)
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise IkrError("markup 'controlPoints' is not a list", path)
    points, labels, statuses, descriptions, undefined = [], [], [], [], []
    for i, cp in enumerate(control_points, start=1):
        label, status, position = _control_point(cp, i, path)
        if status != "defined":
            undefined.append(label)
            continue
        points.append(position)
        labels.append(label)
        statuses.append(status)
        descriptions.append(str(cp.get("description", "")))
    if not points:
        raise IkrError("the point list has no placed (defined) control points", path)
    points_lps = np.asarray(points) if system == "LPS" else lps_ras(np.asarray(points))
    return PointSet(points_lps, labels, {"description": descriptions}, undefined)


def _check_units(units: object, path: str | os.PathLike) -> None:
    """Accept millimetres only ('mm' or the UCUM code triple ['mm', 'UCUM', ...])."""
    code = units[0] if isinstance(units, list) and units else units
    if code != "mm":
        raise IkrError(f"markup coordinateUnits {units!r} is not supported: only mm", path)


def _control_point(cp: object, i: int, path: str | os.PathLike) -> tuple[str, str, list[float]]:
    """(label, position status, position) of markups control point number i (1-based)."""
    if not isinstance(cp, dict):
        raise IkrError(f"control point {i} is not a JSON object", path)
    label = str(cp.get("label", "")) or str(i)
    has_position = "position" in cp
    status = str(cp.get("positionStatus", "defined"))
    if status not in ("undefined", "preview", "defined", "missing"):
        raise IkrError(f"control point {i} ({label!r}): unknown positionStatus {status!r}", path)
    if not has_position:
        return label, "undefined", []
    position = cp["position"]
    if not isinstance(position, list) or len(position) != 3:
        raise IkrError(f"control point {i} ({label!r}): position must be a list of 3 numbers", path)
    where = f"control point {i} ({label!r})"
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in position):
        raise IkrError(f"{where}: position {position!r} holds a value that is not a number", path)
    values = [_number(str(v), where, path) for v in position]
    return label, status, values


def _parse_fcsv(text: str, path: str | os.PathLike) -> PointSet:
    """Parse a legacy Slicer .fcsv point list (RAS when the file does not say)."""
    system = "RAS"
    points, labels, descriptions, undefined = [], [], [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            name, _, value = line[1:].partition("=")
            if name.strip() == "CoordinateSystem":
                system = _coordinate_system(value, path, f"line {line_no}: ")
            continue
        if not line.strip():
            continue
        fields = next(csv.reader([line]))
        if len(fields) < 4:
            raise IkrError(f"line {line_no}: expected at least id,x,y,z, found {len(fields)} columns", path)
        where = f"line {line_no}"
        xyz = [_number(v, where, path, c) for v, c in zip(fields[1:4], "xyz", strict=True)]
        label = fields[11].strip() if len(fields) > 11 and fields[11].strip() else fields[0].strip()
        status_code = fields[14].strip() if len(fields) > 14 and fields[14].strip() else "2"
        if status_code not in FCSV_STATUS:
            raise IkrError(f"{where}: unknown position status {status_code!r} (expected 0-3)", path)
        if FCSV_STATUS[status_code] != "defined":
            undefined.append(label)
            continue
        points.append(xyz)
        labels.append(label)
        descriptions.append(fields[12] if len(fields) > 12 else "")
    if not points:
        raise IkrError("no points in the file", path)
    points_lps = np.asarray(points) if system == "LPS" else lps_ras(np.asarray(points))
    return PointSet(points_lps, labels, {"description": descriptions}, undefined)


# ---------------------------------------------------------------- writing helpers


def _fmt(value: float) -> str:
    """A float as the shortest text that reads back to the same value."""
    return repr(float(value))


def _in_system(point_set: PointSet, coordinate_system: str) -> np.ndarray:
    """The points in the requested system (LPS as stored, or RAS)."""
    return point_set.points_lps if coordinate_system == "LPS" else lps_ras(point_set.points_lps)


def _csv_points_text(point_set: PointSet, coordinate_system: str) -> str:
    """CSV text: label,x,y,z (LPS) or Slicer's label,r,a,s (RAS), then the extra columns."""
    axes = ["x", "y", "z"] if coordinate_system == "LPS" else ["r", "a", "s"]
    extra = [name for name in point_set.extra if name not in {"label", *axes}]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", *axes, *extra])
    for i, (label, p) in enumerate(zip(point_set.labels, _in_system(point_set, coordinate_system), strict=True)):
        writer.writerow([label, *(_fmt(v) for v in p), *(point_set.extra[name][i] for name in extra)])
    return buffer.getvalue()


def _markups_json_text(point_set: PointSet, coordinate_system: str) -> str:
    """Slicer markups JSON (schema v1.0.3) text holding one point list."""
    descriptions = point_set.extra.get("description", [""] * len(point_set))
    control_points = [
        {
            "id": str(i + 1),
            "label": label,
            "description": str(description),
            "position": [float(v) for v in p],
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, (label, p, description) in enumerate(
            zip(point_set.labels, _in_system(point_set, coordinate_system), descriptions, strict=True)
        )
    ]
    markup = {
        "type": "Fiducial",
        "coordinateSystem": coordinate_system,
        "coordinateUnits": "mm",
        "controlPoints": control_points,
    }
    return json.dumps({"@schema": MARKUPS_SCHEMA_URL, "markups": [markup]}, indent=4) + "\n"


def _fcsv_field(text: str) -> str:
    """A label or description made safe for one .fcsv field (quoted as Slicer does when it holds a comma)."""
    text = text.replace("\n", " ")
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text


def _fcsv_text(point_set: PointSet, coordinate_system: str) -> str:
    """Legacy .fcsv text in the requested coordinate system."""
    descriptions = point_set.extra.get("description", [""] * len(point_set))
    lines = [
        "# Markups fiducial file version = 4.11",
        f"# CoordinateSystem = {coordinate_system}",
        f"# columns = {FCSV_COLUMNS}",
    ]
    points = _in_system(point_set, coordinate_system)
    for i, (label, p, description) in enumerate(zip(point_set.labels, points, descriptions, strict=True)):
        xyz = ",".join(_fmt(v) for v in p)
        lines.append(f"{i + 1},{xyz},0,0,0,1,1,1,0,{_fcsv_field(label)},{_fcsv_field(str(description))},")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pairing helpers


def _pair_by_order(fixed: PointSet, moving: PointSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair point i with point i; refuse different counts or lists with unplaced points."""
    for name, ps in (("fixed", fixed), ("moving", moving)):
        if ps.undefined_labels:
            raise IkrError(
                f"cannot pair by order: the {name} list has unplaced points {ps.undefined_labels}; pair by label"
            )
    if len(fixed) != len(moving):
        raise IkrError(f"cannot pair by order: {len(fixed)} fixed points but {len(moving)} moving points")
    return fixed.points_lps.copy(), moving.points_lps.copy(), list(fixed.labels)


def _unique_labels(ps: PointSet, name: str) -> dict[str, int]:
    """Label -> index, refusing duplicate labels."""
    seen: dict[str, int] = {}
    for i, label in enumerate(ps.labels):
        if label in seen:
            raise IkrError(f"cannot pair by label: the {name} list has the label {label!r} more than once")
        seen[label] = i
    return seen


def _pair_by_label(fixed: PointSet, moving: PointSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair points with equal labels (in the fixed list's order); every point needs one partner."""
    f_index = _unique_labels(fixed, "fixed")
    m_index = _unique_labels(moving, "moving")
    lonely_fixed = [label for label in f_index if label not in m_index]
    lonely_moving = [label for label in m_index if label not in f_index]
    if lonely_fixed or lonely_moving:
        parts = []
        if lonely_fixed:
            parts.append(f"fixed points with no moving partner: {lonely_fixed}")
        if lonely_moving:
            parts.append(f"moving points with no fixed partner: {lonely_moving}")
        raise IkrError("cannot pair by label: " + "; ".join(parts))
    labels = list(f_index)
    order = [m_index[label] for label in labels]
    return fixed.points_lps.copy(), moving.points_lps[order].copy(), labels
