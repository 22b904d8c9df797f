"""Benchmark this project against elastix, ConvexAdam, Greedy, demons and ANTs on synthetic CT cases.

    .venv/bin/python bench/run.py --quick          # 2 cases on the 3 mm CTs, under 10 minutes on 2 cores
    .venv/bin/python bench/run.py                  # the full set, under an hour on 2 cores
    .venv/bin/python bench/run.py --device cuda    # this project and ConvexAdam on the GPU
    .venv/bin/python bench/run.py --set synth independent clinical   # both generators, side by side

Steps: install the peers into bench/.venv-peers (setup_peers.sh, once), build the cases under
bench/work/cases, check every method's displacement convention on a known translation, run every
method on every case (each in a subprocess of its own), score the fields, and write
bench/results/latest.{md,json,png}; the table is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cases import CASE_SETS, QUICK_SETS, TRANSLATION_MM, CaseSpec, EvalSpec, build_translation_case, load_case
from methods import (
    ADAPTERS,
    BENCH,
    DEFAULT_METHOD,
    METHODS,
    PEERS_PYTHON,
    Method,
    get_method,
    method_names,
    run_command,
    run_method,
)
from report import convention_table, ratios_table, sets_table, summary_table, time_to_result_table, values_table
from scoring import convention_check, score, score_tre

from ImplicitKernelRegistrationLib.core.fields import Field
from ImplicitKernelRegistrationLib.core.metrics import sdlogj, tre
from ImplicitKernelRegistrationLib.io.atomic import write_text_atomic
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask

ROOT = BENCH.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 cases of each set on the 3 mm CTs")
    parser.add_argument(
        "--set",
        nargs="+",
        default=["synth"],
        choices=tuple(CASE_SETS),
        dest="sets",
        help="case sets: synth (the project's generator), independent (bench's SVF generator), clinical, sliding,"
        " clean (the SVF generator without noise or intensity change)",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda", "auto"), help="for this project and ConvexAdam"
    )
    parser.add_argument("--methods", nargs="+", choices=method_names(), help="only these methods")
    parser.add_argument("--cases", nargs="+", help="only the cases with these names")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every method")
    parser.add_argument("--timeout", type=float, help="seconds per run (default 600 quick, 1800 full)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--work", type=Path, default=BENCH / "work", help="cases and fields")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="where latest.{md,json,png} go")
    parser.add_argument("--name", default="latest", help="results file name stem (default latest)")
    parser.add_argument(
        "--no-command", action="store_true", help="skip timing the whole `ikr register` command for ikr-learned"
    )
    parser.add_argument("--skip-check", action="store_true", help="skip the convention check (not advised)")
    return parser.parse_args(argv)


def setup_peers() -> None:
    """Create or update the peers' venv (idempotent); on failure the peers are reported missing."""
    log = BENCH / "work" / "setup_peers.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print("setting up the peers' venv (bench/.venv-peers) ...", flush=True)
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(["bash", str(BENCH / "setup_peers.sh")], stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"  setup_peers.sh failed (exit {code}); see {log}", flush=True)


def peer_versions() -> dict[str, str]:
    """Versions of the peers' packages, from the venv's pip freeze."""
    freeze = PEERS_PYTHON.parent.parent / "freeze.txt"
    if not freeze.exists():
        return {}
    wanted = {"itk-elastix", "convexadam", "picsl-greedy", "picsl_greedy", "antspyx", "simpleitk", "torch"}
    pairs = (line.split("==", 1) for line in freeze.read_text(encoding="utf-8").splitlines() if "==" in line)
    return {name: ver for name, ver in pairs if name.lower() in wanted}


def _reusable_check(method: Method, out: Path, case_folder: Path) -> dict | None:
    """A passed check of a peer whose adapter and inputs have not changed since (None otherwise)."""
    record, field = out / "run.json", out / "field.nii.gz"
    if not method.peer or not record.exists() or not field.exists():
        return None
    inputs = (ADAPTERS / method.adapter, ADAPTERS / "_common.py", case_folder / "moving.nii.gz", PEERS_PYTHON)
    if any(path.stat().st_mtime > record.stat().st_mtime for path in inputs):
        return None
    previous = json.loads(record.read_text(encoding="utf-8"))
    return {**previous, "method": method.name, "status": "ok", "field": str(field), "reused": True}


def run_checks(methods: list[Method], args: argparse.Namespace) -> dict[str, dict]:
    """The translation check of every method: a field that does not map p to p + t fails.

    Peers' passed checks are reused while their adapter is unchanged. The project's kernels share
    one conversion to the output field (pipeline.dense_to_field), so only the first one is checked.
    """
    folder = build_translation_case(args.data, args.work)
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    checks: dict[str, dict] = {}
    ikr_checked = None
    for method in methods:
        if not method.peer and ikr_checked is not None:
            checks[method.name] = {**checks[ikr_checked], "method": method.name, "checked_as": ikr_checked}
            continue
        print(f"convention check: {method.name} ...", flush=True)
        out = args.work / "runs" / "check" / method.name
        run = _reusable_check(method, out, folder)
        run = run or run_method(method, fixed, moving, out, args.device, args.threads, 900)
        check = convention_check(Path(run["field"]), fixed) if run["status"] == "ok" else {}
        checks[method.name] = {**run, **check}
        if not method.peer and run["status"] == "ok":
            ikr_checked = method.name
        print(f"  {check.get('verdict', run['status'] + ': ' + run.get('reason', ''))}", flush=True)
    return checks


