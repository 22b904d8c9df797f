"""Read, check, write and describe 3D images: NIfTI, NRRD, MetaImage (SimpleITK) and DICOM folders."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import SimpleITK as sitk

from ..core.errors import IkrError
from ..core.geometry import Image
from .atomic import atomic_path

READ_SUFFIXES = {
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_FLOAT_PIXELS = (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)


def image_format(path: str | os.PathLike) -> str | None:
    """The format name for a file's suffix ('NIfTI', 'NRRD', 'MetaImage'), or None."""
    name = Path(path).name.lower()
    for suffix, fmt in READ_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def _dicom() -> ModuleType:
    """The DICOM reader (io.dicom), imported when first needed: pydicom takes 0.15-0.3 s to import."""
    from . import dicom

    return dicom


def read_image(
    path: str | os.PathLike, series_uid: str | None = None, include_phi: bool = False, choose_series: bool = False
) -> Image:
    """Read a 3D scalar image from a NIfTI/NRRD/MetaImage file or a DICOM folder (or file), and check it.

    `choose_series`: in a DICOM folder with several series and no `series_uid`, pick the one to register.
    """
    path = Path(path)
    check_readable(path)
    if path.is_dir():
        image = _dicom().read_series(path, series_uid, include_phi=include_phi, choose=choose_series)
    elif image_format(path) is None and _is_dicom_file(path):
        uid = series_uid or _series_uid_of(path)
        image = _dicom().read_series(path.parent, uid, include_phi=include_phi)
    else:
        image = _read_sitk(path)
    check_image(image, path)
    return image


def check_readable(path: Path) -> None:
    """Refuse a path that is missing or that this process may not read, with the true reason."""
    try:
        path.stat()
    except PermissionError as err:
        raise IkrError("cannot be reached: permission denied on a folder above it", path) from err
    except OSError as err:
        raise IkrError("no such file or folder", path) from err
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise IkrError("this folder cannot be read (permission denied)", path)
    elif not os.access(path, os.R_OK):
        raise IkrError("this file cannot be read (permission denied)", path)


MAX_MASK_LABELS = 255


def read_mask(path: str | os.PathLike) -> Image:
    """Read a mask (nonzero = inside): all ones is fine; empty, non-integer or CT-like values are refused."""
    path = Path(path)
    check_readable(path)
    image = _dicom().read_series(path) if path.is_dir() else _read_sitk(path)
    arr = image.array
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise IkrError("is not a mask: it contains NaN or infinite values", path)
    if not np.any(arr):
        raise IkrError("is an empty mask (no nonzero voxel)", path)
    lo, hi = arr.min(), arr.max()
    integral = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_ or np.array_equal(arr, np.round(arr))
    if not integral or lo < 0 or hi > MAX_MASK_LABELS:
        raise IkrError(
            f"is not a mask: its values run from {float(lo):g} to {float(hi):g}"
            f"{'' if integral else ' with fractions'} (an image?); a mask holds 0 outside and 1 (or a label) inside",
            path,
        )
    spacing = np.asarray(image.geometry.spacing_mm)
    if np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise IkrError(f"has an invalid voxel spacing {tuple(spacing)}", path)
    image.meta["path"] = str(path)
    return image


