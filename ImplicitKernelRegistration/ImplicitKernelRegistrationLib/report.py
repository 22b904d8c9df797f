"""The figures of a registration report: field regularity and, with landmarks, TRE before and after."""

from __future__ import annotations

import numpy as np

from .fields import Field
from .geometry import Image
from .metrics import sdlogj, tre, tre_summary


def field_quality(field: Field, mask: Image | np.ndarray | None = None) -> dict:
    """SDlogJ (std log J), the Learn2Reg variant, and the % of voxels with J <= 0, over `mask`."""
    stats = sdlogj(field, mask)
    return {
        "sdlogj": stats["sdlogj"],
        "sdlogj_l2r": stats["sdlogj_l2r"],
        "folding_percent": stats["folding_percent"],
    }


def landmark_errors(field: Field, fixed_lps: np.ndarray, moving_lps: np.ndarray) -> dict:
    """TRE (mm) of landmark pairs before registration (identity) and after (through `field`)."""
    fixed_lps = np.asarray(fixed_lps, dtype=np.float64).reshape(-1, 3)
    moving_lps = np.asarray(moving_lps, dtype=np.float64).reshape(-1, 3)
    before = tre_summary(np.linalg.norm(moving_lps - fixed_lps, axis=1))
    return {"tre_before_mm": before, "tre_mm": tre(fixed_lps, moving_lps, field)}
