"""Synthetic registration cases: a CT, a deformed copy of it, and the exact field between them.

`make_case(ct, family, seed)` draws a smooth deformation of the requested family, adds a small
rigid offset, builds the moving image, and picks landmark pairs on distinctive anatomy. The true
field `d` (fixed -> moving, ITK convention: anatomy at fixed point p sits at p + d(p) in the moving
image) is built first; its numerical inverse `u` (fields.invert) gives the moving image
M(y) = F(y + u(y)), so `warp_image(moving, true_field)` reproduces the fixed image.

Families (LPS: +z is superior; `magnitude_mm` overrides the seeded magnitude):

- breathing: cranio-caudal dominant motion (anatomy moves inferiorly, as from exhale to inhale),
  largest at the lung bases / diaphragm and fading towards the apex (Gaussian profile in z with
  sigma 90-130 mm above the base, 70-110 mm below it) and outside the body; mild anterior-posterior
  expansion (10-25 % of the amplitude) and lateral expansion (3-10 %), plus a 10 % smooth random
  perturbation. Mean displacement within the lungs 5-12 mm (seeded; `magnitude_mm` sets it, 4-15
  mm is the realistic range), maxima about 1.5-2.5 times the mean (about 30 mm at 15 mm). Without
  lungs in view the body is used and the diaphragm is taken to lie at the top of the volume.
- bspline: a cubic B-spline with random Gaussian coefficients, control spacing 35-50 mm; mean
  magnitude within the body 3-8 mm.
- local: a ball of radius 15-30 mm around a soft-tissue point (the liver when the label map names
  one) shrinks (3 cases in 4) or grows by 10-40 % of its volume: uniform scaling inside, volume-
  preserving radial displacement outside fading to zero between 2 and 4 radii; displacement at
  the ball's surface 0.5-5 mm (`magnitude_mm` sets it), plus a smooth background of mean 0.5-1.5 mm.
- sliding: the lungs and everything below them in the same cranio-caudal columns (the diaphragm,
  the upper abdomen) move along z with the breathing profile, while the chest wall and the
  mediastinum outside those columns stay still: a tangential discontinuity smoothed over about
  4 mm plus the working grid's spacing (the motion tapers over about 25 mm at the columns' tops,
  so that the field stays invertible). Mean displacement within the lungs 5-12 mm. The lungs come
  from the label map (labels whose name in `labels.meta["label_names"]` contains "lung") or from a
  threshold (< -400 HU inside the body, the largest components); without lungs the region inside
  the body deeper than 20 mm slides against the body wall.

Every case also gets (unless switched off): a rigid offset about the image centre (rotation 0.5-2
degrees about a random axis, translation 0.5-3 mm) composed after the deformation into the true
field; an intensity change in the moving image only (a smooth multiplicative change of
(HU + 1000) within +-3 % and a smooth offset within +-10 HU in tissue; for `local`, the moved ball
also turns 30-60 HU hypodense, like an ablation zone); and fresh correlated Gaussian noise
(`noise_hu` standard deviation) in each image.

The fields are drawn and inverted (fields.invert) on a working grid of about 5 mm spacing (every
k-th CT voxel) and interpolated trilinearly onto the CT's grid; that interpolated true field is the
truth. Its inverse is refined there by two fixed-point steps, and the moving image is sampled from
the CT by cubic B-spline interpolation (labels by nearest neighbour). `params` records the inverse's
residuals (mm) and the smallest Jacobian; a deformation whose Jacobian would fall below 0.25 is
redrawn (bspline) or scaled down (`shrink_factor`). Landmarks are 3D Harris corners of the CT
(structure tensor on a grid of about 2.5 mm, HU clipped to [-1000, 300]) inside the body, local
maxima at least 10 mm apart, strongest first with seeded tie-breaking, whose fixed and moving
points both lie well inside the image.

`write_case` writes fixed.nii.gz, moving.nii.gz, true_displacement.nii.gz (3-component float32
vectors, LPS mm), landmarks_fixed.csv / landmarks_moving.csv (header x,y,z; LPS mm), the label
maps when present and case.json (family, seed, params), all at once via a temporary directory.

This module makes, writes and reads a case; the parts live beside it: `grids` (coarse grids,
resampling, body and lung masks), `families` (the four deformation families), `warping` (rigid
motion, cubic warp, intensity change, noise), `landmarks` (the landmark pairs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..core.errors import IkrError
from ..core.fields import (
    Field,
    invert,
    jacobian_determinant,
    sample_field,
    transform_points,
)
from ..core.geometry import Image
from ..io.atomic import atomic_directory
from .families import BUILDERS, FAMILIES, FamilyContext, ensure_invertible
from .grids import coarse_body_mask, coarse_geometry, downsample, lung_mask, named_labels, sample_on_fine, upsample
from .landmarks import landmark_pairs
from .warping import (
    AIR_HU,
    apply_rigid,
    change_intensity,
    ct_noise,
    polish_inverse,
    random_rigid,
    to_ct_dtype,
    warp_cubic,
)

WORKING_SPACING_MM = 5.0
POLISH_ITERATIONS = 2


@dataclass
class SynthCase:
    """A synthetic registration case with its exact fixed -> moving field and landmark pairs."""

    fixed: Image
    moving: Image
    true_field: Field
    landmarks_fixed_lps: np.ndarray
    landmarks_moving_lps: np.ndarray
    fixed_labels: Image | None
    moving_labels: Image | None
    family: str
    seed: int
    params: dict


def _array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (identifies the source CT without naming it)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _check_inputs(ct: Image, family: str, labels: Image | None, n_landmarks: int, noise_hu: float) -> None:
    """Raise IkrError for an unknown family, a label map off the CT's grid or bad counts."""
    if family not in FAMILIES:
        raise IkrError(f"unknown deformation family {family!r}; choose one of {', '.join(FAMILIES)}")
    if labels is not None and labels.geometry.shape_zyx != ct.geometry.shape_zyx:
        raise IkrError(f"the label map's grid {labels.geometry.size} differs from the CT's {ct.geometry.size}")
    if n_landmarks < 0 or noise_hu < 0:
        raise IkrError("n_landmarks and noise_hu must not be negative")
    from ..registration.preprocess import check_looks_like_ct

    check_looks_like_ct(ct, str(ct.meta.get("path") or "the CT"))


