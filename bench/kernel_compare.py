"""The kernels on the same correspondences: learned (shipped weights), thin-plate spline, Gaussian.

For each case, one registration with the default settings gives the correspondences (keypoints and
their matched displacements). Each kernel then rebuilds the dense field from
  (a) exactly those matched keys ("same matches": the comparison the paper makes),
  (b) the same keypoints with their true displacements ("true keys": interpolation alone),
and (c) runs the whole pipeline with that kernel at every scale ("pipeline").
Mean landmark TRE (mm) is reported for each; the table goes to bench/results/kernel_compare.md.

    .venv/bin/python bench/kernel_compare.py            # 4 cases, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from cases import ABDOMEN, LIVER, THORAX, CaseSpec, build_case, load_case

from ImplicitKernelRegistrationLib.core.fields import sample_field
from ImplicitKernelRegistrationLib.io.atomic import write_text_atomic
from ImplicitKernelRegistrationLib.io.resources import KERNEL_WEIGHTS
from ImplicitKernelRegistrationLib.registration.dense import DenseModel
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, load_kernel, register
from ImplicitKernelRegistrationLib.registration.refine import RefinementSession
from ImplicitKernelRegistrationLib.review.report import landmark_errors

BENCH = Path(__file__).resolve().parent
CASES = (
    CaseSpec(THORAX, "breathing", 0, 6.0),
    CaseSpec(ABDOMEN, "local", 0, 4.0),
    CaseSpec(ABDOMEN, "bspline", 0),
    CaseSpec(LIVER, "sliding", 0),
)
KERNELS = ("learned", "tps", "gaussian")


def tre(field, case) -> float:
    """Mean landmark TRE (mm) of a field."""
    return landmark_errors(field, case.landmarks_fixed_lps, case.landmarks_moving_lps)["tre_mm"]["mean"]


def compare_case(spec: CaseSpec, data_dir: Path) -> list[dict]:
    """The three TREs of every kernel on one case."""
    case = load_case(build_case(spec, data_dir, BENCH / "work"))
    reference = register(case.fixed, case.moving, RegistrationConfig())
    matched = reference.correspondences
    true_keys = matched.subset(np.ones(len(matched), dtype=bool))
    true_keys.displacement_mm[:] = sample_field(case.true_field, matched.fixed_lps)
    true_keys.confidence[:] = 1.0
    rows = []
    for name in KERNELS:
        config = RegistrationConfig(kernel=name)
        kernel = load_kernel(config, torch.device("cpu"))
        same = []
        for keys in (matched, true_keys):
            model = DenseModel(kernel, reference.model.features, reference.working_geometry, config.control_step_vox)
            with torch.no_grad():
                same.append(tre(RefinementSession(model, case.fixed.geometry, keys).field, case))
        start = time.perf_counter()
        full = register(case.fixed, case.moving, config)
        rows.append(
            {
                "case": spec.name,
                "kernel": name,
                "same_matches": same[0],
                "true_keys": same[1],
                "pipeline": tre(full.field, case),
                "pipeline_s": time.perf_counter() - start,
                "n_keys": int((matched.confidence > 0).sum()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table, one row per case and kernel."""
    lines = [
        "| case | keys | kernel | TRE same matches | TRE true keys | TRE pipeline | pipeline s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['n_keys']} | {r['kernel']} | {r['same_matches']:.3f} | {r['true_keys']:.3f} | "
            f"{r['pipeline']:.3f} | {r['pipeline_s']:.1f} |"
        )
    for name in KERNELS:
        mine = [r for r in rows if r["kernel"] == name]
        lines.append(
            f"| **mean** | | {name} | {np.mean([r['same_matches'] for r in mine]):.3f} | "
            f"{np.mean([r['true_keys'] for r in mine]):.3f} | {np.mean([r['pipeline'] for r in mine]):.3f} | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every case and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BENCH.parents[0].parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "kernel_compare.md")
    args = parser.parse_args(argv)
    if not (args.data / "ct").is_dir():
        print(f"kernel_compare: no CTs in {args.data / 'ct'} (pass --data)", file=sys.stderr)
        return 2
    rows = [row for spec in CASES for row in compare_case(spec, args.data)]
    text = (
        "# Kernels on the same correspondences\n\n"
        f"Command: `.venv/bin/python bench/kernel_compare.py`; learned = `{KERNEL_WEIGHTS}`; 2 mm working grid, "
        f"{torch.get_num_threads()} CPU threads. Mean landmark TRE (mm). 'same matches': every kernel rebuilds the "
        "field from the default registration's matched keys; 'true keys': from the true displacement at the same "
        "keypoints; 'pipeline': the whole registration run with that kernel at every scale.\n\n" + table(rows) + "\n"
    )
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
