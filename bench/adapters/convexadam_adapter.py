"""ConvexAdam (convexadam): MIND-SSC, coupled convex optimisation, Adam refinement; its defaults.

`convex_adam_pt` takes voxel arrays and returns displacements in voxels along the array axes, with
the moving image sampled at p + d(p) (its `apply_convex`): fixed -> moving. We pass SimpleITK's
(z, y, x) arrays, padded at the far end to a multiple of the coarse grid step, so the components
come back as (z, y, x) voxel steps; they are reordered to (x, y, z) and turned into LPS mm.
A moving image on another grid is first resampled onto the fixed grid (identity, linear).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from _common import Stopwatch, field_image, finish, index_to_mm, options, parse_args, read_float, version
from convexAdam.convex_adam_MIND import convex_adam_pt

DEFAULTS = {
    "mind_r": 1,
    "mind_d": 2,
    "lambda_weight": 1.25,
    "grid_sp": 6,
    "disp_hw": 4,
    "selected_niter": 80,
    "selected_smooth": 0,
    "grid_sp_adam": 2,
    "ic": True,
}


def padded(array: np.ndarray, multiple: int) -> np.ndarray:
    """The array padded at the far end of each axis (edge values) to a multiple of `multiple`."""
    pad = [(0, (-n) % multiple) for n in array.shape]
    return np.pad(array, pad, mode="edge")


def main() -> None:
    """Register, write the field and the record."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    fixed = read_float(args.fixed)
    fixed_zyx = sitk.GetArrayFromImage(fixed)
    moving = sitk.Resample(read_float(args.moving), fixed, sitk.Transform(), sitk.sitkLinear, -1024.0)
    moving_zyx = sitk.GetArrayFromImage(moving)
    multiple = int(np.lcm(settings["grid_sp"], settings["grid_sp_adam"]))
    with Stopwatch() as clock:
        disp = convex_adam_pt(
            padded(fixed_zyx, multiple), padded(moving_zyx, multiple), **settings, dtype=dtype, device=device
        )
        nz, ny, nx = fixed_zyx.shape
        disp_zyx = np.asarray(disp, dtype=np.float64)[:nz, :ny, :nx]
        field = field_image(index_to_mm(disp_zyx[..., ::-1], fixed), fixed)
    memory = {}
    if device.type == "cuda":
        memory["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    record = {
        "method": "convexadam",
        "package": "convexadam",
        "version": version("convexadam"),
        "settings": {**settings, "dtype": str(dtype).removeprefix("torch.")},
        "device": str(device),
        "registration_s": clock.seconds,
        **memory,
    }
    finish(args, field, fixed, record)


if __name__ == "__main__":
    main()
