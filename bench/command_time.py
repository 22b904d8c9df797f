"""Time to result of `ikr register`: the whole command, and each step around the registration.

Run from the checkout:  .venv/bin/python bench/command_time.py [--case DIR] [--repeat 3] [--threads 2]

The case is a folder written by `ikr synth` (fixed.nii.gz, moving.nii.gz, landmarks_*.csv); by
default a breathing-like case (seed 3) of the 1.5 mm POPI thorax is made in bench/work/. Two parts:
1. the whole command, `ikr register ... --quiet`, in a subprocess (wall time as the user waits,
   and the command_s / runtime_s / peak_memory_mb it reports);
2. in this process, after one registration: each step that `ikr register` runs around it (field
   quality, TRE, expected-error map, warped image, writing the outputs), the best of --repeat runs.
Prints a Markdown table; nothing is asserted (timings depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CT = (
    Path(os.environ.get("IKR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ct" / "thorax_popi_T00_1p5mm.nii.gz"
)
IKR = Path(sys.executable).with_name("ikr")


def _case(args: argparse.Namespace) -> Path:
    """The case folder: --case, or the thorax breathing case (seed 3) made once in bench/work/."""
    if args.case:
        return Path(args.case)
    folder = ROOT / "bench" / "work" / "command_time_thorax_s3"
    if not (folder / "fixed.nii.gz").is_file():
        subprocess.run(
            [str(IKR), "synth", str(DEFAULT_CT), "-o", str(folder), "--family", "breathing", "--seed", "3"], check=True
        )
    return folder


def _register_args(case: Path, out: Path) -> list[str]:
    """The `ikr register` arguments for a case folder."""
    return [
        "register", str(case / "fixed.nii.gz"), str(case / "moving.nii.gz"), "-o", str(out),
        "--fixed-landmarks", str(case / "landmarks_fixed.csv"),
        "--moving-landmarks", str(case / "landmarks_moving.csv"), "--quiet",
    ]  # fmt: skip


def whole_command(case: Path, threads: int) -> dict:
    """Wall time of one `ikr register` in a subprocess, with the figures its report gives."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        subprocess.run([str(IKR), *_register_args(case, out)], check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    keys = ("command_s", "runtime_s", "peak_memory_mb", "sdlogj", "folding_percent")
    return {"wall_s": wall, **{k: report.get(k) for k in keys}, "tre_mean_mm": report["tre_mm"]["mean"]}


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """The shortest wall time (s) of `repeat` calls, and the CPU time (s, all threads) of that call."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


REGISTRATION_STAGES = (  # (module, owner class or "", function, label): the registration's stages, timed by wrappers
    ("registration.pipeline", "", "align", "alignment (rigid)"),
    ("registration.pipeline", "", "make_working_pair", "working pair (resampling, masks)"),
    ("registration.pipeline", "", "forstner_keypoints", "keypoints"),
    ("registration.pipeline", "", "mind_ssc", "MIND-SSC features (every scale)"),
    ("registration.pipeline", "", "match_keypoints", "matching, forward only (scales 1-2)"),
    ("registration.pipeline", "", "match_consistent", "matching, forward + backward (scales 3-5)"),
    ("registration.pipeline", "", "kernel_at_points", "kernel at the keys (priors between scales)"),
    ("registration.dense", "DenseModel", "set_keys", "dense model: kernel on the control grid (also in the next)"),
    ("registration.pipeline", "", "optimise_keys", "key optimisation against the images"),
    ("registration.dense", "DenseModel", "fit_residual", "residual fitted to the images"),
    ("registration.dense", "DenseModel", "field_on", "field on the fixed grid (and the alignment)"),
)


def _timed_stages(figures: dict[str, list[float]]) -> Callable[[], None]:
    """Wrap the registration's stage functions (REGISTRATION_STAGES) to add their wall and CPU seconds into
    `figures`; returns the function that puts the originals back."""
    import importlib

    restore = []
    for module_name, owner_name, name, label in REGISTRATION_STAGES:
        module = importlib.import_module(f"ImplicitKernelRegistrationLib.{module_name}")
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _label=label, **kwargs):  # noqa: ANN002, ANN003, ANN202
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                total = figures.setdefault(_label, [0.0, 0.0])
                total[0] += time.perf_counter() - wall
                total[1] += time.process_time() - cpu

        setattr(owner, name, wrapped)
        restore.append((owner, name, original))

    def put_back() -> None:
        """Put the original functions back."""
        for owner, name, original in restore:
            setattr(owner, name, original)

    return put_back


def steps(case: Path, repeat: int) -> dict[str, tuple[float, float]]:
    """Wall and CPU seconds of each step of `ikr register` around the registration, timed in this process."""
    start, cpu = time.perf_counter(), time.process_time()
    from ImplicitKernelRegistrationLib import cli  # noqa: F401  (what the command imports first)
    from ImplicitKernelRegistrationLib.core.fields import warp_image
    from ImplicitKernelRegistrationLib.io import outputs
    from ImplicitKernelRegistrationLib.io.images import read_image, write_image
    from ImplicitKernelRegistrationLib.io.points import pair_points, read_points
    from ImplicitKernelRegistrationLib.io.transforms import write_field, write_transform
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
    from ImplicitKernelRegistrationLib.review.quality import assess
    from ImplicitKernelRegistrationLib.review.report import field_quality, landmark_errors
    from ImplicitKernelRegistrationLib.review.uncertainty import expected_error_map

    figures = {"imports": (time.perf_counter() - start, time.process_time() - cpu)}
    figures["read inputs"] = _best(lambda: (read_image(case / "fixed.nii.gz"), read_image(case / "moving.nii.gz")), 1)
    fixed, moving = read_image(case / "fixed.nii.gz"), read_image(case / "moving.nii.gz")
    f = read_points(case / "landmarks_fixed.csv", fixed.geometry)
    m = read_points(case / "landmarks_moving.csv", moving.geometry)
    lm_f, lm_m, _ = pair_points(f, m, by="order")
    result = None

    def run() -> None:
        nonlocal result
        result = register(fixed, moving, RegistrationConfig())

    stages: dict[str, list[float]] = {}
    restore = _timed_stages(stages)
    try:
        figures["registration"] = _best(run, 1)
    finally:
        restore()
    figures.update({f"  {label}": (wall, cpu) for label, (wall, cpu) in stages.items()})
    figures["field quality (SDlogJ, folding)"] = _best(lambda: field_quality(result.field), repeat)
    figures["TRE"] = _best(lambda: landmark_errors(result.field, lm_f, lm_m), repeat)
    quality = lambda: assess(fixed, moving, result.field, result.correspondences, result.alignment)  # noqa: E731
    figures["quality verdict"] = _best(quality, repeat)
    figures["expected-error map"] = _best(lambda: expected_error_map(result, moving=moving), repeat)

    def measure_figures() -> tuple:
        """Field quality, TRE and the verdict."""
        return field_quality(result.field), landmark_errors(result.field, lm_f, lm_m), quality()

    def beside() -> None:
        """As the command: field quality, TRE and the verdict in a second thread beside the expected-error map."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            other = pool.submit(measure_figures)
            expected_error_map(result, moving=moving)
            other.result()

    figures["all four above, as the command runs them"] = _best(beside, repeat)
    figures["warped image"] = _best(lambda: warp_image(moving, result.field), repeat)
    warped, uncertainty = warp_image(moving, result.field), expected_error_map(result, moving=moving)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        figures["  write displacement.nii.gz"] = _best(lambda: write_field(result.field, d / "d.nii.gz"), repeat)
        figures["  write transform.h5"] = _best(lambda: write_transform(result.field, d / "t.h5"), repeat)
        figures["  write warped.nii.gz"] = _best(lambda: write_image(warped, d / "w.nii.gz"), repeat)
        figures["  write uncertainty.nii.gz"] = _best(lambda: write_image(uncertainty, d / "u.nii.gz"), repeat)
        session = {"inputs": {}, "config": {}, "working_geometry": {}, "user": {"next_id": 1, "pairs": []}}

        def write_all() -> None:
            out = d / f"out{time.perf_counter_ns()}"
            outputs.write_registration(out, result.field, warped, result.correspondences, {}, session, uncertainty)

        figures["write every output"] = _best(write_all, repeat)

        def warp_and_write_all() -> None:
            """As the command: the warped image made by a writer thread while the other gzips the field."""
            out = d / f"out{time.perf_counter_ns()}"
            warp = lambda: warp_image(moving, result.field)  # noqa: E731
            outputs.write_registration(out, result.field, warp, result.correspondences, {}, session, uncertainty)

        if hasattr(outputs, "_write_made"):  # a checkout whose writer takes a function for the warped image
            figures["warp + write every output, as the command"] = _best(warp_and_write_all, repeat)
    return figures


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=None, help="an `ikr synth` case folder (default: the thorax, seed 3)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per in-process step (the best is kept)")
    parser.add_argument("--runs", type=int, default=1, help="runs of the whole command")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    case = _case(args)
    load_start = os.getloadavg()
    runs = [whole_command(case, args.threads) for _ in range(args.runs)]
    import torch

    torch.set_num_threads(args.threads)
    figures = steps(case, args.repeat)
    load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(load_start, os.getloadavg(), strict=True))
    print(f"case {case}; {args.threads} threads; load average (1, 5, 15 min) at start/end: {load}\n")
    print("| whole command | wall s | command_s | runtime_s | peak MB | TRE mm | SDlogJ | folding % |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(runs):
        print(
            f"| run {i + 1} | {r['wall_s']:.2f} | {r['command_s'] or float('nan'):.2f} | {r['runtime_s']:.2f} "
            f"| {r['peak_memory_mb']:.0f} | {r['tre_mean_mm']:.3f} | {r['sdlogj']:.4f} | {r['folding_percent']:.4f} |"
        )
    print("\n| step (in process) | wall s | CPU s (all threads) |\n|---|---|---|")
    for name, (wall, cpu) in figures.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
