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

from ..core.errors import IkrError
from ..core.filters import binary_open, gaussian_smooth_
from ..core.geometry import Geometry, Image

MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 20.0
BODY_THRESHOLD_HU = -500.0
CT_WINDOW_HU = (-1000.0, 1000.0)  # air and lung to bone; see normalise_ct
LUNG_THRESHOLD_HU = -400.0  # lung parenchyma (about -850) and airways lie below; vessels and walls above
LUNG_AIR_HU = -950.0  # below this is air itself: gas pockets are mostly air, lungs mostly not
LUNG_MAX_AIR_FRACTION = 0.3  # a candidate with more of its voxels below LUNG_AIR_HU is gas (bowel, stomach)
LUNG_MIN_COMPONENT_ML = 30.0  # smaller air-like pieces are ignored
LUNG_MIN_TOTAL_ML = 300.0  # lungs "present": a thorax holds litres; an abdomen's lung bases (~120 ml) do not count
LUNG_CLOSING_MM = 4.0
MOVING_VIEW_MARGIN_MM = 6.0  # keypoints keep this far inside the moving image's (aligned) field of view
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
    # GetArrayFromImage returns a copy of its own: smoothed in place (one new volume, not one per axis)
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32, copy=False))[None, None]
    smoothed = gaussian_smooth_(array, tuple(sigmas_vox_xyz[::-1]))[0, 0].numpy()
    out = sitk.GetImageFromArray(smoothed)
    out.CopyInformation(image)
    return out


def resample_to(
    image: Image,
    geometry: Geometry,
    default_value: float = -1024.0,
    interpolation: str = "linear",
    transform: sitk.Transform | None = None,
) -> Image:
    """Resample `image` onto `geometry` through `transform` (grid point -> image point; identity by
    default); linear output is float32, antialiased."""
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
        transform if transform is not None else sitk.Transform(),
        _INTERPOLATORS[interpolation],
        float(default_value),
        pixel_type,
    )
    return Image(sitk.GetArrayFromImage(out), geometry, dict(image.meta))


def block_factors(geometry: Geometry, spacing_mm: float, min_size: int = 1) -> list[int]:
    """Whole-voxel block sizes (x, y, z) that bring a grid's spacing to about `spacing_mm`, leaving at least
    `min_size` voxels along each axis."""
    sizes_spacings = zip(geometry.size, geometry.spacing_mm, strict=True)
    return [max(1, min(n // max(1, min_size), round(spacing_mm / s))) for n, s in sizes_spacings]


def block_average(image: Image, spacing_mm: float, min_size: int = 1) -> Image:
    """The image averaged over blocks of whole voxels (SimpleITK's BinShrink) to about `spacing_mm` per axis:
    a fast, alias-free coarse copy on a grid of its own (float32)."""
    factors = block_factors(image.geometry, spacing_mm, min_size)
    src = sitk.Cast(image.to_sitk(), sitk.sitkFloat32)
    return Image.from_sitk(sitk.BinShrink(src, factors) if max(factors) > 1 else src, dict(image.meta))


def normalise_ct(array: np.ndarray, window_hu: tuple[float, float] = CT_WINDOW_HU) -> np.ndarray:
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


def lung_mask(image: Image, body: np.ndarray | None = None) -> np.ndarray:
    """Lung mask (z, y, x) bool of a CT in HU, empty when no lungs are in view.

    Air-like voxels (< -400 HU) inside the body mask, connected components of at least 30 ml that are
    not mostly air itself (gas in bowel and stomach is; parenchyma is not), closed by 4 mm and filled
    slice by slice (vessels, nodules); kept only when they add up to 300 ml or more.
    """
    body = body_mask(image) if body is None else body
    air = (np.asarray(image.array) < LUNG_THRESHOLD_HU) & body
    if not air.any():
        return np.zeros(air.shape, dtype=bool)
    voxel_ml = float(np.prod(image.geometry.spacing_mm)) / 1000.0
    labels_img = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(air.astype(np.uint8))),
        minimumObjectSize=max(1, int(LUNG_MIN_COMPONENT_ML / voxel_ml)),
    )
    labels = sitk.GetArrayFromImage(labels_img)
    n = int(labels.max())
    if n == 0:
        return np.zeros(air.shape, dtype=bool)
    flat = labels.ravel()
    size = np.bincount(flat, minlength=n + 1)
    pure = np.bincount(flat, weights=(np.asarray(image.array) < LUNG_AIR_HU).ravel(), minlength=n + 1)
    lung_like = [i for i in range(1, n + 1) if pure[i] <= LUNG_MAX_AIR_FRACTION * size[i]]
    if sum(size[i] for i in lung_like) * voxel_ml < LUNG_MIN_TOTAL_ML:
        return np.zeros(air.shape, dtype=bool)
    lungs = sitk.GetImageFromArray(np.isin(labels, lung_like).astype(np.uint8))
    radius = [max(1, round(LUNG_CLOSING_MM / s)) for s in image.geometry.spacing_mm]
    closed = sitk.BinaryMorphologicalClosing(lungs, radius)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    filled = ndimage.binary_fill_holes(sitk.GetArrayFromImage(closed).astype(bool), structure=in_plane)
    return filled & body


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
    lungs: np.ndarray | None = None  # the fixed image's automatic lung mask (z, y, x), when asked for


def _working_mask(
    hu: Image,
    mask: Image | None,
    geometry: Geometry,
    device: torch.device | str,
    name: str,
    transform: sitk.Transform | None = None,
) -> torch.Tensor:
    """A bool mask tensor on the working grid: the given mask resampled (through `transform`), or the body
    mask of `hu`."""
    if mask is None:
        arr = body_mask(hu)
        problem = "the automatic body mask is empty (no voxel above -500 HU on the working grid)"
    else:
        arr = resample_to(mask, geometry, 0.0, "nearest", transform).array > 0
        name = _name(mask, name + " mask")
        problem = "the mask is empty on the working grid (no foreground voxel inside the fixed image's extent)"
    if not np.any(arr):
        raise IkrError(problem, name)
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)[None, None]


