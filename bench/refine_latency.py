"""Refinement figures: latency of one clicked pair, reproduction at the pair, and repair of a corrupted region.

Run from the checkout:  .venv/bin/python bench/refine_latency.py [--ct PATH] [--spacing 2] [--device auto]

The case is a breathing-like synthetic deformation of the 1.5 mm POPI thorax CT (or --ct). The
automatic correspondences inside a 35 mm ball are then deliberately corrupted (shifted by 8 mm),
the field is rebuilt from them, and 5 clicked pairs (true correspondences at landmarks in that
region) are added; TRE is measured at the other landmarks inside the region and outside it.
Prints a table; nothing is asserted (timings depend on the machine).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from ImplicitKernelRegistrationLib.core.fields import Field, transform_points
from ImplicitKernelRegistrationLib.io.images import read_image
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.refine import RefinementSession
from ImplicitKernelRegistrationLib.synthetic.synth import make_case

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CT = (
    Path(os.environ.get("IKR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ct" / "thorax_popi_T00_1p5mm.nii.gz"
)


def tre(field: Field, fixed: np.ndarray, moving: np.ndarray) -> float:
    """Mean TRE (mm) of landmark pairs through a field."""
    if len(fixed) == 0:
        return float("nan")
    return float(np.mean(np.linalg.norm(transform_points(field, fixed) - moving, axis=1)))


def main() -> None:
    """Measure and print the refinement table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=str(DEFAULT_CT))
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    case = make_case(read_image(Path(args.ct)), "breathing", args.seed, n_landmarks=200)
    result = register(case.fixed, case.moving, RegistrationConfig(spacing_mm=args.spacing, device=args.device))
    lm_f, lm_m = case.landmarks_fixed_lps, case.landmarks_moving_lps

    # latency and reproduction of one pair on the registered field
    session = RefinementSession(result.model, case.fixed.geometry, result.correspondences)
    start = time.perf_counter()
    if os.environ.get("IKR_PROFILE"):
        import cProfile

        cProfile.runctx("session.add_correspondences(lm_f[:1], lm_m[:1] + 1.0)", globals(), locals(), sort="tottime")
    else:
        session.add_correspondences(lm_f[:1], lm_m[:1] + np.array([[1.0, 0.0, 0.0]]))
    one_pair_s = time.perf_counter() - start
    residual = session.feedback()[0]["residual_mm"]
    start = time.perf_counter()
    session.undo()
    undo_s = time.perf_counter() - start

    # a corrupted region: automatic matches within 35 mm of a landmark shifted by 8 mm
    crowd = (np.linalg.norm(lm_f[:, None] - lm_f[None], axis=-1) < 35.0).sum(axis=1)
    centre = lm_f[int(np.argmax(crowd))]  # the landmark with the most landmarks within 35 mm
    corr = result.correspondences
    inside_keys = np.linalg.norm(corr.fixed_lps - centre, axis=1) < 35.0
    corrupted = corr.subset(np.ones(len(corr), bool))
    corrupted.displacement_mm[inside_keys] += np.array([8.0, 0.0, 0.0])
    bad = RefinementSession(result.model, case.fixed.geometry, corrupted)
    region = np.linalg.norm(lm_f - centre, axis=1) < 35.0
    order = np.flatnonzero(region)
    clicked, held_out = order[:5], order[5:]
    outside = ~region
    before_in, before_out = tre(bad.field, lm_f[held_out], lm_m[held_out]), tre(bad.field, lm_f[outside], lm_m[outside])
    start = time.perf_counter()
    bad.add_correspondences(lm_f[clicked], lm_m[clicked])
    five_s = time.perf_counter() - start
    after_in, after_out = tre(bad.field, lm_f[held_out], lm_m[held_out]), tre(bad.field, lm_f[outside], lm_m[outside])

    rows = [
        ("grid (fixed)", " x ".join(map(str, case.fixed.geometry.size))),
        ("device", result.report["device"]),
        ("registration runtime_s", f"{result.report['runtime_s']:.2f}"),
        ("one pair: field ready (s)", f"{one_pair_s:.3f}"),
        ("one pair: residual at the pair (mm)", f"{residual:.3f}"),
        ("undo (s)", f"{undo_s:.3f}"),
        ("corrupted region: keys shifted", f"{int(inside_keys.sum())} of {len(corr)}"),
        ("region held-out TRE before / after 5 pairs (mm)", f"{before_in:.2f} / {after_in:.2f} (n={len(held_out)})"),
        ("elsewhere TRE before / after (mm)", f"{before_out:.3f} / {after_out:.3f} (n={int(outside.sum())})"),
        ("5 pairs: field ready (s)", f"{five_s:.3f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'figure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
