"""Cohort studies: `ikr batch` registers (and measures the margins of) every case of a manifest on a Dask cluster.

manifest (read and check the CSV), case (one case: the single commands' files into OUT/<case>/),
run (the dask.distributed part: cluster, resume, progress, batch.json), summary (summary.csv/.png/.html).
"""

from __future__ import annotations

import argparse
import sys

EXIT_SOME_FAILED = 1
NOT_FORWARDED = {"quiet", "strict", "force_memory", "help"}


def register_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The `ikr register` flags of a batch command line that differ from their defaults, to pass to each case."""
    from ..cli import _add_registration_flags

    parser = argparse.ArgumentParser(add_help=False)
    _add_registration_flags(parser)
    flags: list[str] = []
    for action in parser._actions:
        if action.dest in NOT_FORWARDED or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        option = max(action.option_strings, key=len)
        if action.nargs == 0:
            flags.append(option)
        else:
            flags += [option, *(map(str, value) if isinstance(value, list | tuple) else [str(value)])]
    return tuple(flags)


def batch_command(args: argparse.Namespace) -> int:
    """`ikr batch`: run the manifest's cases; 0 when every case succeeded (or was finished before), else 1."""
    from .case import CaseOptions
    from .run import BatchSettings, run_batch

    options = CaseOptions(register_flags(args), tuple(args.thresholds), args.strict)
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
