"""One results page from the runs already on disk (bench/work/runs), from one or several invocations of run.py.

    .venv/bin/python bench/merge_runs.py --set independent clinical --cases ev-abdomen-breathing-s0 ... \
        --methods ikr-learned greedy --name merged

Used when the peers and this project's variants had to run as separate invocations of `run.py` (on a
shared machine, to fit a deadline): each case is the same built folder under bench/work/cases, each
method's field and record are those its run left in bench/work/runs/CASE/METHOD, scored here as
run.py scores them. Times are as each run measured them, under whatever load it saw; the page says
that its rows come from separate runs. A (case, method) without a finished run is left out.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cases import CASE_SETS, load_case
from report import sets_table, values_table
from run import git_version, identity_row, machine, markdown, peer_versions, plot, result_row, truth_row

from ImplicitKernelRegistrationLib.io.atomic import write_text_atomic

BENCH = Path(__file__).resolve().parent


def collect(sets: list[str], cases: list[str] | None, methods: list[str], work: Path) -> list[dict]:
    """The rows of every finished (case, method) run under work/runs, with the 'none' and 'truth' rows of each case."""
    rows = []
    specs = [s for name in sets for s in CASE_SETS[name] if cases is None or s.name in cases]
    for spec in dict.fromkeys(specs):
        folder = work / "cases" / spec.name
        if not (folder / "case.json").exists():
            continue
        case = load_case(folder)
        rows.extend([identity_row(spec, case), truth_row(spec, case)])
        for method in methods:
            out = work / "runs" / spec.name / method
            record, field = out / "run.json", out / "field.nii.gz"
            if not (record.exists() and field.exists()):
                continue
            run = {**json.loads(record.read_text(encoding="utf-8")), "method": method, "status": "ok"}
            rows.append(result_row(spec, case, {**run, "field": str(field)}))
    return rows


def main() -> None:
    """Score the runs on disk and write NAME.{json,md,png} under bench/results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="+", default=["independent"], choices=tuple(CASE_SETS), dest="sets")
    parser.add_argument("--cases", nargs="+", help="only the cases with these names")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--name", required=True, help="results file name stem")
    parser.add_argument("--work", type=Path, default=BENCH / "work")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--threads", type=int, default=2, help="the threads the runs used (for the page)")
    args = parser.parse_args()
    np.seterr(all="ignore")
    results = {
        "mode": f"runs on disk ({' + '.join(args.sets)}; separate invocations of run.py, merged by merge_runs.py)",
        "sets": args.sets,
        "name": args.name,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "project_version": git_version(),
        "machine": machine(),
        "threads": args.threads,
        "device": "cpu",
        "peer_versions": peer_versions(),
        "checks": {},
        "rows": collect(args.sets, args.cases, args.methods, args.work),
    }
    results_json = args.results / f"{args.name}.json"
    write_text_atomic(results_json, json.dumps(results, indent=1, default=float) + "\n")
    write_text_atomic(args.results / f"{args.name}.md", markdown(results))
    plot(results_json, args.results / f"{args.name}.png")
    print(sets_table(results["rows"], args.sets))
    print()
    print(values_table(results["rows"]))


if __name__ == "__main__":
    main()