Spec = CaseSpec | EvalSpec


def identity_row(spec: Spec, case) -> dict:
    """The 'no registration' row: TRE of the zero field (the initial misalignment)."""
    zero = Field.identity(case.fixed.geometry)
    return {
        "case": spec.name,
        "set": spec.set,
        "unseen": spec.unseen,
        "method": "none",
        "status": "ok",
        "tre": tre(case.landmarks_fixed_lps, case.landmarks_moving_lps, zero),
        "jacobian": {"sdlogj": 0.0, "sdlogj_l2r": 0.0, "folding_percent": 0.0},
        "time_s": 0.0,
        "memory_mb": None,
        "device": "-",
    }


def truth_row(spec: Spec, case) -> dict:
    """The 'truth' row: the case's true field scored as a method is (its TRE is the landmarks' own error; its SDlogJ
    is how rough a perfect registration of this case is, in the same body mask)."""
    body = body_mask(case.fixed)
    return {
        **identity_row(spec, case),
        "method": "truth",
        "tre": tre(case.landmarks_fixed_lps, case.landmarks_moving_lps, case.true_field),
        "jacobian": sdlogj(case.true_field, body),
    }


def result_row(spec: Spec, case, run: dict) -> dict:
    """A table row from a run record: its figures when it finished, else its status and reason."""
    row = {"case": spec.name, "set": spec.set, "unseen": spec.unseen, **{k: v for k, v in run.items() if k != "field"}}
    if run["status"] != "ok":
        return row
    row.update(score(Path(run["field"]), case))
    row["time_s"] = run["registration_s"]
    row["memory_mb"] = run["peak_rss_mb"] + run.get("cuda_peak_mb", 0.0)
    return row


def time_command(spec: Spec, case, folder: Path, args: argparse.Namespace, timeout: float) -> dict:
    """Wall time of the whole `ikr register FIXED MOVING -o OUT` (every output written), and its TRE."""
    out = args.work / "runs" / spec.name / "ikr-command"
    shutil.rmtree(out, ignore_errors=True)  # `ikr register` refuses to replace an earlier result unasked
    run = run_command(folder / "fixed.nii.gz", folder / "moving.nii.gz", out, args.device, args.threads, timeout)
    if run["status"] != "ok":
        return {"command_status": f"{run['status']}: {run.get('reason', '')}"}
    tre_mean = score_tre(out / "displacement.nii.gz", case)["mean"]
    return {"command_s": run["wall_s"], "command_registration_s": run["runtime_s"], "command_tre_mean": tre_mean}


def run_case(spec: Spec, methods: list, args: argparse.Namespace, timeout: float) -> list[dict]:
    """Build (or reuse) one case and run every method on it."""
    print(f"case {spec.name}: building ...", flush=True)
    folder = spec.build(args.data, args.work)
    case = load_case(folder)
    rows = [identity_row(spec, case), truth_row(spec, case)]
    for method in methods:
        print(f"case {spec.name}: {method.name} ...", flush=True)
        out = args.work / "runs" / spec.name / method.name
        run = run_method(
            method, folder / "fixed.nii.gz", folder / "moving.nii.gz", out, args.device, args.threads, timeout
        )
        rows.append(result_row(spec, case, run))
        last = rows[-1]
        if last["status"] != "ok":
            print(f"  {last['status']}: {last.get('reason', '')}", flush=True)
            continue
        print(f"  TRE {last['tre']['mean']:.2f} mm, {last['time_s']:.1f} s, {last['memory_mb']:.0f} MB", flush=True)
        if method.name == DEFAULT_METHOD and not args.no_command:
            last.update(time_command(spec, case, folder, args, timeout))
            if "command_s" in last:
                print(f"  whole `ikr register`: {last['command_s']:.1f} s", flush=True)
    return rows


