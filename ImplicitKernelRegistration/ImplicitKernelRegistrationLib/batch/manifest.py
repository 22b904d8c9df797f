"""The cohort manifest of `ikr batch`: a CSV with one row per case, read and checked before anything runs.

Columns: `case,fixed,moving` (required) and `fixed_landmarks,moving_landmarks,tumour,ablation,
fixed_mask,moving_mask` (optional; empty cells allowed). Paths may be absolute or relative to the
manifest's folder; each names an image file or a DICOM folder. A bad manifest (unknown or missing
column, empty or repeated case name, a name that cannot be a folder name, half a pair) is refused with
one line naming the file and the row. A path that does not exist is not a manifest error: that case
fails alone when it runs, and the others go on.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import IkrError

REQUIRED = ("case", "fixed", "moving")
OPTIONAL = ("fixed_landmarks", "moving_landmarks", "tumour", "ablation", "fixed_mask", "moving_mask")
PAIRS = (("fixed_landmarks", "moving_landmarks"), ("tumour", "ablation"))
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Case:
    """One row of the manifest: the case name and its input paths (absolute; optional ones may be None)."""

    name: str
    fixed: str
    moving: str
    optional: dict[str, str] = field(default_factory=dict)

    def get(self, column: str) -> str | None:
        """The absolute path in `column`, or None when the cell was empty."""
        return {"fixed": self.fixed, "moving": self.moving}.get(column, self.optional.get(column))

    @property
    def has_margin(self) -> bool:
        """True when the row gives a tumour and an ablation zone (the case also measures the margin)."""
        return "tumour" in self.optional and "ablation" in self.optional

    def input_paths(self) -> dict[str, str]:
        """Every input path of the case by column name."""
        return {"fixed": self.fixed, "moving": self.moving, **self.optional}


def read_manifest(path: str | os.PathLike) -> list[Case]:
    """Read and check a manifest CSV; paths become absolute (relative ones from the manifest's folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise IkrError("the manifest does not exist", path) from err
    except (OSError, UnicodeDecodeError) as err:
        raise IkrError(f"cannot read the manifest ({getattr(err, 'strerror', None) or err})", path) from err
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise IkrError(f"row 1: the header lacks the column(s) {', '.join(missing)} (needs case,fixed,moving)", path)
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise IkrError(f"row 1: unknown column {unknown[0]!r} (known: {', '.join(REQUIRED + OPTIONAL)})", path)
    if len(set(header)) != len(header):
        raise IkrError("row 1: a column is named twice", path)
    reader.fieldnames = header
    cases: list[Case] = []
    seen: set[str] = set()
    for row_number, row in enumerate(reader, start=2):
        case = _read_row(row, row_number, path, seen)
        if case is not None:
            cases.append(case)
            seen.add(case.name.lower())
    if not cases:
        raise IkrError("the manifest lists no case", path)
    return cases


def _read_row(row: dict, row_number: int, manifest: Path, seen: set[str]) -> Case | None:
    """One checked case from a CSV row (None for a blank row)."""
    if None in row:
        raise IkrError(f"row {row_number}: more cells than columns", manifest)
    cells = {k: (v or "").strip() for k, v in row.items()}
    if not any(cells.values()):
        return None
    name = cells["case"]
    if not _SAFE_NAME.match(name):
        raise IkrError(
            f"row {row_number}: case name {name!r} must be 1-100 letters, digits, '.', '_' or '-' (a folder name)",
            manifest,
        )
    if name.lower() in seen:
        raise IkrError(f"row {row_number}: case {name!r} is listed twice", manifest)
    for column in ("fixed", "moving"):
        if not cells[column]:
            raise IkrError(f"row {row_number}: case {name!r} has no {column} image", manifest)
    for a, b in PAIRS:
        if bool(cells.get(a)) != bool(cells.get(b)):
            raise IkrError(
                f"row {row_number}: case {name!r} gives {a if cells.get(a) else b} without {b if cells.get(a) else a}",
                manifest,
            )
    base = manifest.resolve().parent
    absolute = {k: str((base / v).resolve()) for k, v in cells.items() if k != "case" and v}
    optional = {k: absolute[k] for k in OPTIONAL if k in absolute}
    return Case(name=name, fixed=absolute["fixed"], moving=absolute["moving"], optional=optional)
