"""Render docs/cohort.md and docs/images/cohort_summary.png from a real `ikr batch` run on the shared CTs.

Builds a small cohort the way `ikr synth` and `ikr demo` do: known deformations (breathing, bspline,
local, sliding) of the two shared 3 mm CTs, each with a spherical tumour on the pre-ablation (moving)
image and an off-centre ablation zone on the post-ablation (fixed) image placed in the liver (or the body)
away from the image edge (review.margin.demo_tumour_and_zone: the true minimal margin is known), plus
one row whose moving image is missing. Then runs `ikr batch` on a local Dask cluster, runs it again
(every finished case is skipped), and writes the page from OUT/summary.csv and OUT/batch.json.
Usage: .venv/bin/python scripts/make_cohort_doc.py [--work /tmp/ikr-cohort] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ImplicitKernelRegistrationLib.io.images import read_image, write_image
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.synthetic.synth import make_case, write_case
from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = Path(os.environ.get("IKR_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ct"
CTS = {
    "liver": ("liver_ts_example_ct_sm_3mm.nii.gz", "liver_ts_example_ct_sm_livermask.nii.gz"),
    "abdomen": ("abdomen_ts_example_ct_3mm.nii.gz", None),
}
CASES = [("liver", "breathing", 1), ("liver", "bspline", 2), ("liver", "local", 3),
         ("abdomen", "breathing", 4), ("abdomen", "bspline", 5), ("abdomen", "sliding", 6)]  # fmt: skip


def inside_field_of_view(region: np.ndarray) -> np.ndarray:
    """The region without its outermost voxel layer, so that depth is also measured from the image's edge."""
    inner = np.zeros_like(region, dtype=bool)
    inner[1:-1, 1:-1, 1:-1] = region[1:-1, 1:-1, 1:-1]
    return inner


