"""Greedy (picsl-greedy) deformable: NCC 2x2x2, -n 100x50x20, -s 1.732vox 0.707vox (its defaults).

Greedy writes its warp as an ITK displacement image in LPS mm on the fixed grid, fixed -> moving
(the same convention as ANTs): already ours.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import SimpleITK as sitk
from _common import Stopwatch, finish, options, parse_args, read_float, version
from picsl_greedy import Greedy3D

DEFAULTS = {"iterations": "100x50x20", "metric": "NCC 2x2x2", "smoothing": "1.732vox 0.7071vox"}


def command(fixed: Path, moving: Path, warp: Path, settings: dict, threads: int) -> str:
    """The greedy command line of one deformable registration."""
    return (
        f"-d 3 -i {fixed} {moving} -o {warp} -n {settings['iterations']} -m {settings['metric']} "
        f"-s {settings['smoothing']} -threads {threads}"
    )


def main() -> None:
    """Register, write the warp and the record."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    fixed = read_float(args.fixed)
    with tempfile.TemporaryDirectory(prefix="greedy-") as tmp:
        fixed_path, moving_path, warp = Path(tmp, "fixed.nii"), Path(tmp, "moving.nii"), Path(tmp, "warp.nii")
        sitk.WriteImage(fixed, str(fixed_path))
        sitk.WriteImage(read_float(args.moving), str(moving_path))
        with Stopwatch() as clock:
            Greedy3D().execute(command(fixed_path, moving_path, warp, settings, args.threads))
            field = sitk.ReadImage(str(warp))
    record = {
        "method": "greedy",
        "package": "picsl-greedy",
        "version": version("picsl-greedy"),
        "settings": settings,
        "device": "cpu",
        "registration_s": clock.seconds,
    }
    finish(args, field, fixed, record)


if __name__ == "__main__":
    main()