MAX_MAGNITUDE_MM = 50.0  # larger mean displacements are not breathing, positioning or organ motion


def check_magnitude(magnitude_mm: float | None) -> None:
    """Refuse a mean displacement that is not a finite number in (0, MAX_MAGNITUDE_MM] mm."""
    if magnitude_mm is None:
        return
    if not np.isfinite(magnitude_mm) or not 0 < magnitude_mm <= MAX_MAGNITUDE_MM:
        raise IkrError(f"--magnitude {magnitude_mm} mm: the mean displacement must lie in (0, {MAX_MAGNITUDE_MM:g}] mm")


def _inverse_check(true_field: Field, inverse: Field, rng: np.random.Generator) -> dict:
    """Residual |u(y) + d(y + u(y))| (mm) at up to 20 000 random voxels whose preimage is in the grid."""
    geo = true_field.geometry
    count = min(20_000, int(np.prod(geo.size)))
    flat = rng.choice(int(np.prod(geo.size)), size=count, replace=False)
    zyx = np.stack(np.unravel_index(flat, geo.shape_zyx), axis=-1)
    pts = geo.index_to_lps(zyx[:, ::-1].astype(float))
    pre = pts + sample_field(inverse, pts)
    inside = geo.contains_lps(pre, margin_voxels=0.0)
    err = np.linalg.norm(pre - pts + sample_field(true_field, pre), axis=-1)[inside]
    if err.size == 0:
        return {"inverse_residual_max_mm": 0.0, "inverse_residual_mean_mm": 0.0}
    return {"inverse_residual_max_mm": float(err.max()), "inverse_residual_mean_mm": float(err.mean())}


