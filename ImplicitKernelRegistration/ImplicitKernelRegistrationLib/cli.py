"""The `ikr` command line: argument parsing, progress display and exit codes; no algorithms here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .core.errors import IkrError

if TYPE_CHECKING:
    from .synthetic import SynthCase
    from .workspace import Workspace

EXIT_BAD_INPUT = 2
EXIT_QUALITY = 3  # --strict: the quality verdict is doubtful or failed
EXIT_CANCELLED = 130

Progress = Callable[[float, str], None]


def _print_json(data: dict) -> None:
    """Print a dict as indented JSON on stdout."""
    print(json.dumps(data, indent=2, default=str))


class _ProgressBar:
    """A rich progress bar driven by the library's (fraction, message) callback."""

    def __init__(self, title: str, enabled: bool = True) -> None:
        self.title = title
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True
            )
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=1.0)
        return self.update

    def update(self, fraction: float, message: str) -> None:
        """Move the bar (or print a line when not on a terminal)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=fraction, description=f"{self.title}: {message}")
        else:
            print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def cmd_info(args: argparse.Namespace) -> int:
    """Describe an image file or DICOM folder: geometry, modality, value range, series."""
    from .io.images import describe_image, format_description

    desc = describe_image(Path(args.path), series_uid=args.series)
    if args.json:
        _print_json(desc)
    else:
        print(format_description(desc))
    series = desc.get("series", [])
    if desc.get("volume_problem") and (args.series or not any(s["consistent"] for s in series)):
        raise IkrError(f"no volume read: {desc['volume_problem']}", args.path)
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a procedural CT phantom and its label map."""
    from .synthetic import write_phantom

    ct_path, labels_path = write_phantom(Path(args.output), seed=args.seed)
    print(f"wrote {ct_path} and {labels_path}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Deform a CT with a known synthetic field and write the case."""
    from .synthetic import case_from_files, write_case

    case = case_from_files(args.ct, args.family, args.seed, labels_path=args.labels, magnitude_mm=args.magnitude)
    write_case(case, Path(args.output))
    print(f"wrote a {args.family} case (seed {args.seed}) to {args.output}")
    return 0


def _registration_config(args: argparse.Namespace) -> dict:
    """The registration settings (RegistrationConfig fields) named by the command-line flags."""
    from .registration.config import registration_settings

    return registration_settings(args)


def _print_summary(report: dict, outdir: Path) -> None:
    """Print the report's key figures for a person."""
    if "tre_mm" in report:
        b, a = report["tre_before_mm"], report["tre_mm"]
        print(f"TRE before: {b['mean']:.2f} +- {b['sd']:.2f} mm (p90 {b['p90']:.2f}, n={b['n']})")
        print(f"TRE after:  {a['mean']:.2f} +- {a['sd']:.2f} mm (p90 {a['p90']:.2f}, max {a['max']:.2f})")
    print(f"SDlogJ {report['sdlogj']:.4f}, folding {report['folding_percent']:.4f} %")
    print(
        f"registration {report['runtime_s']:.1f} s on {report['device']}, {report['n_keypoints']} keypoints;"
        f" whole command {report['command_s']:.1f} s, peak memory {report['peak_memory_mb']:.0f} MB"
    )
    print(f"outputs in {outdir}/")
    _warn_quality(report)


def _warn_quality(report: dict) -> None:
    """A warning line on stderr when the quality verdict is doubtful or failed."""
    quality = report.get("quality") or {}
    if quality.get("verdict") in ("doubtful", "failed"):
        reasons = "; ".join(quality.get("reasons", []))
        print(f"ikr: warning: registration {quality['verdict']}: {reasons} (see report.json)", file=sys.stderr)


def _strict_status(report: dict, strict: bool) -> int:
    """Exit status 3 under --strict when the verdict is doubtful or failed, else 0."""
    verdict = (report.get("quality") or {}).get("verdict", "ok")
    return EXIT_QUALITY if strict and verdict != "ok" else 0


def cmd_register(args: argparse.Namespace) -> int:
    """Register MOVING to FIXED and write the outputs."""
    from .workspace import Workspace

    if bool(args.fixed_landmarks) != bool(args.moving_landmarks):
        raise IkrError("give both --fixed-landmarks and --moving-landmarks, or neither")
    landmarks = (args.fixed_landmarks, args.moving_landmarks) if args.fixed_landmarks else None
    outdir = Path(args.output)
    workspace = Workspace(outdir, command="ikr register")
    with _ProgressBar("registering", enabled=not args.quiet) as progress:
        report = workspace.register(
            args.fixed,
            args.moving,
            _registration_config(args),
            fixed_mask=args.fixed_mask,
            moving_mask=args.moving_mask,
            landmarks=landmarks,
            initial=args.initial,
            fixed_series=args.fixed_series,
            moving_series=args.moving_series,
            overwrite=args.overwrite,
            check_memory=not args.force_memory,
            progress=progress,
        )
    _print_summary(report, outdir)
    return _strict_status(report, args.strict)


def _shared_data_root() -> Path:
    """../shared/data beside the checkout, or $IKR_SHARED_DATA."""
    return Path(os.environ.get("IKR_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def default_demo_ct() -> Path | None:
    """The shared thorax CT beside the checkout (or under $IKR_SHARED_DATA), when present."""
    path = _shared_data_root() / "ct" / "thorax_popi_T00_1p5mm.nii.gz"
    return path if path.is_file() else None


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a breathing-like case from a real CT (or the phantom), register it, print the figures."""
    from .io.images import read_image
    from .synthetic import make_case, write_case
    from .workspace import Workspace

    ct_path = Path(args.ct) if args.ct else default_demo_ct()
    if ct_path is not None:
        ct, source = read_image(ct_path), ct_path.name
    else:
        from .synthetic import make_phantom

        ct, source = make_phantom(seed=args.seed)[0], "procedural phantom"
    print(f"demo: a breathing-like deformation (seed {args.seed}) of {source}")
    case = make_case(ct, "breathing", args.seed, magnitude_mm=args.magnitude)
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    write_case(case, outdir / "case")
    inputs = {
        "fixed": str(outdir / "case" / "fixed.nii.gz"),
        "moving": str(outdir / "case" / "moving.nii.gz"),
    }
    workspace = Workspace(outdir / "registration", command="ikr demo")
    with _ProgressBar("registering", enabled=not args.quiet) as progress:
        report = workspace.register(
            case.fixed, case.moving, _registration_config(args), inputs=inputs,
            landmarks=(case.landmarks_fixed_lps, case.landmarks_moving_lps), overwrite=True,
            check_memory=not args.force_memory, progress=progress,
        )  # fmt: skip
    _print_summary(report, outdir / "registration")
    _demo_margin(case, outdir, workspace, args.seed)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    """Add or remove clicked pairs on a registration output folder and update every output."""
    from .workspace import Workspace

    outdir = Path(args.outdir)
    report = Workspace(outdir, command="ikr refine").refine(args.add, args.remove or [], args.match)
    for item in report["user_pairs"]:
        note = "; ".join(item["warnings"]) or "ok"
        print(f"pair {item['id']} ({item['label']}): residual {item['residual_mm']:.2f} mm, {note}")
    n_pairs = len(report["user_pairs"])
    print(f"field rebuilt in {report['refine_s']:.2f} s ({n_pairs} user pairs); outputs in {outdir}/")
    _warn_quality(report)
    return _strict_status(report, args.strict)


def cmd_margin(args: argparse.Namespace) -> int:
    """Minimal ablative margin of a tumour (pre-ablation) against an ablation zone (post-ablation)."""
    from .workspace import margin_files

    _check_thresholds(args.thresholds)
    figures = margin_files(
        args.tumour,
        args.ablation,
        args.transform,
        args.output,
        thresholds_mm=tuple(args.thresholds),
        include_phi=args.include_phi,
        pre_image_path=args.pre_image,
        post_image_path=args.post_image,
        tumour_label=args.tumour_label,
        ablation_label=args.ablation_label,
        uncertainty_path=args.uncertainty,
    )
    if "min_margin_p5_mm" in figures:
        print(
            f"minimal margin 5-95 %: {figures['min_margin_p5_mm']:.1f} .. {figures['min_margin_p95_mm']:.1f} mm;"
            f" P(< 0 mm) {figures['p_min_margin_below_0mm']:.2f}, P(< 5 mm) {figures['p_min_margin_below_5mm']:.2f}"
        )
    _print_margin(figures)
    print(f"report in {Path(args.output) / 'report.html'}")
    return 0


def _check_thresholds(thresholds: list[float]) -> None:
    """Refuse margin thresholds that are not finite numbers of mm between -50 and 50."""
    bad = [t for t in thresholds if not (np.isfinite(t) and -50.0 <= t <= 50.0)]
    if bad:
        raise IkrError(f"--thresholds {bad[0]}: a margin threshold must be a number of mm between -50 and 50")


def _print_margin(figures: dict) -> None:
    """Print the key margin figures for a person."""
    from .workspace import margin_lines

    for line in margin_lines(figures):
        print(line)


def _demo_margin(case: SynthCase, outdir: Path, workspace: Workspace, seed: int) -> None:
    """Place a tumour and an ablation zone in the demo case and report the margin through our field."""
    from .io.images import write_image
    from .synthetic import demo_tumour_and_zone

    liver = None
    names = (case.fixed_labels.meta.get("label_names", {}) if case.fixed_labels is not None else {}) or {}
    liver_values = [int(k) for k, v in names.items() if "liver" in str(v).lower()]
    if liver_values:
        liver = case.fixed_labels.with_array(np.isin(case.fixed_labels.array, liver_values).astype(np.uint8))
    tumour, zone, true_margin = demo_tumour_and_zone(case.fixed, case.true_field, liver, seed)
    write_image(tumour, outdir / "case" / "tumour_pre.nii.gz")
    write_image(zone, outdir / "case" / "ablation_post.nii.gz")
    figures = workspace.margin_report(
        outdir / "case" / "tumour_pre.nii.gz",
        outdir / "case" / "ablation_post.nii.gz",
        outdir / "margin",
        pre_image=outdir / "case" / "moving.nii.gz",
        post_image=outdir / "case" / "fixed.nii.gz",
        with_interval=False,
    )
    _print_margin(figures)
    error = figures["min_margin_mm"] - true_margin
    print(
        f"true minimal margin {true_margin:.1f} mm (error {error:+.1f} mm);"
        f" report in {outdir / 'margin' / 'report.html'}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train the learned kernel on synthetic deformations of real CTs (and phantoms)."""
    from .training import train_main

    data = Path(args.data) if args.data else _shared_data_root()
    with _ProgressBar("training", enabled=not args.quiet) as progress:
        result = train_main(
            Path(args.output),
            data_dir=data if data.is_dir() else None,
            quick=args.quick,
            seed=args.seed,
            steps=args.steps,
            heads=args.heads,
            threads=args.threads,
            progress=progress,
            command="ikr train " + " ".join(sys.argv[2:]),
        )
    print(f"wrote {args.output} and its model card; validation: {json.dumps(result.get('validation', {}))[:400]}")
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    """Train the learned feature encoder on synthetic deformations of the shared CTs."""
    from .training import default_encoder_config, train_encoder_main

    data = Path(args.data) if args.data else _shared_data_root()
    config = replace(default_encoder_config(data, args.seed), threads=args.threads)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    with _ProgressBar("training the encoder", enabled=not args.quiet) as progress:
        command = "ikr train-encoder " + " ".join(sys.argv[2:])
        result = train_encoder_main(Path(args.output), config, progress, command)
    print(f"wrote {args.output} and its model card; validation: {json.dumps(result['validation'])[:400]}")
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    """Where one clicked pair would reduce the expected error most (optionally near a tumour)."""
    from .workspace import Workspace

    workspace = Workspace.open(Path(args.outdir), command="ikr suggest")
    suggestions = workspace.suggest(args.n, near_mask=args.near_mask)
    for p, v in zip(suggestions.points_lps, suggestions.expected_error_mm, strict=True):
        print(f"click near ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) LPS mm: expected error {v:.1f} mm")
    path = workspace.write_suggestions(suggestions)
    print(f"{len(suggestions.points_lps)} suggestions in {path}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Register every case of a manifest (and measure margins) on a Dask cluster; summarise the cohort."""
    from .batch import batch_command

    _check_thresholds(args.thresholds)
    return batch_command(args)


def _add_registration_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `register` and `demo`: the RegistrationConfig fields of REGISTRATION_FLAGS, then the rest."""
    from .registration.config import add_registration_flags

    add_registration_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when the quality verdict is not ok")
    p.add_argument(
        "--force-memory", action="store_true", help="run even when the estimated peak memory exceeds the free memory"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `ikr` subcommand."""
    from .registration.config import HEADS

    parser = argparse.ArgumentParser(prog="ikr", description="Implicit kernel deformable CT registration")
    parser.add_argument("--version", action="version", version=f"ikr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe an image file or a DICOM folder")
    p.add_argument("path")
    p.add_argument("--series", help="SeriesInstanceUID to describe in a folder with several series")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("phantom", help="write a procedural CT phantom with labels")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("synth", help="make a synthetic registration case from a CT")
    p.add_argument("ct")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--family", default="breathing", choices=["breathing", "bspline", "local", "sliding"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--magnitude", type=float, default=None, help="mean displacement in mm")
    p.add_argument("--labels", default=None, help="label map carried along with the CT")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("register", help="register MOVING to FIXED (image files or DICOM folders)")
    p.add_argument("fixed")
    p.add_argument("moving")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--fixed-mask")
    p.add_argument("--moving-mask")
    p.add_argument("--fixed-landmarks", help="landmarks in the fixed image (CSV, .mrk.json, .fcsv, DIR-Lab .txt)")
    p.add_argument("--moving-landmarks", help="the matching landmarks in the moving image, same order")
    p.add_argument(
        "--initial",
        metavar="TRANSFORM",
        help="start transform, fixed -> moving, ITK convention (.h5/.tfm/.txt; rigid or affine); "
        "refined by --align unless --align none",
    )
    p.add_argument("--fixed-series", help="SeriesInstanceUID to use when FIXED is a DICOM folder with several series")
    p.add_argument("--moving-series", help="SeriesInstanceUID to use when MOVING is a DICOM folder with several series")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ikr result in the output folder")
    _add_registration_flags(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("refine", help="add or remove clicked pairs on an `ikr register` output folder")
    p.add_argument("outdir")
    p.add_argument("--add", nargs="+", metavar="FILE", help="a pair CSV, or fixed and moving point files")
    p.add_argument("--match", default="order", choices=["order", "label"], help="how to pair two point files")
    p.add_argument("--remove", type=int, action="append", metavar="ID", help="remove the user pair with this id")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when the quality verdict is not ok")
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("margin", help="minimal ablative margin and an HTML report")
    p.add_argument("--tumour", required=True, help="tumour mask on the pre-ablation (moving) image")
    p.add_argument("--ablation", required=True, help="ablation-zone mask on the post-ablation (fixed) image")
    p.add_argument("--transform", default=None, help="displacement field or ITK transform (default: identity)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 5.0], help="margin thresholds, mm")
    p.add_argument("--pre-image", default=None, help="the pre-ablation CT (checks the tumour mask's grid)")
    p.add_argument("--post-image", default=None, help="the post-ablation CT (overlay background)")
    p.add_argument("--tumour-label", type=int, default=None, help="label value of the tumour in a label map")
    p.add_argument("--ablation-label", type=int, default=None, help="label value of the zone in a label map")
    p.add_argument("--include-phi", action="store_true", help="show patient name and ID in the report")
    p.add_argument("--uncertainty", default=None, help="expected-error map (uncertainty.nii.gz): margin interval")
    p.set_defaults(func=cmd_margin)

    p = sub.add_parser("suggest", help="where a clicked pair would help most (from the expected-error map)")
    p.add_argument("outdir")
    p.add_argument("-n", type=int, default=5, help="number of suggestions")
    p.add_argument("--near-mask", default=None, help="suggest near this mask (fixed space), e.g. the tumour")
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("train", help="train the learned kernel (CPU: tens of minutes; never in CI)")
    p.add_argument("-o", "--output", required=True, help="weights file to write (.pt); the model card goes beside it")
    p.add_argument("--data", default=None, help="folder with ct/ (default: ../shared/data, else phantoms only)")
    p.add_argument("--quick", action="store_true", help="a tiny run on a phantom (seconds), for testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--heads", default="both", choices=HEADS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-encoder", help="train the learned feature encoder (CPU: minutes; never in CI)")
    p.add_argument("-o", "--output", required=True, help="weights file to write (.pt); the model card goes beside it")
    p.add_argument("--data", default=None, help="folder with ct/ (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_encoder)

    p = sub.add_parser("demo", help="register a synthetic breathing-like case and print the figures")
    p.add_argument("-o", "--output", default="ikr-demo")
    p.add_argument("--ct", default=None, help="CT to deform (default: the shared thorax CT, else the phantom)")
    p.add_argument("--magnitude", type=float, default=None, help="mean displacement in mm")
    _add_registration_flags(p)
    p.set_defaults(func=cmd_demo)

    _add_batch_parser(sub)
    return parser


def _add_batch_parser(sub: argparse._SubParsersAction) -> None:
    """The `ikr batch` subcommand: its own flags and the registration flags passed on to every case."""
    p = sub.add_parser("batch", help="register a cohort (manifest CSV) on a Dask cluster, resumable, with a summary")
    p.add_argument("manifest", help="CSV: case,fixed,moving[,fixed_landmarks,moving_landmarks,tumour,ablation,...]")
    p.add_argument("-o", "--output", required=True, help="folder for OUT/<case>/, batch.json and the summary")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: cores and memory)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="an existing Dask scheduler, tcp://host:8786")
    p.add_argument("--force", action="store_true", help="redo every case, also those finished before")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 5.0], help="margin thresholds, mm")
    _add_registration_flags(p)
    p.set_defaults(func=cmd_batch)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ikr`; bad input ends with a one-line error and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IkrError as err:
        print(f"ikr {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # a disk or permission problem met while writing: one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"ikr {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"ikr {args.command}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
