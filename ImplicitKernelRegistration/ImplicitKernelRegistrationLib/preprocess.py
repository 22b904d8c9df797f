"""Preprocessing for the engine: the isotropic working grid, HU windowing, body masks, tensors.

The engine works on one "working grid": the fixed image's origin and direction, an isotropic
spacing, covering the fixed image's physical extent. Fixed and moving images (already in one
physical space) are resampled onto it with an identity transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import IkrError
from .filters import binary_open, gaussian_smooth
from .geometry import Geometry, Image

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
BODY_THRESHOLD_HU = -500.0
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def _name(image: Image, default: str) -> str:
    """The name to put in an error message: the image's source path when known, else `default`."""
    return str(image.meta.get("path") or default)


def working_geometry(fixed: Geometry, spacing_mm: float) -> Geometry:
    """The isotropic working grid: fixed origin and direction, `spacing_mm`, same physical extent."""
    spacing = float(spacing_mm)
    if not (MIN_SPACING_MM <= spacing <= MAX_SPACING_MM) or not math.isfinite(spacing):
        raise IkrError(
            f"working spacing {spacing_mm} mm is outside the sensible range [{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm"
        )
    size = tuple(max(1, math.ceil(n * s / spacing - 1e-6)) for n, s in zip(fixed.size, fixed.spacing_mm, strict=True))
    return Geometry(size=size, spacing_mm=(spacing,) * 3, origin_lps=fixed.origin_lps, direction=fixed.direction)


def _antialias(image: sitk.Image, target_spacing: tuple[float, ...]) -> sitk.Image:
    """Gaussian pre-smoothing along axes that get coarser, so downsampling does not alias.

    sigma = 0.5 * sqrt(target^2 - source^2) mm per axis (the smoothing that takes the source's
    resolution to the target's), as a sampled separable Gaussian in voxels.
    """
    source_spacing = image.GetSpacing()
    sigmas_mm = [0.5 * math.sqrt(max(t * t - s * s, 0.0)) for t, s in zip(target_spacing, source_spacing, strict=True)]
    if max(sigmas_mm) <= 0.0:
        return image
    sigmas_vox_xyz = [m / s for m, s in zip(sigmas_mm, image.GetSpacing(), strict=True)]
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))[None, None]
    smoothed = gaussian_smooth(array, tuple(sigmas_vox_xyz[::-1]))[0, 0].numpy()
    out = sitk.GetImageFromArray(smoothed)
    out.CopyInformation(image)
    return out


def resample_to(
    image: Image, geometry: Geometry, default_value: float = -1024.0, interpolation: str = "linear"
) -> Image:
    """Resample `image` onto `geometry` (identity transform); linear output is float32, antialiased."""
    if interpolation not in _INTERPOLATORS:
        raise IkrError(f"unknown interpolation {interpolation!r}; choose one of {sorted(_INTERPOLATORS)}")
    src = image.to_sitk()
    pixel_type = sitk.sitkUnknown
    if interpolation != "nearest":
        src = _antialias(src, geometry.spacing_mm)
        pixel_type = sitk.sitkFloat32
    out = sitk.Resample(
        src,
        geometry.reference_image(),
        sitk.Transform(),
        _INTERPOLATORS[interpolation],
        float(default_value),
        pixel_type,
    )
    return Image(sitk.GetArrayFromImage(out), geometry, dict(image.meta))


