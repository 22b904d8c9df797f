"""This project (ImplicitKernelRegistration), in a process of its own so that peak memory is per run.

Runs in the project's venv. `register` returns a Field on the fixed grid, fixed -> moving, LPS mm.
After the timed registration the record gets the quality verdict (review/quality.py `assess`, as
`ikr register` reports it), so that the benchmark shows whether ikr knew when it did well.
"""

from __future__ import annotations

import torch
from _common import Stopwatch, field_image, finish, options, parse_args, read_float, version

from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.review.quality import assess

DEFAULTS = {
    "kernel": "learned",
    "heads": "both",
    "weights": None,
    "features": "mind",
    "encoder_weights": None,
    "spacing_mm": 2.0,
    "max_keypoints": 2048,
    "seed": 0,
    "lung_regions": RegistrationConfig().lung_regions,
    "key_iterations": RegistrationConfig().key_iterations,
    "key_robust": RegistrationConfig().key_robust,
    "keypoint_nms_vox": RegistrationConfig().keypoint_nms_vox,
    "lattice_keys": RegistrationConfig().lattice_keys,
    "residual_iterations": RegistrationConfig().residual_iterations,
}


def main() -> None:
    """Register, write the field and the record (with the pipeline's own report)."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    torch.set_num_threads(args.threads)
    fixed_sitk = read_float(args.fixed)
    fixed, moving = Image.from_sitk(fixed_sitk), Image.from_sitk(read_float(args.moving))
    config = RegistrationConfig(device=args.device, **settings)
    with Stopwatch() as clock:
        result = register(fixed, moving, config)
        field = field_image(result.field.displacement_mm, fixed_sitk)
    report = result.report
    quality = assess(
        fixed, moving, result.field, result.correspondences, result.alignment, report.get("n_keypoints_consistent")
    )
    record = {
        "method": f"ikr-{settings['kernel']}" + ("-encoder" if settings["features"] == "learned" else ""),
        "package": "ImplicitKernelRegistration",
        "version": version("implicit-kernel-registration"),
        "settings": settings,
        "device": report["device"],
        "registration_s": clock.seconds,
        "pipeline_report": {k: v for k, v in report.items() if k != "config"},
        "quality": quality,
    }
    if report["device"].startswith("cuda"):
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    finish(args, field, fixed_sitk, record)


if __name__ == "__main__":
    main()