def _is_dicom_file(path: Path) -> bool:
    """Whether a file is DICOM (by suffix or by the 'DICM' preamble marker)."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _series_uid_of(path: Path) -> str:
    """The SeriesInstanceUID of one DICOM file."""
    header = _dicom().read_header(path)
    if header is None or "SeriesInstanceUID" not in header:
        raise IkrError("not a readable DICOM image file", path)
    return str(header.SeriesInstanceUID)


def _read_sitk(path: Path) -> Image:
    """Read a NIfTI/NRRD/MetaImage file with SimpleITK as a 3D scalar Image."""
    fmt = image_format(path)
    if fmt is None:
        raise IkrError("unsupported image format; use .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM folder", path)
    if fmt == "NIfTI":
        check_nifti_payload(path)
    with native_output() as native:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            reason = _native_reason(native()) or first_line(err)
            raise IkrError(f"cannot read {fmt} image: {reason}", path) from err
    if image.GetDimension() != 3:
        raise IkrError(f"is a {image.GetDimension()}D image; a 3D volume is needed", path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        n = image.GetNumberOfComponentsPerPixel()
        raise IkrError(f"is a vector image ({n} components per voxel) where a scalar image is expected", path)
    if 0 in image.GetSize():
        raise IkrError(f"is empty (size {tuple(image.GetSize())})", path)
    return Image.from_sitk(image, {"format": fmt})


@contextlib.contextmanager
def native_output() -> Iterator:
    """Catch what ITK's C++ readers print on the process's stdout/stderr; yield a function returning it."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)

        def captured() -> str:
            sink.seek(0)
            return sink.read().decode("utf-8", "replace")

        try:
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _native_reason(text: str) -> str:
    """The reason MetaIO or NRRD printed for a failed read ('' when it printed none we understand)."""
    ideal = re.search(r"ideal = (\d+) : actual = (\d+)", text)
    if ideal:
        return f"the file is truncated: {ideal.group(2)} of {ideal.group(1)} bytes of voxel data are present"
    return ""


def _nifti_expected_bytes(header: bytes, path: Path) -> int:
    """The bytes a NIfTI-1/2 file needs according to its header: voxel offset plus voxel data."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = max(352, int(struct.unpack(order + "f", header[108:112])[0]))
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = max(544, int(struct.unpack(order + "q", header[168:176])[0]))
            break
    else:
        raise IkrError("cannot read NIfTI image: no NIfTI header at its start", path)
    n_dims = dims[0]
    if not 1 <= n_dims <= 7 or any(d < 1 for d in dims[1 : n_dims + 1]) or bitpix <= 0 or bitpix % 8:
        raise IkrError(
            f"cannot read NIfTI image: damaged header (dims {list(dims[: n_dims + 1])}, {bitpix} bits per voxel)", path
        )
    return offset + int(np.prod(dims[1 : n_dims + 1], dtype=np.int64)) * (bitpix // 8)


def check_nifti_payload(path: Path) -> None:
    """Refuse a NIfTI file whose voxel data is shorter than its header says (a cut or damaged download).

    For .nii.gz the gzip trailer's length field is compared first (cheap); only when it disagrees
    is the stream decompressed (without keeping it) to count the bytes and find where it ends.
    """
    gz = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            header = f.read(540)
        expected = _nifti_expected_bytes(header, path)
        if not gz:
            present = path.stat().st_size
        elif _gzip_trailer_size(path) == expected % 2**32:
            return
        else:
            present = _decompressed_size(path, expected)
    except (EOFError, OSError, zlib.error) as err:
        raise IkrError(f"cannot read NIfTI image: a damaged or truncated gzip file ({err})", path) from err
    if present < expected:
        raise IkrError(
            f"cannot read NIfTI image: truncated, its header describes {expected} bytes but the file holds {present}",
            path,
        )


def _gzip_trailer_size(path: Path) -> int:
    """The uncompressed size (mod 2^32) stored in the last 4 bytes of a gzip file."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _decompressed_size(path: Path, limit: int) -> int:
    """Bytes a gzip file decompresses to, counting up to `limit` (raises EOFError when it is cut)."""
    total = 0
    with gzip.open(path, "rb") as f:
        while total < limit:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            total += len(chunk)
    return total


