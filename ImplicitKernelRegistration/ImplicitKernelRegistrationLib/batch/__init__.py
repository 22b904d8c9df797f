"""Cohort studies: `ikr batch` registers (and measures the margins of) every case of a manifest on a Dask cluster.

manifest (read and check the CSV), case (one case: the single commands' files into OUT/<case>/),
run (the dask.distributed part: cluster, resume, progress, batch.json), summary (summary.csv/.png/.html).
"""

from __future__ import annotations

import argparse
import sys

EXIT_SOME_FAILED = 1


def batch_command(args: argparse.Namespace) -> int:
    """`ikr batch`: run the manifest's cases; 0 when every case succeeded (or was finished before), else 1."""
    from ..registration.config import registration_settings
    from .case import CaseOptions
    from .run import BatchSettings, run_batch

    options = CaseOptions(registration_settings(args), tuple(args.thresholds), args.strict)
    settings = BatchSettings(
        workers=args.workers,
        scheduler=args.scheduler,
        force=args.force,
        force_memory=args.force_memory,
        spacing_mm=args.spacing,
        show_progress=not args.quiet,
    )
    results = run_batch(args.manifest, args.output, options, settings)
    failed = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped")}
    print(
        f"{len(results)} cases: {counts['ok']} registered, {counts['skipped']} skipped (finished before),"
        f" {len(failed)} failed; summary in {args.output}/summary.html"
    )
    for r in failed:
        print(f"ikr batch: case {r.case} failed: {r.error}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0