def normalise_ct(array: np.ndarray, window_hu: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Clip HU to `window_hu` and scale to [0, 1] float32.

    The default window [-1000, 1000] HU keeps air and lung parenchyma (-1000 to -500 HU, the
    contrast that lung registration lives on), fat, soft tissue, contrast and most bone, while
    clipping metal and streak artefacts (> 1000 HU) and padding below air (-1024, -3024) so that
    they do not dominate gradients (keypoints) or patch distances (MIND-SSC).
    """
    lo, hi = float(window_hu[0]), float(window_hu[1])
    if not hi > lo:
        raise IkrError(f"HU window {window_hu} is empty: the upper bound must exceed the lower")
    out = (np.clip(np.asarray(array, dtype=np.float32), lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32, copy=False)


def body_mask(image: Image) -> np.ndarray:
    """Body mask (z, y, x) bool of a CT in HU: > -500 HU, largest component, holes (lungs) filled."""
    above = torch.from_numpy(np.asarray(image.array) > BODY_THRESHOLD_HU)[None, None]
    opened = binary_open(above, 1)[0, 0].numpy()  # detach the table and thin lines
    if not opened.any():
        return np.zeros(image.array.shape, dtype=bool)
    fg = sitk.GetImageFromArray(opened.astype(np.uint8))
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    largest = sitk.GetArrayFromImage(labels) == 1
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(largest, structure=in_plane)  # slice-wise: lungs, bowel gas
    filled_img = sitk.BinaryFillhole(sitk.GetImageFromArray(filled.astype(np.uint8)), fullyConnected=False)
    return sitk.GetArrayFromImage(filled_img).astype(bool)


def to_tensor(array: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (z, y, x) array as a float32 tensor of shape (1, 1, D, H, W) on `device`."""
    arr = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if arr.ndim != 3:
        raise IkrError(f"expected a 3D array, got {arr.ndim} dimensions")
    return torch.from_numpy(arr).to(device)[None, None]


def check_looks_like_ct(image: Image, name: str) -> None:
    """Raise IkrError, naming the failed check, when the intensities are plainly not CT Hounsfield units."""
    values = np.asarray(image.array)
    sample = values.reshape(-1)[:: max(1, values.size // 2_000_000)].astype(np.float32)
    if not np.all(np.isfinite(sample)):
        raise IkrError("not a CT in Hounsfield units: it contains NaN or infinite values", name)
    p_lo, p_hi = np.percentile(sample, [0.5, 99.5])
    if p_hi - p_lo < 200.0:
        raise IkrError(
            f"not a CT in Hounsfield units (value range check): 99% of voxels lie within "
            f"[{p_lo:.4g}, {p_hi:.4g}], a span under 200, while CT spans air (-1000) to tissue (0 and above)",
            name,
        )
    if p_lo < -3100.0 or p_hi > 5000.0:
        raise IkrError(
            f"not a CT in Hounsfield units (value range check): 99% of voxels lie within "
            f"[{p_lo:.4g}, {p_hi:.4g}], outside the HU range [-3100, 5000]",
            name,
        )
    dark = float(np.mean(sample < -200.0))
    tissue = float(np.mean((sample >= -200.0) & (sample <= 300.0)))
    if dark < 0.001 or tissue < 0.01:
        raise IkrError(
            f"not a CT in Hounsfield units (histogram check): {100 * dark:.2f}% of voxels are air or "
            f"lung (< -200 HU) and {100 * tissue:.2f}% soft tissue (-200..300 HU); a body CT has both",
            name,
        )


CT_SPACING_MM = (0.05, 30.0)  # voxel spacings outside this range are a broken header, not a CT


def check_voxel_spacing(image: Image, name: str) -> None:
    """Raise IkrError when an image's voxel spacing is outside what a CT has (a broken or mis-scaled header)."""
    spacing = np.asarray(image.geometry.spacing_mm, dtype=np.float64)
    lo, hi = CT_SPACING_MM
    if np.any(~np.isfinite(spacing)) or np.any(spacing < lo) or np.any(spacing > hi):
        shown = ", ".join(f"{v:g}" for v in spacing)
        raise IkrError(
            f"voxel spacing ({shown}) mm is outside what a CT has ({lo:g} to {hi:g} mm): check the header", name
        )


def check_overlap(fixed: Image, moving: Image) -> None:
    """Raise IkrError when the two images' physical bounding boxes (LPS) do not overlap."""
    boxes = []
    for img in (fixed, moving):
        g = img.geometry
        half = np.array([[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]])
        s = np.asarray(g.size) - 1
        idx = np.array([[i, j, k] for i in (0, s[0]) for j in (0, s[1]) for k in (0, s[2])], float)
        corners = np.concatenate([g.index_to_lps(idx + h) for h in half])
        boxes.append((corners.min(axis=0), corners.max(axis=0)))
    lo = np.maximum(boxes[0][0], boxes[1][0])
    hi = np.minimum(boxes[0][1], boxes[1][1])
    if np.any(hi <= lo):
        raise IkrError(
            f"the moving image does not overlap the fixed image physically (moving box LPS "
            f"{np.round(boxes[1][0], 1).tolist()}..{np.round(boxes[1][1], 1).tolist()} mm, fixed box "
            f"{np.round(boxes[0][0], 1).tolist()}..{np.round(boxes[0][1], 1).tolist()} mm)",
            _name(moving, "moving image"),
        )


@dataclass
class WorkingPair:
    """Fixed and moving on the working grid as (1, 1, D, H, W) tensors: HU-normalised images, bool masks.

    The moving mask is only built when one is given (the engine uses the fixed mask alone).
    """

    geometry: Geometry
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor
    moving_mask: torch.Tensor | None


def _working_mask(
    hu: Image, mask: Image | None, geometry: Geometry, device: torch.device | str, name: str
) -> torch.Tensor:
    """A bool mask tensor on the working grid: the given mask resampled, or the body mask of `hu`."""
    if mask is None:
        arr = body_mask(hu)
        problem = "the automatic body mask is empty (no voxel above -500 HU on the working grid)"
    else:
        arr = resample_to(mask, geometry, default_value=0.0, interpolation="nearest").array > 0
        name = _name(mask, name + " mask")
        problem = "the mask is empty on the working grid (no foreground voxel inside the fixed image's extent)"
    if not np.any(arr):
        raise IkrError(problem, name)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)[None, None]


def make_working_pair(
    fixed: Image,
    moving: Image,
    spacing_mm: float,
    device: torch.device | str = "cpu",
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
) -> WorkingPair:
    """Check the pair, resample both onto the working grid, normalise HU, build masks (body mask by default)."""
    check_voxel_spacing(fixed, _name(fixed, "fixed image"))
    geometry = working_geometry(fixed.geometry, spacing_mm)
    check_voxel_spacing(moving, _name(moving, "moving image"))
    check_looks_like_ct(fixed, _name(fixed, "fixed image"))
    check_looks_like_ct(moving, _name(moving, "moving image"))
    check_overlap(fixed, moving)
    fixed_hu = resample_to(fixed, geometry)
    moving_hu = resample_to(moving, geometry)
    return WorkingPair(
        geometry=geometry,
        fixed=to_tensor(normalise_ct(fixed_hu.array), device),
        moving=to_tensor(normalise_ct(moving_hu.array), device),
        fixed_mask=_working_mask(fixed_hu, fixed_mask, geometry, device, _name(fixed, "fixed image")),
        moving_mask=None
        if moving_mask is None
        else _working_mask(moving_hu, moving_mask, geometry, device, _name(moving, "moving image")),
    )
