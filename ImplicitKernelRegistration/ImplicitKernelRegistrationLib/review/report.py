"""The figures of a registration report: field regularity and, with landmarks, TRE before and after."""

from __future__ import annotations

import os
import time

import numpy as np

from ..core.fields import Field
from ..core.geometry import Image
from ..core.metrics import sdlogj, tre, tre_summary


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


def process_elapsed_s(fallback_start: float) -> float:
    """Wall seconds since this process started (interpreter start-up included), from /proc.

    Linux gives the start in clock ticks after boot (/proc/self/stat, field 22) and the time since
    boot (/proc/uptime), both to 10 ms. Elsewhere: seconds since `fallback_start` (a time.time()).
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        with open("/proc/uptime", encoding="ascii") as f:
            uptime_s = float(f.read().split()[0])
        return uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 is the 20th after the name
    except (OSError, IndexError, ValueError):
        return time.time() - fallback_start


def command_figures(device: str, fallback_start: float) -> dict:
    """The whole command's wall time (s) and peak memory (MB, children included), measured now."""
    import torch

    from ..registration.pipeline import peak_memory_mb

    return {
        "command_s": round(process_elapsed_s(fallback_start), 3),
        "peak_memory_mb": round(peak_memory_mb(torch.device(device)), 1),
    }