def make_cohort(work: Path) -> dict[str, float]:
    """Write the cases and manifest.csv under `work`; return each case's true minimal margin (mm)."""
    rows, true_margins = [], {}
    for ct_name, family, seed in CASES:
        ct_file, liver_file = CTS[ct_name]
        ct = read_image(SHARED_CT / ct_file)
        region = read_image(SHARED_CT / liver_file).array > 0 if liver_file else body_mask(ct)
        name = f"{ct_name}-{family}-{seed}"
        case = make_case(ct, family, seed)
        write_case(case, work / "cases" / name)
        place = ct.with_array(inside_field_of_view(region).astype(np.uint8))
        tumour, zone, true_margins[name] = demo_tumour_and_zone(case.fixed, case.true_field, place, seed)
        write_image(tumour, work / "cases" / name / "tumour_pre.nii.gz")
        write_image(zone, work / "cases" / name / "ablation_post.nii.gz")
        d = f"cases/{name}"
        rows.append(
            f"{name},{d}/fixed.nii.gz,{d}/moving.nii.gz,{d}/landmarks_fixed.csv,{d}/landmarks_moving.csv,"
            f"{d}/tumour_pre.nii.gz,{d}/ablation_post.nii.gz"
        )
    d = f"cases/{CASES[0][0]}-{CASES[0][1]}-{CASES[0][2]}"
    rows.append(f"missing-moving,{d}/fixed.nii.gz,{d}/moving_not_there.nii.gz,,,,")
    header = "case,fixed,moving,fixed_landmarks,moving_landmarks,tumour,ablation"
    (work / "manifest.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return true_margins


def run_batch(work: Path, workers: int, force: bool) -> tuple[float, int]:
    """`ikr batch` on the manifest; return its wall time and exit status."""
    command = [
        str(Path(sys.executable).parent / "ikr"),
        "batch",
        "manifest.csv",
        "-o",
        "out",
        "--workers",
        str(workers),
    ]
    start = time.perf_counter()
    done = subprocess.run([*command, *(["--force"] if force else [])], cwd=work, capture_output=True, text=True)
    print(done.stdout + done.stderr, file=sys.stderr)
    return time.perf_counter() - start, done.returncode


def render(work: Path, docs: Path, true_margins: dict, runs: list[tuple[float, int]], workers: int) -> None:
    """Write docs/cohort.md and docs/images/cohort_summary.png from OUT/summary.csv and OUT/batch.json."""
    out = work / "out"
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    record = json.loads((out / "batch.json").read_text(encoding="utf-8"))
    first = json.loads((work / "first_batch.json").read_text(encoding="utf-8"))
    shutil.copyfile(work / "first_summary.png", docs / "images" / "cohort_summary.png")
    lines = [
        "| case | status | TRE before / after (mm) | SDlogJ | folding % | verdict | min. margin (5-95 %) mm"
        " | true margin mm | runtime s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, f in zip(rows, _first_rows(work), strict=True):
        tre = f"{r['tre_before_mm']} / {r['tre_after_mm']}" if r["tre_after_mm"] else ""
        margin = (
            f"{r['min_margin_mm']} ({r['min_margin_p5_mm']} .. {r['min_margin_p95_mm']})" if r["min_margin_mm"] else ""
        )
        truth = f"{true_margins[r['case']]:.2f}" if r["case"] in true_margins else ""
        status = f["status"] + (f": {f['error']}" if f["error"] else "")
        lines.append(
            f"| {r['case']} | {status} | {tre} | {r['sdlogj']} | {r['folding_percent']} | {r['quality_verdict']}"
            f" | {margin} | {truth} | {f['runtime_s']} | {r['peak_memory_mb']} |"
        )
    second = [r["status"] for r in rows]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    threads = sorted(set(first["torch_threads"].values()))
    skipped = ", ".join(f"{second.count(s)} {s}" for s in ("skipped", "failed") if second.count(s))
    text = f"""# A cohort with `ikr batch`: a summary from a real run

Made by `scripts/make_cohort_doc.py` (rerun it to remake this page and `images/cohort_summary.png`).
The cohort: {len(CASES)} synthetic post/pre-ablation pairs made like `ikr synth` from the two shared
3 mm CTs (`{CTS["liver"][0]}`, `{CTS["abdomen"][0]}`), each with a spherical
tumour on the pre-ablation (moving) CT and an off-centre ablation zone on the post-ablation (fixed) CT,
placed as `ikr demo` does (`review.margin.demo_tumour_and_zone`: in the liver mask of the liver CT, in
the body of the abdomen CT, away from the edge of the field of view), so the true minimal margin is
known; and one row whose moving image does not exist. The command, from the manifest's folder:

```
ikr batch manifest.csv -o out --workers {workers}
```

{first["n_workers"]} local Dask worker processes ({first["cluster"]}; torch threads per worker: {threads}),
default registration settings (learned kernel, 2 mm working grid), on a 2-core machine shared with
other work (times are rough). First run: {runs[0][0]:.0f} s wall, exit status {runs[0][1]} (a case
failed). Second run of the same command: {runs[1][0]:.0f} s wall, exit status {runs[1][1]}, cases
{skipped}: every finished case was skipped (inputs unchanged, outputs intact) and only the failed one
was tried again.

![margin distribution, TRE per case, runtime per case](images/cohort_summary.png)

The first run, from `out/summary.csv` (the true margin is not in summary.csv: it comes from the case
generator). Each case's folder `out/<case>/` holds the files of `ikr register`, and `out/<case>/margin/`
those of `ikr margin`; `out/summary.html` shows this table with the plots and links to each case's
report. A `doubtful` quality verdict is reported but does not fail a case (`--strict` makes it fail).

{chr(10).join(lines)}

Versions: {versions}.
"""
    (docs / "cohort.md").write_text(text, encoding="utf-8")


def _first_rows(work: Path) -> list[dict]:
    """summary.csv of the first run (statuses, errors and runtimes of the run that did the work)."""
    with open(work / "first_summary.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main() -> int:
    """Make the cohort, run `ikr batch` twice, render the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/ikr-cohort", help="scratch folder (replaced)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    args = parser.parse_args()
    if not SHARED_CT.is_dir():
        print(f"needs the shared CTs in {SHARED_CT}", file=sys.stderr)
        return 1
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    true_margins = make_cohort(work)
    runs = [run_batch(work, args.workers, force=False)]
    for name in ("summary.csv", "summary.png", "batch.json"):
        shutil.copyfile(work / "out" / name, work / f"first_{name}")
    runs.append(run_batch(work, args.workers, force=False))
    render(work, Path(args.docs), true_margins, runs, args.workers)
    print(f"wrote {Path(args.docs) / 'cohort.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