def first_line(err: Exception) -> str:
    """The most informative single line of a (multi-line) ITK error message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("itk::error", "description:")) or "could not" in ln.lower():
            return ln.split(":", 1)[-1].strip() if ln.lower().startswith("description:") else ln
    return lines[-1] if lines else type(err).__name__


def check_image(image: Image, path: str | os.PathLike | None = None) -> None:
    """Refuse images that cannot be registered: empty, non-finite, constant, or a degenerate grid."""
    arr = image.array
    if arr.size == 0:
        raise IkrError(f"is empty (size {image.geometry.size})", path)
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise IkrError(f"contains {bad} NaN or infinite voxels", path)
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise IkrError(f"has an unsupported voxel type {arr.dtype}", path)
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise IkrError(f"is a constant image (every voxel is {lo}); there is nothing to register", path)
    spacing = np.asarray(image.geometry.spacing_mm)
    if np.any(~np.isfinite(spacing)) or np.any(spacing <= 0):
        raise IkrError(f"has an invalid voxel spacing {tuple(spacing)}", path)
    if abs(np.linalg.det(image.geometry.direction_matrix)) < 1e-6:
        raise IkrError("has a degenerate direction matrix", path)


def _gzip_fast(source: Path, target: Path) -> None:
    """Gzip `source` into `target` as stored (level 0) deflate blocks, in 16 MB chunks.

    Float voxels hold almost no repeated strings: on the 1.5 mm thorax's outputs the best of zlib's
    settings (the run-length strategy, level 1) kept 88 % of the raw bytes and cost 0.6-2.6 s of the
    command's writing; stored blocks keep 100 % (+ a few bytes a block) in a fifth of the time, and any
    gzip reader takes them. zlib releases the GIL, so files written in threads are copied in parallel.
    """
    compressor = zlib.compressobj(0, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip wrapper
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(compressor.compress(chunk))
        dst.write(compressor.flush())


def write_sitk_image(image: sitk.Image, path: Path) -> None:
    """Write a SimpleITK image to `path` as it is named (not atomically: give a temporary path).

    A float image to `.nii.gz` is written as `.nii` by ITK (the same header and voxel bytes) and
    gzipped by `_gzip_fast`; anything else goes to ITK's writer, compressed unless it is `.nii`.
    """
    name = path.name.lower()
    floating = image.GetPixelID() in _FLOAT_PIXELS
    if name.endswith(".nii.gz") and floating:
        raw = path.with_name(path.name[: -len(".gz")])
        try:
            sitk.WriteImage(image, str(raw), useCompression=False)
            _gzip_fast(raw, path)
        finally:
            raw.unlink(missing_ok=True)
        return
    sitk.WriteImage(image, str(path), useCompression=not name.endswith(".nii"))


def write_sitk_atomic(image: sitk.Image, path: Path) -> None:
    """Write a SimpleITK image atomically (`write_sitk_image` on a temporary path, then renamed).

    A file our gzip could not write whole (a full disk, a file-size limit; ITK's writers report those only on
    stderr) is an error naming `path`.
    """
    with atomic_path(path) as tmp:
        try:
            write_sitk_image(image, tmp)
        except OSError as err:
            raise IkrError(f"was not written completely ({err.strerror or err}; disk full?)", path) from err


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write an Image atomically to .nii, .nii.gz, .nrrd or .mha (single-file formats) and return the path."""
    path = Path(path)
    if not path.name.lower().endswith(WRITE_SUFFIXES):
        raise IkrError(f"cannot write this format; use one of {', '.join(WRITE_SUFFIXES)}", path)
    try:
        write_sitk_atomic(image.to_sitk(), path)
    except RuntimeError as err:
        raise IkrError(f"cannot write image: {first_line(err)}", path) from err
    return path


def describe_image(path: str | os.PathLike, series_uid: str | None = None) -> dict:
    """A JSON-friendly description for `ikr info` (geometry, modality, values; series for DICOM), no PHI."""
    path = Path(path)
    check_readable(path)
    desc: dict = {"path": str(path)}
    if path.is_dir():
        series = _dicom().list_series(path)
        desc["format"] = "DICOM"
        desc["series"] = [s.summary() for s in series]
        try:
            image = read_image(path, series_uid)
        except IkrError as err:
            desc["volume_problem"] = err.problem
            return desc
    else:
        image = read_image(path, series_uid)
        desc["format"] = image.meta.get("format", "DICOM")
    desc.update(_describe_volume(image))
    return desc


