"""Displacement fields and ITK transforms on disk: vector images and ITK transform files.

On-disk conventions (those of ITK, ANTs and 3D Slicer):
- Vector images (`.nii.gz`, `.nii`, `.mha`, `.nrrd`) hold float32 displacements in LPS mm on the
  fixed grid, fixed -> moving (a "resampling" transform in Slicer's words). SimpleITK writes NIfTI
  vector images as 5D (x, y, z, 1, 3) with intent NIFTI_INTENT_VECTOR (1007) and the components
  left in LPS, exactly as ANTs writes its `*Warp.nii.gz`; ITK >= 5.4 reads intent 1007 as LPS and
  converts only NIFTI_INTENT_DISPVECT (1006) files from RAS (SimpleITK cannot write 1006: its
  conversion needs a fixed-length vector pixel). 3D Slicer reads all of these formats with ITK as
  a grid ("displacement field") transform when the file is loaded as a Transform.
- `sitk.DisplacementFieldTransform` needs float64 pixels: cast a read vector image with
  `sitk.Cast(image, sitk.sitkVectorFloat64)` first (`read_field` and `Field.to_sitk` do this).
- Transform files (`.h5`, `.tfm`, `.txt`) hold an ITK DisplacementFieldTransform (float64) that
  `sitk.ReadTransform` and Slicer load directly. `.tfm`/`.txt` store every value as text: use
  them only for small grids.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import IkrError
from ..core.fields import Field, field_from_transform
from ..core.geometry import Geometry
from .atomic import atomic_path
from .images import write_sitk_atomic

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt")


def _suffix(path: Path) -> str:
    """The lower-case file suffix, with `.nii.gz` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _check_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    """Raise IkrError unless `path` ends with one of `allowed`."""
    if _suffix(path) not in allowed:
        raise IkrError(f"unsupported {what} file type {_suffix(path)!r}; use one of {', '.join(allowed)}", path)


def write_field(field: Field, path: str | os.PathLike) -> Path:
    """Write the field as a float32 3-component vector image (.nii.gz, .nii, .mha, .nrrd), atomically."""
    path = Path(path)
    _check_suffix(path, IMAGE_SUFFIXES, "displacement field")
    vectors = np.asarray(field.displacement_mm, dtype=np.float32)  # no float64 copy on the way
    image = field.geometry.apply_to_sitk(sitk.GetImageFromArray(vectors, isVector=True))
    write_sitk_atomic(image, path)
    return path


def write_transform(field: Field, path: str | os.PathLike) -> Path:
    """Write the field as an ITK DisplacementFieldTransform file (.h5, .tfm, .txt), atomically."""
    path = Path(path)
    _check_suffix(path, TRANSFORM_SUFFIXES, "transform")
    with atomic_path(path) as tmp:
        sitk.WriteTransform(field.to_sitk_transform(), str(tmp))
    return path


def _field_from_vector_image(image: sitk.Image, path: Path) -> Field:
    """Check that a read image is a 3D displacement field and wrap it."""
    if image.GetDimension() != 3:
        raise IkrError(f"expected a 3D displacement field, got a {image.GetDimension()}D image", path)
    n = image.GetNumberOfComponentsPerPixel()
    if n != 3:
        raise IkrError(f"not a displacement field: expected 3 components per voxel, got {n}", path)
    return Field.from_sitk(image)


def _nifti_truncated(path: Path) -> bool:
    """True when a NIfTI-1 file holds fewer voxel bytes than its header declares.

    ITK reads a short (or cut-off gzip) NIfTI file without error and fills the rest with zeros.
    """
    opener = gzip.open if _suffix(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as f:
            header = f.read(348)
            total = len(header)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return True
    for endian in "<>":
        if len(header) == 348 and struct.unpack(f"{endian}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{endian}8h", header[40:56])
            bitpix = struct.unpack(f"{endian}h", header[72:74])[0]
            offset = int(struct.unpack(f"{endian}f", header[108:112])[0])
            voxels = math.prod(max(int(d), 1) for d in dims[1 : dims[0] + 1])
            return total < offset + voxels * bitpix // 8
    return False  # NIfTI-2 or not NIfTI: leave the judgement to ITK


def _read_vector_image(path: Path) -> Field:
    """Read a displacement field stored as a vector image."""
    unreadable = "cannot be read as an image (corrupt, truncated or not a supported format)"
    if _suffix(path) in (".nii", ".nii.gz") and _nifti_truncated(path):
        raise IkrError(unreadable, path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise IkrError(unreadable, path) from exc
    return _field_from_vector_image(image, path)


def _displacement_part(transform: sitk.Transform) -> sitk.DisplacementFieldTransform | None:
    """The DisplacementFieldTransform a read transform is (or wraps alone), else None."""
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0).Downcast()
    return transform if isinstance(transform, sitk.DisplacementFieldTransform) else None


def _read_transform_file(path: Path, reference_geometry: Geometry | None) -> Field:
    """Read an ITK transform file; evaluate non-displacement transforms on `reference_geometry`."""
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise IkrError("cannot be read as an ITK transform file (corrupt or not a transform)", path) from exc
    displacement = _displacement_part(transform)
    if displacement is not None:
        return _field_from_vector_image(displacement.GetDisplacementField(), path)
    if reference_geometry is None:
        raise IkrError(
            f"holds an ITK {transform.GetName()}, not a displacement field: a reference grid is needed to evaluate it",
            path,
        )
    return field_from_transform(transform, reference_geometry)


def read_field(path: str | os.PathLike, reference_geometry: Geometry | None = None) -> Field:
    """Read a displacement field from a vector image or any ITK transform file.

    A displacement field is returned on its own grid; any other transform (affine, B-spline,
    composite, ...) is evaluated on `reference_geometry`, which must then be given.
    """
    path = Path(path)
    if not path.is_file():
        raise IkrError("file not found", path)
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES or suffix == ".mhd":
        return _read_vector_image(path)
    if suffix in TRANSFORM_SUFFIXES or suffix == ".mat":
        return _read_transform_file(path, reference_geometry)
    raise IkrError(
        f"unsupported file type {suffix!r}; expected a vector image ({', '.join(IMAGE_SUFFIXES)}) "
        f"or an ITK transform ({', '.join(TRANSFORM_SUFFIXES)})",
        path,
    )