def make_case(
    ct: Image,
    family: str,
    seed: int,
    labels: Image | None = None,
    magnitude_mm: float | None = None,
    n_landmarks: int = 100,
    noise_hu: float = 10.0,
    rigid: bool = True,
    intensity_change: bool = True,
) -> SynthCase:
    """A synthetic case from `ct`: deformed moving image, exact fixed -> moving field, landmark pairs."""
    check_magnitude(magnitude_mm)
    _check_inputs(ct, family, labels, n_landmarks, noise_hu)
    rng = np.random.default_rng([int(seed), FAMILIES.index(family)])
    fine = ct.geometry
    coarse, factor = coarse_geometry(fine, WORKING_SPACING_MM)
    hu_c = downsample(ct.array, factor, coarse)
    body_c = coarse_body_mask(hu_c, coarse)
    labels_c = None if labels is None else downsample(labels.array, factor, coarse, smooth=False)
    lungs_c = lung_mask(hu_c, body_c, labels_c, named_labels(labels, "lung"))
    liver_values = named_labels(labels, "liver")
    liver_c = np.isin(labels_c, liver_values) if labels_c is not None and liver_values else None
    pts_c = coarse.grid_points_lps()
    ctx = FamilyContext(coarse, pts_c, hu_c, body_c, lungs_c, liver_c, rng)

    deformation, family_params = BUILDERS[family](ctx, magnitude_mm)
    deformation, family_params["shrink_factor"] = ensure_invertible(deformation, coarse)
    rigid_params = random_rigid(fine, rng) if rigid else None
    total = apply_rigid(deformation, pts_c, rigid_params) if rigid_params else deformation
    inverse_c, residual_c = invert(Field(total, coarse), iterations=100)
    both = upsample(np.concatenate([total, inverse_c.displacement_mm], axis=-1), factor, fine)
    true_field, inverse = Field(np.ascontiguousarray(both[..., :3]), fine), np.ascontiguousarray(both[..., 3:])
    del both
    inverse = polish_inverse(true_field, inverse, POLISH_ITERATIONS)

    clean = ct.array.astype(np.float32)
    outside = float(min(clean.min(), AIR_HU))
    moving_clean = warp_cubic(clean, fine, inverse, outside)
    moving_labels = None
    if labels is not None:
        warped = sample_on_fine(labels.array, 1, fine, inverse, mode="nearest", outside=0.0)[..., 0]
        moving_labels = labels.with_array(np.rint(warped).astype(labels.array.dtype))
    intensity_params = None
    if intensity_change:
        ablation = None
        if family == "local":
            moved_centre = transform_points(true_field, np.asarray(family_params["centre_lps"])[None])[0]
            ablation = {"centre_lps": [float(v) for v in moved_centre]}
            ablation["radius_mm"] = 0.9 * family_params["scale"] * family_params["radius_mm"]
        moving_clean, intensity_params = change_intensity(moving_clean, fine, coarse, factor, rng, ablation)
    lm_fixed, lm_moving = landmark_pairs(ct, true_field, n_landmarks, rng)

    fixed_arr = to_ct_dtype(clean + ct_noise(clean.shape, noise_hu, rng), ct.array.dtype)
    moving_arr = to_ct_dtype(moving_clean + ct_noise(clean.shape, noise_hu, rng), ct.array.dtype)
    jac = jacobian_determinant(Field(total, coarse))
    deform_norm = np.linalg.norm(deformation, axis=-1)
    params = {
        "family": family,
        "seed": int(seed),
        "magnitude_mm": None if magnitude_mm is None else float(magnitude_mm),
        "n_landmarks": int(n_landmarks),
        "noise_hu": float(noise_hu),
        "rigid": bool(rigid),
        "intensity_change": bool(intensity_change),
        "family_params": _jsonable(family_params),
        "rigid_params": rigid_params,
        "intensity_params": _jsonable(intensity_params),
        "working_spacing_mm": [float(v) for v in coarse.spacing_mm],
        "inverse_residual_working_mm": float(residual_c),
        **_inverse_check(true_field, Field(inverse, fine), rng),
        "min_jacobian_working": float(jac.min()),
        "max_deformation_mm": float(deform_norm.max()),
        "landmarks_found": int(len(lm_fixed)),
        "ct_size": [int(v) for v in fine.size],
        "ct_spacing_mm": [float(v) for v in fine.spacing_mm],
        "ct_sha256": _array_digest(ct.array),
        "labels_sha256": None if labels is None else _array_digest(labels.array),
    }
    meta = {"source": "ikr synth", "family": family, "seed": int(seed)}
    return SynthCase(
        fixed=Image(fixed_arr, fine, {**meta, "role": "fixed"}),
        moving=Image(moving_arr, fine, {**meta, "role": "moving"}),
        true_field=true_field,
        landmarks_fixed_lps=lm_fixed,
        landmarks_moving_lps=lm_moving,
        fixed_labels=labels,
        moving_labels=moving_labels,
        family=family,
        seed=int(seed),
        params=params,
    )


