"""Scoring a written field: the convention check on the translation case, and the case metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cases import TRANSLATION_MM
from scipy import ndimage

from ImplicitKernelRegistrationLib.core.fields import transform_points
from ImplicitKernelRegistrationLib.core.metrics import endpoint_error, sdlogj, tre
from ImplicitKernelRegistrationLib.io.images import read_image
from ImplicitKernelRegistrationLib.io.transforms import read_field
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.synthetic.synth import SynthCase

CONVENTION_TOLERANCE_MM = 1.0
CHECK_POINTS = 500


def _interior_points(fixed_path: Path, margin_vox: int = 3) -> np.ndarray:
    """Up to CHECK_POINTS seeded LPS points inside the body, `margin_vox` voxels away from every edge."""
    fixed = read_image(fixed_path)
    mask = ndimage.binary_erosion(body_mask(fixed), iterations=margin_vox, border_value=0)
    index_zyx = np.argwhere(mask)
    chosen = np.random.default_rng(0).choice(len(index_zyx), min(CHECK_POINTS, len(index_zyx)), replace=False)
    return fixed.geometry.index_to_lps(index_zyx[chosen][:, ::-1].astype(np.float64))


def convention_check(field_path: Path, fixed_path: Path) -> dict:
    """Does the field map fixed points p to p + t (pass), to p - t (read the wrong way round), or neither?

    The verdict looks at the median displacement over interior body points (a deformable method
    need not recover a pure translation exactly everywhere); the median pointwise error is reported.
    """
    field = read_field(field_path)
    points = _interior_points(fixed_path)
    shift = np.asarray(TRANSLATION_MM)
    mapped = transform_points(field, points) - points
    median = np.median(mapped, axis=0)
    if np.linalg.norm(median - shift) < CONVENTION_TOLERANCE_MM:
        verdict = "pass"
    elif np.linalg.norm(median + shift) < CONVENTION_TOLERANCE_MM:
        verdict = "FAIL: reversed (moving -> fixed)"
    else:
        verdict = "FAIL: wrong"
    return {
        "expected_mm": [float(v) for v in shift],
        "median_displacement_mm": [round(float(v), 3) for v in median],
        "median_error_mm": round(float(np.median(np.linalg.norm(mapped - shift, axis=1))), 3),
        "verdict": verdict,
    }


def seen_by_moving(case: SynthCase) -> np.ndarray:
    """Fixed voxels whose true moving point lies inside the moving image (a cut field of view sees less)."""
    geometry = case.true_field.geometry
    mapped = geometry.grid_points_lps() + case.true_field.displacement_mm
    return case.moving.geometry.contains_lps(mapped.reshape(-1, 3)).reshape(geometry.shape_zyx)


def score(field_path: Path, case: SynthCase) -> dict:
    """TRE at the landmarks; Jacobian statistics in the fixed body; endpoint error where the moving image sees it."""
    field = read_field(field_path)
    body = body_mask(case.fixed)
    return {
        "tre": tre(case.landmarks_fixed_lps, case.landmarks_moving_lps, field),
        "jacobian": sdlogj(field, body),
        "endpoint_error": endpoint_error(field, case.true_field, body & seen_by_moving(case)),
        **pleura_tre(case, field),
    }


def pleura_tre(case: SynthCase, field) -> dict:
    """TRE at the landmarks near the pleura (a sliding case lists them in case.json), both sides and each side;
    empty for other cases."""
    near = np.asarray(case.params.get("pleura_landmarks", []), dtype=int)
    if near.size == 0:
        return {}
    side = np.asarray(case.params["pleura_side"])
    fixed, moving = case.landmarks_fixed_lps[near], case.landmarks_moving_lps[near]
    out = {"tre_pleura": tre(fixed, moving, field)}
    for name in ("lung", "wall"):
        if np.any(side == name):
            out[f"tre_pleura_{name}"] = tre(fixed[side == name], moving[side == name], field)
    return out


def score_tre(field_path: Path, case: SynthCase) -> dict:
    """TRE at the case's landmarks of a field file (any format io.transforms reads)."""
    return tre(case.landmarks_fixed_lps, case.landmarks_moving_lps, read_field(field_path, case.fixed.geometry))
