"""Did the registration work? A verdict (ok, doubtful, failed) with the measurements behind it.

A registration can fail without any error: the images show different anatomy, the start was too far
off, a field of view misses the region. The measurements are made where the truth is not needed:

- similarity of the fixed image and the warped moving image inside the fixed body (Pearson
  correlation of the HU-clipped intensities on a coarse grid), before and after;
- overlap (Dice) of the fixed body and the warped moving body, where the moving image has data,
  and how much of the fixed body the moving image covers at all;
- the keys: the fraction that passed the forward/backward check, and the fraction that moved with
  their neighbours (a wrong match, or a wrong solution, moves unlike the keys around it).

The thresholds (QUALITY_THRESHOLDS) come from good and failed registrations of the shared CTs: good
ones (breathing-like thorax; abdomen and thorax repositioned by up to 21 deg / 60 mm, fields of view
cut to 60 %) gave ncc_after 0.935-0.994, body_dice >= 0.986, coherent keys >= 0.998; failed ones
(an abdomen CT against a thorax CT; a 12 deg / 40 mm repositioning without alignment, 16 mm error)
gave ncc_after -0.24 and 0.77, coherent keys 0.50 and 0.77. On bench's independent and clinical cases
(session 3) the 12 good registrations (TRE 0.33-1.84 mm, contrast changes and ablation zones
included) gave ncc_after 0.883-0.996 and coherent keys >= 0.996; the same repositioned cases
registered without alignment (TRE 11, 14 and 38 mm) gave ncc_after 0.80, 0.46, 0.34 and coherent
keys 0.81, 0.75, 0.51. Two doubtful measurements at once make a failure.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

from ..core.correspondences import AUTOMATIC, Correspondences
from ..core.fields import Field, warp_image
from ..core.geometry import Image
from ..registration.alignment import Alignment
from ..registration.preprocess import CT_WINDOW_HU, block_average, block_factors, body_mask, resample_to

QUALITY_SPACING_MM = 4.0
COHERENCE_NEIGHBOURS = 8
COHERENCE_TOLERANCE_MM = 5.0

# measurement: (doubtful below, failed below)
QUALITY_THRESHOLDS: dict[str, tuple[float, float]] = {
    "ncc_after": (0.88, 0.80),
    "body_dice": (0.93, 0.85),
    "moving_coverage": (0.40, 0.20),
    "keys_coherent_fraction": (0.90, 0.80),
}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long vectors (0 when either is constant or empty)."""
    if a.size < 2:
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _block_average_field(field: Field, factors: list[int]) -> Field:
    """The field averaged over the blocks that `block_average` uses (SimpleITK's BinShrink, every component), on
    the same coarse grid."""
    vectors = np.asarray(field.displacement_mm, dtype=np.float32)
    image = field.geometry.apply_to_sitk(sitk.GetImageFromArray(vectors, isVector=True))
    return Field.from_sitk(sitk.BinShrink(image, factors))


def coherent_fraction(correspondences: Correspondences, alignment: Alignment | None = None) -> float:
    """The fraction of automatic keys whose displacement (after the alignment) lies within tolerance of
    their neighbours' median."""
    keys = correspondences.subset((correspondences.source == AUTOMATIC) & (correspondences.confidence > 0))
    if len(keys) <= COHERENCE_NEIGHBOURS:
        return 0.0
    moving = keys.moving_lps if alignment is None else alignment.inverse_apply(keys.moving_lps)
    displacement = moving - keys.fixed_lps
    _, neighbours = cKDTree(keys.fixed_lps).query(keys.fixed_lps, k=COHERENCE_NEIGHBOURS + 1)
    median = np.median(displacement[neighbours[:, 1:]], axis=1)
    deviation = np.linalg.norm(displacement - median, axis=1)
    return float(np.mean(deviation <= COHERENCE_TOLERANCE_MM))


def assess(
    fixed: Image,
    moving: Image,
    field: Field,
    correspondences: Correspondences,
    alignment: Alignment | None = None,
    n_consistent: int | None = None,
) -> dict:
    """The quality measurements of a registration and its verdict (see the module's docstring)."""
    fixed_c = block_average(fixed, QUALITY_SPACING_MM)
    moving_c = block_average(moving, QUALITY_SPACING_MM)
    grid = fixed_c.geometry
    body = body_mask(fixed_c)
    outside = -5000.0  # marks voxels where the moving image has no data
    warped = warp_image(
        moving_c,
        _block_average_field(field, block_factors(fixed.geometry, QUALITY_SPACING_MM)),
        default_value=outside,
    )
    before = resample_to(moving_c, grid, default_value=outside)
    seen_after = warped.array > outside / 2
    seen_before = before.array > outside / 2
    f = np.clip(fixed_c.array, *CT_WINDOW_HU)
    where_after, where_before = body & seen_after, body & seen_before
    warped_body = body_mask(warped.with_array(np.where(seen_after, warped.array, -1024.0)))
    overlap = seen_after & (body | warped_body)
    dice_denominator = float(body[overlap].sum() + warped_body[overlap].sum())
    measurements = {
        "ncc_before": round(_pearson(f[where_before], np.clip(before.array[where_before], *CT_WINDOW_HU)), 4),
        "ncc_after": round(_pearson(f[where_after], np.clip(warped.array[where_after], *CT_WINDOW_HU)), 4),
        "body_dice": round(2.0 * float((body & warped_body & overlap).sum()) / max(dice_denominator, 1.0), 4),
        "moving_coverage": round(float(where_after.sum()) / max(float(body.sum()), 1.0), 4),
        "keys_coherent_fraction": round(coherent_fraction(correspondences, alignment), 4),
    }
    n_auto = int(np.sum(correspondences.source == AUTOMATIC))
    if n_consistent is not None and n_auto:
        measurements["keys_consistent_fraction"] = round(n_consistent / n_auto, 4)
    return {**verdict(measurements), "measurements": measurements}


def verdict(measurements: dict) -> dict:
    """ok / doubtful / failed from the measurements, with the reasons (one line each) for anything but ok."""
    reasons_failed, reasons_doubtful = [], []
    for name, (doubtful_below, failed_below) in QUALITY_THRESHOLDS.items():
        value = measurements.get(name)
        if value is None:
            continue
        if value < failed_below:
            reasons_failed.append(f"{name} {value:.2f} < {failed_below:.2f}")
        elif value < doubtful_below:
            reasons_doubtful.append(f"{name} {value:.2f} < {doubtful_below:.2f}")
    if reasons_failed or len(reasons_doubtful) >= 2:  # two doubtful signs at once: a failure
        return {"verdict": "failed", "reasons": reasons_failed + reasons_doubtful}
    if reasons_doubtful:
        return {"verdict": "doubtful", "reasons": reasons_doubtful}
    return {"verdict": "ok", "reasons": []}