def _jsonable(value: object) -> object:
    """Plain-Python copy of nested dicts/lists of numpy scalars (for json)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


_FILES = {
    "fixed": "fixed.nii.gz",
    "moving": "moving.nii.gz",
    "field": "true_displacement.nii.gz",
    "lm_fixed": "landmarks_fixed.csv",
    "lm_moving": "landmarks_moving.csv",
    "fixed_labels": "fixed_labels.nii.gz",
    "moving_labels": "moving_labels.nii.gz",
    "params": "case.json",
}


def _write_points(path: Path, points: np.ndarray) -> None:
    """Write (N, 3) LPS points as CSV with an x,y,z header."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "z"])
        writer.writerows([[repr(float(v)) for v in p] for p in points])


def _read_points(path: Path) -> np.ndarray:
    """Read an x,y,z CSV of LPS points into an (N, 3) array."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip().lower() for c in rows[0]] != ["x", "y", "z"]:
            raise IkrError("expected a CSV with the header x,y,z", path)
        return np.array([[float(v) for v in row] for row in rows[1:] if row], dtype=np.float64).reshape(-1, 3)
    except (OSError, ValueError) as exc:
        raise IkrError(f"cannot read landmarks: {exc}", path) from exc


def write_case(case: SynthCase, outdir: str | os.PathLike) -> None:
    """Write a case atomically: images, true field, landmark CSVs, labels and case.json."""
    with atomic_directory(outdir) as tmp:
        sitk.WriteImage(case.fixed.to_sitk(), str(tmp / _FILES["fixed"]), True)
        sitk.WriteImage(case.moving.to_sitk(), str(tmp / _FILES["moving"]), True)
        vector = sitk.GetImageFromArray(case.true_field.displacement_mm.astype(np.float32), isVector=True)
        sitk.WriteImage(case.true_field.geometry.apply_to_sitk(vector), str(tmp / _FILES["field"]), True)
        _write_points(tmp / _FILES["lm_fixed"], case.landmarks_fixed_lps)
        _write_points(tmp / _FILES["lm_moving"], case.landmarks_moving_lps)
        for key, image in (("fixed_labels", case.fixed_labels), ("moving_labels", case.moving_labels)):
            if image is not None:
                sitk.WriteImage(image.to_sitk(), str(tmp / _FILES[key]), True)
        record = {"family": case.family, "seed": case.seed, "params": _jsonable(case.params)}
        (tmp / _FILES["params"]).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _read_image(path: Path, required: bool = True) -> sitk.Image | None:
    """Read an image file, or None when it is absent and optional."""
    if not path.exists():
        if required:
            raise IkrError("missing file of a synthetic case", path)
        return None
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise IkrError("cannot read image", path) from exc


def read_case(outdir: str | os.PathLike) -> SynthCase:
    """Read a case written by `write_case`."""
    root = Path(outdir)
    params_path = root / _FILES["params"]
    try:
        record = json.loads(params_path.read_text(encoding="utf-8"))
        family, seed, params = record["family"], int(record["seed"]), record["params"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IkrError(f"not a synthetic case description ({exc.__class__.__name__})", params_path) from exc
    field_path = root / _FILES["field"]
    try:
        true_field = Field.from_sitk(_read_image(field_path))
    except IkrError as exc:
        raise IkrError(exc.problem, field_path) from exc
    labels = [_read_image(root / _FILES[k], required=False) for k in ("fixed_labels", "moving_labels")]
    return SynthCase(
        fixed=Image.from_sitk(_read_image(root / _FILES["fixed"])),
        moving=Image.from_sitk(_read_image(root / _FILES["moving"])),
        true_field=true_field,
        landmarks_fixed_lps=_read_points(root / _FILES["lm_fixed"]),
        landmarks_moving_lps=_read_points(root / _FILES["lm_moving"]),
        fixed_labels=None if labels[0] is None else Image.from_sitk(labels[0]),
        moving_labels=None if labels[1] is None else Image.from_sitk(labels[1]),
        family=family,
        seed=seed,
        params=params,
    )


def case_from_files(
    ct_path: str | os.PathLike,
    family: str,
    seed: int,
    labels_path: str | os.PathLike | None = None,
    magnitude_mm: float | None = None,
) -> SynthCase:
    """`ikr synth`: a case made from a CT file (and a label map carried along, on the CT's grid or resampled)."""
    from ..io.images import read_image
    from ..io.segmentations import read_labels

    check_magnitude(magnitude_mm)
    ct = read_image(Path(ct_path))
    ct.meta["path"] = str(ct_path)
    labels = read_labels(Path(labels_path), reference=ct)[0] if labels_path else None
    return make_case(ct, family, seed, labels=labels, magnitude_mm=magnitude_mm)