def _describe_volume(image: Image) -> dict:
    """Geometry, pixel type, value range, extent and modality of a loaded image."""
    g = image.geometry
    corners = g.corners_lps()
    extent = [float(n * s) for n, s in zip(g.size, g.spacing_mm, strict=True)]
    modality, how = _modality(image)
    out = {
        "size": list(g.size),
        "spacing_mm": list(g.spacing_mm),
        "origin_lps": list(g.origin_lps),
        "direction": list(g.direction),
        "pixel_type": str(image.array.dtype),
        "value_range": [_number(image.array.min()), _number(image.array.max())],
        "extent_mm": extent,
        "bounds_lps": [corners.min(axis=0).tolist(), corners.max(axis=0).tolist()],
        "modality": modality,
        "modality_source": how,
    }
    for key in ("series_instance_uid", "series_description", "study_date", "resampled", "n_source_slices"):
        if image.meta.get(key):
            out[key] = image.meta[key]
    return out


def _number(value: np.generic) -> float | int:
    """A numpy scalar as a plain int or float."""
    return int(value) if np.issubdtype(type(value), np.integer) else float(value)


def _modality(image: Image) -> tuple[str, str]:
    """The modality and how it was found (DICOM attribute, or a guess from the intensities)."""
    if image.meta.get("modality") and image.meta.get("format") == "DICOM":
        return image.meta["modality"], "DICOM Modality attribute"
    arr = image.array
    integral = np.issubdtype(arr.dtype, np.integer)
    lo, hi = float(arr.min()), float(arr.max())
    if integral and lo >= 0 and hi <= 255 and len(np.unique(arr)) <= 256:
        return "unknown", "not stored in this format; integer values 0-255 suggest a label map or mask"
    if lo <= -900 and 0 < hi <= 10000:
        return "CT", f"guessed: not stored in this format; minimum {lo:g} and maximum {hi:g} look like HU"
    return "unknown", "not stored in this format"


def format_description(desc: dict) -> str:
    """Human-readable text of a `describe_image` result for the terminal."""
    lines = [f"{desc['path']}  ({desc.get('format', '?')})"]
    if "size" in desc:
        lines += [
            f"  size (x, y, z):      {' x '.join(str(v) for v in desc['size'])}",
            f"  spacing (mm):        {_fmt(desc['spacing_mm'])}",
            f"  origin (LPS mm):     {_fmt(desc['origin_lps'])}",
            f"  direction:           {_fmt(desc['direction'])}",
            f"  extent (mm):         {_fmt(desc['extent_mm'])}",
            f"  pixel type:          {desc['pixel_type']}",
            f"  value range:         {desc['value_range'][0]:g} .. {desc['value_range'][1]:g}",
            f"  modality:            {desc['modality']} ({desc['modality_source']})",
        ]
        if desc.get("resampled"):
            lines.append(f"  resampled:           {desc['resampled']}")
    for s in desc.get("series", []):
        mark = "ok" if s["consistent"] else "NOT A VOLUME"
        lines.append(
            f"  series {s['series_uid']}: {s['modality']} '{s['description']}', {s['n_files']} files, "
            f"{mark}: {s['reason']}"
        )
    if desc.get("volume_problem"):
        lines.append(f"  no volume read: {desc['volume_problem']}")
    return "\n".join(lines)


def _fmt(values: list) -> str:
    """Numbers with up to 4 decimals, comma separated."""
    return ", ".join(
        f"{float(v):.4g}" if abs(float(v)) >= 1e4 else f"{float(v):.4f}".rstrip("0").rstrip(".") for v in values
    )
