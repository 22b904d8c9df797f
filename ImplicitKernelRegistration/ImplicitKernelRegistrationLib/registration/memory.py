"""Will a registration fit in memory? The whole command's peak, estimated from its grid sizes.

`ikr register` has two memory phases. During the registration the working grid dominates (the
normalised pair, MIND-SSC features, the pyramid, the kernel's feature volume); afterwards the fixed
grid does (the field, its float64 copy for ITK, the Jacobian, the warped image, the expected-error
map and the four files written at once, beside what the registration leaves). Each phase is linear
in the two grid sizes (millions of voxels); the peak is the larger:

    registration = BASE_MB + 204 MB * n_working + 7 MB * n_fixed
    outputs      = BASE_MB + 72 MB * n_fixed + 68 MB * n_working

Calibration: peak resident set from `/usr/bin/time -v` (the report's `peak_memory_mb`, now measured
at the end of the command, agreed within 3 %); `peak_memory_registration_mb` gives the first phase.
Breathing-like `ikr synth` cases (seed 3), CPU, 2 threads, commit of this module:

| case | fixed (M voxels) | working (M voxels) | registration phase MB | whole command MB |
|---|---|---|---|---|
| thorax 1.5 mm, --spacing 3   | 14.02 | 1.76  | 1057 | 2208 |
| thorax 1.5 mm, --spacing 2   | 14.02 | 5.92  | 1889 | 2489 |
| thorax 1.5 mm, --spacing 1.5 | 14.02 | 14.02 | 3577 | 3663 |
| abdomen 3 mm, --spacing 2    | 1.38  | 4.67  | 1543 | 1580 |
| abdomen 3 mm, --spacing 1.5  | 1.38  | 11.04 | 2837 | 2905 (a check, not fitted: 2842 estimated) |

The working slope is the fit of the three thorax registration phases (200-208 MB per M voxels); the
abdomen then gives the fixed slope and the base. The outputs phase: its working slope from the two
thorax runs at --spacing 3 and 2 (written by four threads then); its fixed slope refitted on the final
writer (two threads, float64 cast inside ITK): thorax --spacing 2, 1985 MB whole command (was 2489).
To recalibrate after a change that moves memory, run those four commands under `/usr/bin/time -v`
and refit (a least-squares line per phase is enough).
"""

from __future__ import annotations

import math

from ..core.errors import IkrError
from ..core.geometry import Geometry
from .preprocess import working_geometry

BASE_MB = 580.0  # the interpreter, torch, the kernel and the two input images' headers
REGISTRATION_MB_PER_MVOXEL = {"working": 204.0, "fixed": 7.0}
OUTPUTS_MB_PER_MVOXEL = {"working": 68.0, "fixed": 72.0}
HEADROOM = 1.1  # the estimate is raised by 10 % before it is compared with the free memory


def estimate_peak_mb(fixed: Geometry, spacing_mm: float) -> float:
    """The estimated peak memory (MB) of `ikr register` onto `fixed` with a working grid of `spacing_mm`."""
    n = {"fixed": math.prod(fixed.size) / 1e6, "working": math.prod(working_geometry(fixed, spacing_mm).size) / 1e6}
    phases = (REGISTRATION_MB_PER_MVOXEL, OUTPUTS_MB_PER_MVOXEL)
    return BASE_MB + max(sum(slope[k] * n[k] for k in n) for slope in phases)


def available_mb() -> float | None:
    """MemAvailable from /proc/meminfo (MB): what can be allocated without swapping; None off Linux."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            line = next(row for row in f if row.startswith("MemAvailable:"))
        return float(line.split()[1]) / 1024.0
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_memory(fixed: Geometry, spacing_mm: float) -> None:
    """Refuse (IkrError) a registration whose estimated peak exceeds the memory available now."""
    free = available_mb()
    if free is None:
        return
    need = HEADROOM * estimate_peak_mb(fixed, spacing_mm)
    if need > free:
        raise IkrError(
            f"this registration needs about {need / 1024:.1f} GB of memory"
            f" (fixed grid {'x'.join(map(str, fixed.size))},"
            f" working spacing {spacing_mm:g} mm) but only {free / 1024:.1f} GB is available; use a coarser"
            " --spacing, free memory, or pass --force-memory to run anyway"
        )
