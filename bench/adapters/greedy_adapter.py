"""Greedy (picsl-greedy) deformable: NCC 2x2x2, -n 100x50x20, -s 1.732vox 0.707vox (its defaults).

With `"affine": true`, as Greedy's users run it: first its affine stage (`-a -dof 12 -m NMI
-ia-image-centers -n 100x50x10`, the tutorial's settings), then the deformable stage started from
it (`-it affine.mat`), and Greedy's own reslicing composes the two into one warp
(`-rf fixed -rc composed -r warp affine.mat`).

Greedy writes its warp as an ITK displacement image in LPS mm on the fixed grid, fixed -> moving
(the same convention as ANTs): already ours.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import SimpleITK as sitk
from _common import Stopwatch, finish, options, parse_args, read_float, version
from picsl_greedy import Greedy3D

DEFAULTS = {
    "iterations": "100x50x20",
    "metric": "NCC 2x2x2",
    "smoothing": "1.732vox 0.7071vox",
    "affine": False,
    "affine_iterations": "100x50x10",
    "affine_metric": "NMI",
}


def command(fixed: Path, moving: Path, warp: Path, settings: dict, threads: int, initial: Path | None = None) -> str:
    """The greedy command line of one deformable registration (started from an affine matrix if given)."""
    start = f"-it {initial} " if initial is not None else ""
    return (
        f"-d 3 -i {fixed} {moving} {start}-o {warp} -n {settings['iterations']} -m {settings['metric']} "
        f"-s {settings['smoothing']} -threads {threads}"
    )


def affine_command(fixed: Path, moving: Path, matrix: Path, settings: dict, threads: int) -> str:
    """The greedy command line of its affine stage (12 degrees of freedom, image centres matched first)."""
    return (
        f"-d 3 -a -dof 12 -ia-image-centers -i {fixed} {moving} -o {matrix} "
        f"-n {settings['affine_iterations']} -m {settings['affine_metric']} -threads {threads}"
    )


def register(fixed: Path, moving: Path, tmp: Path, settings: dict, threads: int) -> Path:
    """Run greedy (affine stage first when asked); the path of the warp that maps fixed to moving points."""
    warp = tmp / "warp.nii"
    if not settings["affine"]:
        Greedy3D().execute(command(fixed, moving, warp, settings, threads))
        return warp
    matrix, composed = tmp / "affine.mat", tmp / "composed.nii"
    Greedy3D().execute(affine_command(fixed, moving, matrix, settings, threads))
    Greedy3D().execute(command(fixed, moving, warp, settings, threads, initial=matrix))
    Greedy3D().execute(f"-d 3 -rf {fixed} -rc {composed} -r {warp} {matrix}")
    return composed


def main() -> None:
    """Register, write the warp and the record."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    fixed = read_float(args.fixed)
    with tempfile.TemporaryDirectory(prefix="greedy-") as tmp:
        fixed_path, moving_path = Path(tmp, "fixed.nii"), Path(tmp, "moving.nii")
        sitk.WriteImage(fixed, str(fixed_path))
        sitk.WriteImage(read_float(args.moving), str(moving_path))
        with Stopwatch() as clock:
            warp = register(fixed_path, moving_path, Path(tmp), settings, args.threads)
            field = sitk.ReadImage(str(warp))
    record = {
        "method": "greedy-affine" if settings["affine"] else "greedy",
        "package": "picsl-greedy",
        "version": version("picsl-greedy"),
        "settings": settings,
        "device": "cpu",
        "registration_s": clock.seconds,
    }
    finish(args, field, fixed, record)


if __name__ == "__main__":
    main()
