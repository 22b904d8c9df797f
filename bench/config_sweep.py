"""TRE of this project's registration per case for settings given as JSON, in one process (development sweeps).

    .venv/bin/python bench/config_sweep.py --config '{"residual_smoothness": 0.2}' ev-liver-local-s1-clean ...

Each case is a folder of bench/work/cases (built by bench/run.py); each line gives the mean TRE at the case's
landmarks, SDlogJ and folding over the whole grid (bench/run.py's tables: inside the body) and the
registration's seconds; the last line the mean TRE. Not a benchmark: no peer
runs here (their figures come from bench/run.py on the same cases).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "ImplicitKernelRegistration"))

from cases import load_case  # noqa: E402

from ImplicitKernelRegistrationLib.core.metrics import sdlogj, tre  # noqa: E402
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register  # noqa: E402


def case_figures(folder: Path, config: RegistrationConfig) -> dict:
    """Register one case folder with `config`: mean TRE (mm), SDlogJ and folding (%) over the whole grid, seconds."""
    case = load_case(folder)
    start = time.perf_counter()
    result = register(case.fixed, case.moving, config)
    seconds = time.perf_counter() - start
    error = tre(case.landmarks_fixed_lps, case.landmarks_moving_lps, result.field)["mean"]
    stats = sdlogj(result.field)  # the whole grid (bench's tables: the fixed body only)
    return {"tre": error, "sdlogj": stats["sdlogj"], "folding": stats["folding_percent"], "seconds": seconds}


def main() -> None:
    """Parse the arguments, register every case, print a line each and the mean."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="{}", help="RegistrationConfig fields as JSON (default: the defaults)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("cases", nargs="+", help="case names under bench/work/cases")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RegistrationConfig(**json.loads(args.config))
    tres = []
    for name in args.cases:
        f = case_figures(HERE / "work" / "cases" / name, config)
        tres.append(f["tre"])
        print(
            f"{name:58s} TRE {f['tre']:.3f} SDlogJ {f['sdlogj']:.3f} folding {f['folding']:.3f} % {f['seconds']:.1f} s",
            flush=True,
        )
    print(f"mean TRE {np.mean(tres):.3f} mm over {len(tres)} cases; config {args.config}")


if __name__ == "__main__":
    main()
