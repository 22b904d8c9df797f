"""Segmentations: label maps (NRRD/NIfTI/MetaImage), Slicer .seg.nrrd (via slicerio) and DICOM-SEG (highdicom).

slicerio and highdicom are imported only where a .seg.nrrd or a DICOM-SEG is read or written: neither ships
with 3D Slicer, whose module imports this file for plain label maps.

A label map is an integer Image (0 = background) plus a {label value: name} dict. DICOM-SEG frames are
placed on the referenced image's grid by their plane positions (ImagePositionPatient of each frame),
falling back to ReferencedSOPInstanceUID when a frame has no plane position.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from ..core.errors import IkrError
from ..core.geometry import Geometry, Image
from . import dicom
from .atomic import atomic_path
from .images import image_format, read_image, write_image

if TYPE_CHECKING:
    import highdicom as hd

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
IN_PLANE_TOL = 0.05  # voxels
NORMAL_TOL = 0.1  # voxels


def read_labels(
    path: str | os.PathLike, reference: Image | None = None, series_uid: str | None = None
) -> tuple[Image, dict[int, str]]:
    """Read a label map and its names from a label image, a Slicer .seg.nrrd or a DICOM-SEG file."""
    path = Path(path)
    if not path.exists():
        raise IkrError("no such file or folder", path)
    if path.is_dir():
        path = _seg_file_in_folder(path, series_uid)
    if path.name.lower().endswith(".seg.nrrd"):
        labels, names = _read_seg_nrrd(path)
    elif image_format(path) is None and _is_dicom_seg(path):
        if reference is None:
            raise IkrError("a DICOM-SEG needs the image it segments (the reference) to be placed on", path)
        labels, names = _masks_to_labels(read_dicom_seg(path, reference), path)
    else:
        labels, names = _read_label_image(path)
    if reference is not None and not _same_grid(labels.geometry, reference.geometry):
        labels = _resample_nearest(labels, reference.geometry)
    return labels, names


def _seg_file_in_folder(folder: Path, series_uid: str | None) -> Path:
    """The one DICOM-SEG file in a folder (or the one of the given series)."""
    groups = dicom.scan_folder(folder)
    segs = {u: h for u, h in groups.items() if str(h[0].get("SOPClassUID", "")) == SEG_SOP_CLASS}
    if series_uid is not None:
        segs = {u: h for u, h in segs.items() if u == series_uid}
    if len(segs) != 1 or len(next(iter(segs.values()))) != 1:
        found = ", ".join(segs) or "none"
        raise IkrError(f"expected exactly one DICOM-SEG file here (pass --series); found: {found}", folder)
    return Path(next(iter(segs.values()))[0].filename)


def _is_dicom_seg(path: Path) -> bool:
    """Whether a file is a DICOM Segmentation object."""
    header = dicom.read_header(path)
    return header is not None and str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS


def _read_label_image(path: Path) -> tuple[Image, dict[int, str]]:
    """Read a plain label image; values must be non-negative integers."""
    try:
        image = read_image(path)
    except IkrError as err:
        if "constant image" not in err.problem:
            raise
        image = Image.from_sitk(sitk.ReadImage(str(path)), {"format": image_format(path)})
    arr = image.array
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise IkrError(f"is not a label map: its voxels are not integers (type {arr.dtype})", path)
        arr = arr.astype(np.int32)
    if arr.min() < 0:
        raise IkrError(f"is not a label map: it has negative values (minimum {arr.min()})", path)
    arr = _smallest_uint(arr)
    names = {int(v): f"label_{int(v)}" for v in np.unique(arr) if v != 0}
    return Image(arr, image.geometry, image.meta), names


def _smallest_uint(arr: np.ndarray) -> np.ndarray:
    """Labels as uint8 or uint16 when they fit, else uint32."""
    top = int(arr.max()) if arr.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return arr.astype(dtype)
    raise IkrError(f"label values up to {top} are too large")


def _read_seg_nrrd(path: Path) -> tuple[Image, dict[int, str]]:
    """Read a Slicer .seg.nrrd: one label per segment (layers merged where segments do not overlap)."""
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio/pynrrd raise many types for a bad file
        raise IkrError(f"cannot read Slicer segmentation: {err}", path) from err
    voxels = np.asarray(seg["voxels"])
    geometry = _geometry_from_ijk_to_lps(np.asarray(seg["ijkToLPS"]), voxels.shape[-3:])
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels
    segments = seg.get("segments", [])
    if layers.shape[0] == 1:
        names = {int(s.get("labelValue", i + 1)): str(s.get("name", s.get("id", ""))) for i, s in enumerate(segments)}
        arr = _smallest_uint(np.transpose(layers[0], (2, 1, 0)))
        return Image(np.ascontiguousarray(arr), geometry, {"format": "Slicer segmentation"}), names
    masks = {}
    for s in segments:
        layer = layers[int(s.get("layer", 0))]
        masks[str(s.get("name", s.get("id", "")))] = np.transpose(layer == int(s.get("labelValue", 1)), (2, 1, 0))
    images = {name: Image(np.ascontiguousarray(m.astype(np.uint8)), geometry) for name, m in masks.items()}
    return _masks_to_labels(images, path)


def _geometry_from_ijk_to_lps(ijk_to_lps: np.ndarray, shape_ijk: tuple) -> Geometry:
    """A Geometry from a 4x4 voxel (i, j, k) -> LPS matrix and the (i, j, k) shape."""
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing[None, :]
    return Geometry(
        size=tuple(int(v) for v in shape_ijk),
        spacing_mm=tuple(float(v) for v in spacing),
        origin_lps=tuple(float(v) for v in ijk_to_lps[:3, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _masks_to_labels(masks: dict[str, Image], path: Path) -> tuple[Image, dict[int, str]]:
    """Merge per-segment masks into one label map (label i+1 for segment i); refuse overlaps."""
    if not masks:
        raise IkrError("contains no segments", path)
    items = list(masks.items())
    geometry = items[0][1].geometry
    labels = np.zeros(geometry.shape_zyx, dtype=np.uint16 if len(items) > 255 else np.uint8)
    names = {}
    for i, (name, image) in enumerate(items, start=1):
        inside = image.array > 0.5 if np.issubdtype(image.array.dtype, np.floating) else image.array > 0
        clash = labels[inside]
        if np.any(clash):
            other = names[int(clash[clash > 0][0])]
            raise IkrError(
                f"segments '{other}' and '{name}' overlap; a label map cannot hold both "
                "(read them one by one with read_dicom_seg or as separate masks)",
                path,
            )
        labels[inside] = i
        names[i] = name
    return Image(labels, geometry, {"format": "segmentation"}), names


def _same_grid(a: Geometry, b: Geometry, tol: float = 1e-4) -> bool:
    """Whether two geometries describe the same voxel grid."""
    return (
        a.size == b.size
        and np.allclose(a.spacing_mm, b.spacing_mm, atol=tol)
        and np.allclose(a.origin_lps, b.origin_lps, atol=tol * 10)
        and np.allclose(a.direction, b.direction, atol=tol)
    )


def _resample_nearest(labels: Image, geometry: Geometry) -> Image:
    """Resample a label map onto another grid with nearest-neighbour interpolation (0 outside)."""
    out = sitk.Resample(labels.to_sitk(), geometry.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    arr = sitk.GetArrayFromImage(out).astype(labels.array.dtype)
    return Image(arr, geometry, {**labels.meta, "resampled_to_reference": True})


def read_dicom_seg(
    path: str | os.PathLike, reference: Image | str | os.PathLike, drop_outside: bool = False
) -> dict[str, Image]:
    """One mask per segment of a DICOM-SEG, on the referenced image's grid (uint8 0/1, or float32 in [0, 1]).

    `reference` is an Image or a DICOM folder (its series is the one the SEG references). A non-empty
    frame that does not lie on a slice of the reference is an error, unless `drop_outside` (then it is
    counted in each mask's meta["frames_outside_reference"]).
    """
    path = Path(path)
    seg = _read_seg(path)
    ref = _reference_image(seg, reference, path)
    frames = _frame_values(seg, path)
    r_dir = ref.geometry.direction_matrix
    sop_index = {u: k for k, u in enumerate(ref.meta.get("sop_instance_uids", []))}
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    dtype = np.float32 if frames.dtype == np.float32 else np.uint8
    masks = {n: np.zeros(ref.geometry.shape_zyx, dtype=dtype) for n in numbers}
    dropped = 0
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(_item(seg, item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        place = _frame_place(seg, item, ref, r_dir, sop_index, path, f)
        if place is None or not _paste(masks[number], frames[f], place):
            if np.any(frames[f]) and not drop_outside:
                raise IkrError(
                    f"frame {f + 1} (segment {number}) does not lie on a slice of the reference image "
                    f"({_ref_name(ref)})",
                    path,
                )
            dropped += int(np.any(frames[f]))
    return _named_masks(seg, numbers, masks, ref, dropped)


def _read_seg(path: Path) -> hd.seg.Segmentation:
    """Read a DICOM-SEG with highdicom."""
    import highdicom as hd

    if not path.is_file():
        raise IkrError("no such file", path)
    try:
        return hd.seg.segread(path)
    except Exception as err:  # highdicom/pydicom raise many types for a bad file
        raise IkrError(f"not a readable DICOM Segmentation: {err}", path) from err


def _reference_image(seg: hd.seg.Segmentation, reference: Image | str | os.PathLike, path: Path) -> Image:
    """The reference Image, read from a folder when needed (the series the SEG references)."""
    if isinstance(reference, Image):
        return reference
    uids = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    folder = Path(reference)
    if not folder.exists():
        raise IkrError("no such reference folder or file", folder)
    if folder.is_dir():
        available = dicom.scan_folder(folder)
        uid = next((u for u in uids if u in available), None)
        if uid is None:
            raise IkrError(f"the referenced series {', '.join(uids) or '(none named)'} is not in {folder}", path)
        return dicom.read_series(folder, uid)
    return read_image(folder)


def _frame_values(seg: hd.seg.Segmentation, path: Path) -> np.ndarray:
    """All frames as (frames, rows, cols): uint8 0/1 for BINARY, float32 in [0, 1] for FRACTIONAL."""
    try:
        frames = np.asarray(seg.pixel_array)
    except Exception as err:  # decoder errors
        raise IkrError(f"cannot decode the segmentation frames: {err}", path) from err
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    if str(seg.SegmentationType) == "FRACTIONAL":
        return (frames.astype(np.float32) / float(seg.MaximumFractionalValue)).clip(0.0, 1.0)
    return (frames > 0).astype(np.uint8)


def _item(seg: hd.seg.Segmentation, frame_item: object, key: str) -> object:
    """A functional group for one frame: per-frame when present, else shared."""
    if key in frame_item:
        return frame_item[key].value[0]
    shared = seg.SharedFunctionalGroupsSequence[0]
    if key in shared:
        return shared[key].value[0]
    return None


def _frame_place(
    seg: hd.seg.Segmentation, item: object, ref: Image, r_dir: np.ndarray, sop_index: dict, path: Path, f: int
) -> tuple[int, int, int] | None:
    """The reference voxel (x, y, z) of a frame's first pixel, or None when it is not on a slice."""
    orient = _item(seg, item, "PlaneOrientationSequence")
    if orient is not None:
        iop = np.array([float(v) for v in orient.ImageOrientationPatient])
        if np.max(np.abs(iop - np.concatenate([r_dir[:, 0], r_dir[:, 1]]))) > 1e-3:
            raise IkrError(f"frame {f + 1} is not oriented like the reference image's slices", path)
    pos = _item(seg, item, "PlanePositionSequence")
    if pos is not None:
        idx = ref.geometry.lps_to_index(np.array([[float(v) for v in pos.ImagePositionPatient]]))[0]
        rounded = np.round(idx)
        if np.max(np.abs(idx[:2] - rounded[:2])) > IN_PLANE_TOL or abs(idx[2] - rounded[2]) > NORMAL_TOL:
            return None
        return int(rounded[0]), int(rounded[1]), int(rounded[2])
    source = _source_sop(item)
    if source in sop_index:
        return 0, 0, sop_index[source]
    raise IkrError(f"frame {f + 1} has neither a plane position nor a source image in the reference", path)


def _source_sop(item: object) -> str | None:
    """The ReferencedSOPInstanceUID a frame was derived from, if recorded."""
    try:
        return str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
    except (AttributeError, IndexError, KeyError):
        return None


def _paste(mask: np.ndarray, frame: np.ndarray, place: tuple[int, int, int]) -> bool:
    """Copy a frame into the mask at voxel (x, y, z) (clipped in plane); False when the slice is outside."""
    x0, y0, z = place
    nz, ny, nx = mask.shape
    if not 0 <= z < nz:
        return False
    rows, cols = frame.shape
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(ny, y0 + rows), min(nx, x0 + cols)
    if ye <= ys or xe <= xs:
        return False
    part = frame[ys - y0 : ye - y0, xs - x0 : xe - x0]
    mask[z, ys:ye, xs:xe] = np.maximum(mask[z, ys:ye, xs:xe], part)
    return True


def _named_masks(seg: hd.seg.Segmentation, numbers: list[int], masks: dict, ref: Image, dropped: int) -> dict:
    """Wrap masks as Images keyed by segment label (made unique)."""
    out: dict[str, Image] = {}
    for s, n in zip(seg.SegmentSequence, numbers, strict=True):
        name = str(s.get("SegmentLabel", "") or f"segment_{n}")
        key = name if name not in out else f"{name} ({n})"
        meta = {
            "segment_number": n,
            "segmentation_type": str(seg.SegmentationType),
            "frames_outside_reference": dropped,
        }
        out[key] = Image(masks[n], ref.geometry, meta)
    return out


def _ref_name(ref: Image) -> str:
    """The reference image described briefly for messages."""
    uid = ref.meta.get("series_instance_uid")
    return f"series {uid}" if uid else f"grid {ref.geometry.size}"


def write_labels(labels: Image, names: dict[int, str], path: str | os.PathLike) -> Path:
    """Write a label map atomically: a Slicer .seg.nrrd (segment names kept) or a plain NRRD/NIfTI/MHA."""
    path = Path(path)
    arr = labels.array
    if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
        raise IkrError(f"labels must be non-negative integers (got {arr.dtype})", path)
    if not path.name.lower().endswith(".seg.nrrd"):
        return write_image(labels, path)
    import slicerio

    g = labels.geometry
    voxels = np.ascontiguousarray(np.transpose(_smallest_uint(arr), (2, 1, 0)))
    seg = slicerio.create_segmentation(voxels.shape, g.index_to_lps_matrix(), dtype=voxels.dtype)
    seg["voxels"] = voxels
    values = sorted({int(v) for v in np.unique(arr) if v != 0} | {int(k) for k in names})
    for v in values:
        seg["segments"].append(
            {"id": f"Segment_{v}", "name": str(names.get(v, f"label_{v}")), "labelValue": v, "layer": 0}
        )
    with atomic_path(path) as tmp:
        try:
            slicerio.write_segmentation(str(tmp), seg)
        except Exception as err:  # pynrrd errors
            raise IkrError(f"cannot write Slicer segmentation: {err}", path) from err
    return path