_BROADCAST = ((1, 1, -1), (1, -1, 1), (-1, 1, 1))  # x, y, z in a (z, y, x) array


def moving_view(working: Geometry, moving: Geometry, transform: sitk.Transform | None, margin_mm: float) -> np.ndarray:
    """Bool (z, y, x) on the working grid: where the moving image (seen through `transform`) has data,
    at least `margin_mm` inside its edge (a cut field of view gives no matches beyond it). Near the
    working grid's own edge the margin is waived: two images on one grid keep every key."""
    probe = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    points = working.index_to_lps(probe)
    if transform is not None:
        points = np.array([transform.TransformPoint(p.tolist()) for p in points])
    moving_index = moving.lps_to_index(points)
    offset, steps = moving_index[0], moving_index[1:] - moving_index[0]  # moving index = offset + i @ steps
    margin = margin_mm / np.asarray(moving.spacing_mm)
    lo, hi = margin - 0.5, np.asarray(moving.size) - 0.5 - margin
    edge = margin_mm / np.asarray(working.spacing_mm)
    size = np.asarray(moving.size)
    # each axis's index (x, y, z) broadcast to its place in a (z, y, x) array
    axes = [np.arange(n, dtype=np.float64).reshape(shape) for n, shape in zip(working.size, _BROADCAST, strict=True)]
    has_data, well_inside = np.ones(working.shape_zyx, dtype=bool), np.ones(working.shape_zyx, dtype=bool)
    for k in range(3):  # moving axis k: its index is affine in the working index
        index = offset[k] + axes[0] * steps[0, k] + axes[1] * steps[1, k] + axes[2] * steps[2, k]
        has_data &= (index >= -0.5) & (index <= size[k] - 0.5)
        well_inside &= (index >= lo[k]) & (index <= hi[k])
    near_edge = np.zeros(working.shape_zyx, dtype=bool)
    for a, n, e in zip(axes, working.size, edge, strict=True):
        near_edge |= np.minimum(a, n - 1 - a) < e
    return has_data & (well_inside | near_edge)


def make_working_pair(
    fixed: Image,
    moving: Image,
    spacing_mm: float,
    device: torch.device | str = "cpu",
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    alignment: sitk.Transform | None = None,
    lungs: bool = False,
) -> WorkingPair:
    """Check the pair, resample both onto the working grid, normalise HU, build masks (body mask by default).

    `lungs`: also build the fixed image's automatic lung mask (empty when no lungs are in view).

    `alignment` (fixed -> moving, e.g. the automatic rigid/affine start) is applied to the moving
    image (and its mask) as it is resampled; without it the two must overlap physically.
    """
    check_voxel_spacing(fixed, _name(fixed, "fixed image"))
    geometry = working_geometry(fixed.geometry, spacing_mm)
    check_voxel_spacing(moving, _name(moving, "moving image"))
    check_looks_like_ct(fixed, _name(fixed, "fixed image"))
    check_looks_like_ct(moving, _name(moving, "moving image"))
    if alignment is None:
        check_overlap(fixed, moving)
    fixed_hu = resample_to(fixed, geometry)
    moving_hu = resample_to(moving, geometry, transform=alignment)
    keys_mask = _working_mask(fixed_hu, fixed_mask, geometry, device, _name(fixed, "fixed image"))
    view = moving_view(geometry, moving.geometry, alignment, MOVING_VIEW_MARGIN_MM)
    if not view.all():
        keys_mask = keys_mask & torch.from_numpy(view).to(device)[None, None]
        if not bool(keys_mask.any()):
            raise IkrError("the moving image does not cover the fixed image's body", _name(moving, "moving image"))
    return WorkingPair(
        geometry=geometry,
        fixed=to_tensor(normalise_ct(fixed_hu.array), device),
        moving=to_tensor(normalise_ct(moving_hu.array), device),
        fixed_mask=keys_mask,
        moving_mask=None
        if moving_mask is None
        else _working_mask(moving_hu, moving_mask, geometry, device, _name(moving, "moving image"), alignment),
        lungs=lung_mask(fixed_hu) if lungs else None,
    )
