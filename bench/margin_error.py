"""Margin error on synthetic cases from real CTs: our registration against rigid-only alignment.

Run from the checkout:  .venv/bin/python bench/margin_error.py [--spacing 2] [--cases N]

For each case (a synthetic deformation of a real CT with a known true field), a tumour and an
off-centre ablation zone are placed in the liver (or soft tissue) of the fixed image with a known
true minimal margin; the minimal margin is measured through (a) the true field, (b) this project's
registration and (c) a rigid-only alignment (SimpleITK Euler3D, Mattes mutual information,
3 levels), and the table prints each error against the true-warp margin. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field, field_from_transform
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.io.images import read_image
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.review.margin import compute_margin
from ImplicitKernelRegistrationLib.synthetic.synth import make_case
from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IKR_SHARED_DATA", ROOT.parent / "shared" / "data"))
CASES = (
    ("thorax_popi_T00_1p5mm.nii.gz", "breathing", 0),
    ("abdomen_ts_example_ct_3mm.nii.gz", "breathing", 1),
    ("abdomen_ts_example_ct_3mm.nii.gz", "local", 2),
    ("abdomen_ts_example_ct_3mm.nii.gz", "bspline", 3),
    ("thorax_popi_T00_1p5mm.nii.gz", "sliding", 4),
    ("abdomen_ts_example_ct_3mm.nii.gz", "local", 5),
)


def rigid_field(fixed: Image, moving: Image) -> Field:
    """A rigid (Euler3D) registration of moving to fixed, as a field on the fixed grid."""
    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(
        f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=0)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 0.01, 100)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    return field_from_transform(reg.Execute(f, m), fixed.geometry)


def main() -> None:
    """Measure and print the margin-error table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--cases", type=int, default=len(CASES))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    for name, family, seed in CASES[: args.cases]:
        case = make_case(read_image(SHARED / "ct" / name), family, seed)
        tumour, zone, true_margin = demo_tumour_and_zone(case.fixed, case.true_field, None, seed)
        start = time.perf_counter()
        ours = register(case.fixed, case.moving, RegistrationConfig(spacing_mm=args.spacing)).field
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        rigid = rigid_field(case.fixed, case.moving)
        rigid_s = time.perf_counter() - start
        label = f"{name.split('_')[0]} {family} s{seed}"
        try:
            m_true = compute_margin(tumour, zone, case.true_field).min_margin_mm
            m_ours = compute_margin(tumour, zone, ours).min_margin_mm
            m_rigid = compute_margin(tumour, zone, rigid).min_margin_mm
        except IkrError as err:  # e.g. a tumour placed so near the edge that a warp takes it out of view
            print(f"skipped {label}: {err}", flush=True)
            continue
        rows.append((label, true_margin, m_true, m_ours, m_rigid, ours_s, rigid_s))
        print(f"done {label}: true-warp {m_true:.2f}, ikr {m_ours:.2f}, rigid {m_rigid:.2f}", flush=True)
    print("| case | placed margin | true-warp margin | ikr margin (error) | rigid margin (error) | ikr s | rigid s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, placed, m_true, m_ours, m_rigid, ours_s, rigid_s in rows:
        print(
            f"| {case} | {placed:.2f} | {m_true:.2f} | {m_ours:.2f} ({m_ours - m_true:+.2f}) |"
            f" {m_rigid:.2f} ({m_rigid - m_true:+.2f}) | {ours_s:.1f} | {rigid_s:.1f} |"
        )
    ours_err = np.array([abs(r[3] - r[2]) for r in rows])
    rigid_err = np.array([abs(r[4] - r[2]) for r in rows])
    print(f"\nmean |error|: ikr {ours_err.mean():.2f} mm (max {ours_err.max():.2f}); rigid {rigid_err.mean():.2f} mm")


if __name__ == "__main__":
    main()