def git_version() -> str:
    """The checkout's commit (with '+dirty' when the tree has changes)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def markdown(results: dict) -> str:
    """The results page."""
    rows, checks = results["rows"], results["checks"]
    sets = results.get("sets", ["synth"])
    versions = ", ".join(f"{k} {v}" for k, v in results["peer_versions"].items()) or "none installed"
    lines = [
        f"# Benchmark: {results['mode']} run",
        "",
        f"{results['date']}; project {results['project_version']}; {results['machine']}; "
        f"{results['threads']} threads; device {results['device']}.",
        f"Peers: {versions}.",
        "",
        f"Case sets: {', '.join(sets)}. 'synth': the project's generator (`synth.make_case`, a small rigid"
        " offset, an intensity change and noise). 'independent': bench's evaluation generator"
        " (`bench/eval_generator.py`: stationary velocity fields by scaling and squaring, gamma/bias/"
        "heteroscedastic noise, DoG landmarks; never used in training). 'clinical': the independent"
        " generator plus repositioning, the moving scan's own grid, a field-of-view cut, a contrast"
        " change and an ablation-like region (`bench/clinical_cases.py`). 'sliding': the evaluation generator's"
        " kind 'sliding' (lungs move inferiorly and slide along the chest wall and mediastinum, which stay"
        " nearly still; 'TRE pleura': the landmarks 2-12 mm from the lungs' boundary, both sides). 'clean': the"
        " evaluation generator's kinds on seed 1 with no intensity model (no noise, gamma or bias): where the"
        " images differ by the deformation alone."
        " 'verdict': ikr's own quality verdict of its run (review/quality.py, as `ikr register` reports"
        " it; '—' for the peers). TRE at the case's landmarks (mm);"
        " SDlogJ (std of log J over J > 0) and folding (% of J <= 0) inside the fixed image's body"
        " mask; time is the registration itself (each method in a process of its own, after reading"
        " the images); 'whole command' is `ikr register FIXED MOVING -o OUT` from start to every output"
        " written; peak memory is that process's peak resident set (+ CUDA peak on a GPU)."
        " 'unseen': what of the case training never saw (the family 'sliding', the liver slab CT and"
        " the independent generator).",
        "",
        "## Mean TRE (mm) and time (s) per case set",
        "",
        sets_table(rows, sets),
        "",
        "## Time to result: the whole `ikr register` against the most accurate peer of each case",
        "",
        time_to_result_table(rows),
        "",
        "## Mean over every case",
        "",
        summary_table(rows),
        "",
        "## Every run",
        "",
        values_table(rows),
        "",
        "## Ratios to this project's default (ikr-learned; ikr-tps while the learned weights are missing)",
        "",
        ratios_table(rows),
        "",
        "## Convention check (liver slab moved by t = "
        f"({', '.join(f'{v:g}' for v in TRANSLATION_MM)}) mm, LPS; field must map p to p + t)",
        "",
        convention_table(checks) if checks else "skipped",
        "",
        "## Settings",
        "",
        *(f"- {m.name}: {m.note}; options {json.dumps(m.options)}" for m in METHODS),
        "",
        f"![TRE against time]({results.get('name', 'latest')}.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results_json: Path, png: Path) -> None:
    """Draw the TRE-against-time plot with the peers' venv (matplotlib lives there)."""
    if not PEERS_PYTHON.exists():
        print("no plot: the peers' venv (with matplotlib) is missing", flush=True)
        return
    code = subprocess.run([str(PEERS_PYTHON), str(BENCH / "plot.py"), str(results_json), str(png)]).returncode
    if code != 0:
        print(f"plotting failed (exit {code})", flush=True)


def machine() -> str:
    """A short description of this machine."""
    return (
        f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every convention check passed."""
    args = parse_args(argv)
    chosen = QUICK_SETS if args.quick else CASE_SETS
    specs = tuple(spec for name in args.sets for spec in chosen[name])
    if args.cases:
        specs = tuple(s for name in args.sets for s in (*CASE_SETS[name], *QUICK_SETS[name]) if s.name in args.cases)
        specs = tuple(dict.fromkeys(specs))
    methods = [get_method(n) for n in (args.methods or method_names())]
    timeout = args.timeout or (600.0 if args.quick else 1800.0)
    np.seterr(all="ignore")
    if any(m.peer for m in methods):
        setup_peers()
    checks = {} if args.skip_check else run_checks(methods, args)
    failed = {name for name, c in checks.items() if not c.get("verdict", "pass").startswith("pass")}
    runnable = [m for m in methods if m.name not in failed]
    rows = [row for spec in specs for row in run_case(spec, runnable, args, timeout)]
    results = {
        "mode": ("quick" if args.quick else "full") + f" ({' + '.join(args.sets)})",
        "sets": args.sets,
        "name": args.name,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "project_version": git_version(),
        "machine": machine(),
        "threads": args.threads,
        "device": args.device,
        "peer_versions": peer_versions(),
        "checks": {k: {kk: vv for kk, vv in v.items() if kk != "field"} for k, v in checks.items()},
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    results_json = args.results / f"{args.name}.json"
    write_text_atomic(results_json, json.dumps(results, indent=1, default=float) + "\n")
    write_text_atomic(args.results / f"{args.name}.md", markdown(results))
    plot(results_json, args.results / f"{args.name}.png")
    print()
    print(sets_table(rows, args.sets))
    print()
    print(time_to_result_table(rows))
    print()
    print(values_table(rows))
    print(f"\nwritten: {args.results / args.name}.md, .json, .png")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
