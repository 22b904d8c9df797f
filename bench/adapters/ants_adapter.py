"""ANTs SyN (antspyx): `type_of_transform="SyN"` with antspyx's defaults (affine, then SyN with MI).

ANTs' forward transforms (warp, then affine) map fixed points to moving points; composed by
antsApplyTransforms into one displacement image on the fixed grid, in LPS mm: our convention.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ants as antspy  # antspyx
import SimpleITK as sitk
from _common import Stopwatch, finish, options, parse_args, read_float, version

DEFAULTS = {"type_of_transform": "SyN", "syn_metric": "mattes", "reg_iterations": [40, 20, 0]}


def main() -> None:
    """Register, compose the forward transforms into one field, write it and the record."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    fixed_sitk = read_float(args.fixed)
    fixed, moving = antspy.image_read(args.fixed, pixeltype="float"), antspy.image_read(args.moving, pixeltype="float")
    with tempfile.TemporaryDirectory(prefix="ants-") as tmp, Stopwatch() as clock:
        result = antspy.registration(
            fixed,
            moving,
            type_of_transform=settings["type_of_transform"],
            syn_metric=settings["syn_metric"],
            reg_iterations=tuple(settings["reg_iterations"]),
            outprefix=str(Path(tmp) / "ants_"),
        )
        composed = antspy.apply_transforms(
            fixed, moving, transformlist=result["fwdtransforms"], compose=str(Path(tmp) / "fwd_")
        )
        field = sitk.ReadImage(composed)
    record = {
        "method": "ants",
        "package": "antspyx",
        "version": version("antspyx"),
        "settings": settings,
        "device": "cpu",
        "registration_s": clock.seconds,
    }
    finish(args, field, fixed_sitk, record)


if __name__ == "__main__":
    main()
