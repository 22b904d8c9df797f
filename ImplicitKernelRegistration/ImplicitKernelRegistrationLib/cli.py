"""The `ikr` command line: argument parsing, progress display and exit codes; no algorithms here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .errors import IkrError

if TYPE_CHECKING:
    from .fields import Field
    from .geometry import Image
    from .pipeline import RegistrationConfig
    from .synth import SynthCase

EXIT_BAD_INPUT = 2
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
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a procedural CT phantom and its label map."""
    from .io.atomic import atomic_directory
    from .io.images import write_image
    from .io.segmentations import write_labels
    from .phantom import make_phantom

    ct, labels, names = make_phantom(seed=args.seed)
    out = Path(args.output)
    with atomic_directory(out) as tmp:
        write_image(ct, tmp / "phantom_ct.nii.gz")
        write_labels(labels, names, tmp / "phantom_labels.seg.nrrd")
    print(f"wrote {out / 'phantom_ct.nii.gz'} and {out / 'phantom_labels.seg.nrrd'}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    """Deform a CT with a known synthetic field and write the case."""
    from .io.images import read_image
    from .io.segmentations import read_labels
    from .synth import make_case, write_case

    ct = read_image(Path(args.ct))
    labels = read_labels(Path(args.labels), reference=ct)[0] if args.labels else None
    case = make_case(ct, args.family, args.seed, labels=labels, magnitude_mm=args.magnitude)
    write_case(case, Path(args.output))
    print(f"wrote a {args.family} case (seed {args.seed}) to {args.output}")
    return 0


def _registration_config(args: argparse.Namespace) -> RegistrationConfig:
    """The RegistrationConfig named by the command-line flags."""
    from .pipeline import RegistrationConfig

    return RegistrationConfig(
        spacing_mm=args.spacing,
        kernel=args.kernel,
        heads=args.heads,
        weights=args.weights,
        features=args.features,
        encoder_weights=args.encoder_weights,
        max_keypoints=args.max_keypoints,
        device=args.device,
        seed=args.seed,
    )


def _run_registration(
    fixed: Image,
    moving: Image,
    outdir: Path,
    config: RegistrationConfig,
    inputs: dict,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    landmarks: tuple | None = None,
    quiet: bool = False,
) -> dict:
    """Register, evaluate and write every output; return the report."""
    from .fields import warp_image
    from .io.outputs import check_output_folder, write_registration
    from .pipeline import register
    from .report import field_quality, landmark_errors
    from .uncertainty import expected_error_map

    check_output_folder(outdir)
    with _ProgressBar("registering", enabled=not quiet) as progress:
        result = register(fixed, moving, config, fixed_mask, moving_mask, progress)
    report = dict(result.report)
    report.update(field_quality(result.field))
    if landmarks is not None:
        report.update(landmark_errors(result.field, *landmarks))
    report["inputs"] = inputs
    start = time.perf_counter()
    uncertainty = expected_error_map(result)
    report["uncertainty_s"] = round(time.perf_counter() - start, 3)
    warped = warp_image(moving, result.field)
    session = {
        "inputs": inputs,
        "config": config.to_dict(),
        "working_geometry": result.working_geometry.to_dict(),
        "user": {"next_id": 1, "pairs": []},
    }
    write_registration(outdir, result.field, warped, result.correspondences, report, session, uncertainty)
    return report


def _print_summary(report: dict, outdir: Path) -> None:
    """Print the report's key figures for a person."""
    if "tre_mm" in report:
        b, a = report["tre_before_mm"], report["tre_mm"]
        print(f"TRE before: {b['mean']:.2f} +- {b['sd']:.2f} mm (p90 {b['p90']:.2f}, n={b['n']})")
        print(f"TRE after:  {a['mean']:.2f} +- {a['sd']:.2f} mm (p90 {a['p90']:.2f}, max {a['max']:.2f})")
    print(f"SDlogJ {report['sdlogj']:.4f}, folding {report['folding_percent']:.4f} %")
    print(
        f"runtime {report['runtime_s']:.1f} s on {report['device']}, peak memory {report['peak_memory_mb']:.0f} MB,"
        f" {report['n_keypoints']} keypoints"
    )
    print(f"outputs in {outdir}/")


def _read_landmark_pair(fixed_path: str | None, moving_path: str | None, fixed: Image, moving: Image) -> tuple | None:
    """Fixed and moving landmark arrays (LPS mm) when both files are given."""
    if not fixed_path and not moving_path:
        return None
    if not (fixed_path and moving_path):
        raise IkrError("give both --fixed-landmarks and --moving-landmarks, or neither")
    from .io.points import pair_points, read_points

    f = read_points(Path(fixed_path), fixed.geometry)
    m = read_points(Path(moving_path), moving.geometry)
    fixed_lps, moving_lps, _ = pair_points(f, m, by="order")
    return fixed_lps, moving_lps


def cmd_register(args: argparse.Namespace) -> int:
    """Register MOVING to FIXED and write the outputs."""
    from .io.images import read_image

    fixed = read_image(Path(args.fixed))
    moving = read_image(Path(args.moving))
    fixed_mask = read_image(Path(args.fixed_mask)) if args.fixed_mask else None
    moving_mask = read_image(Path(args.moving_mask)) if args.moving_mask else None
    landmarks = _read_landmark_pair(args.fixed_landmarks, args.moving_landmarks, fixed, moving)
    inputs = {"fixed": str(Path(args.fixed).resolve()), "moving": str(Path(args.moving).resolve())}
    if landmarks is not None:
        inputs["fixed_landmarks"] = str(Path(args.fixed_landmarks).resolve())
        inputs["moving_landmarks"] = str(Path(args.moving_landmarks).resolve())
    outdir = Path(args.output)
    report = _run_registration(
        fixed,
        moving,
        outdir,
        _registration_config(args),
        inputs,
        fixed_mask,
        moving_mask,
        landmarks,
        args.quiet,
    )
    _print_summary(report, outdir)
    return 0


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
    from .synth import make_case, write_case

    ct_path = Path(args.ct) if args.ct else default_demo_ct()
    if ct_path is not None:
        ct, source = read_image(ct_path), ct_path.name
    else:
        from .phantom import make_phantom

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
    landmarks = (case.landmarks_fixed_lps, case.landmarks_moving_lps)
    report = _run_registration(
        case.fixed, case.moving, outdir / "registration", _registration_config(args), inputs,
        landmarks=landmarks, quiet=args.quiet,
    )  # fmt: skip
    _print_summary(report, outdir / "registration")
    _demo_margin(case, outdir, outdir / "registration", args.seed)
    return 0


def _read_user_pairs(paths: list[str], match: str) -> tuple:
    """Clicked pairs from a pair CSV, or from two point files (fixed, moving) matched by order or label."""
    from .io.points import pair_points, read_point_pairs, read_points

    if len(paths) == 1:
        fixed, moving = read_point_pairs(Path(paths[0]))
    elif len(paths) == 2:
        fixed, moving = read_points(Path(paths[0])), read_points(Path(paths[1]))
    else:
        raise IkrError("--add takes a pair CSV, or a fixed and a moving point file")
    return pair_points(fixed, moving, by=match)


def cmd_refine(args: argparse.Namespace) -> int:
    """Add or remove clicked pairs on a registration output folder and update every output."""
    from .correspondences import AUTOMATIC
    from .fields import warp_image
    from .io.images import read_image
    from .io.outputs import OUTPUT_FILES, read_correspondences_csv, read_session, write_registration, write_session
    from .refine import open_session
    from .report import field_quality
    from .uncertainty import expected_error_map

    outdir = Path(args.outdir)
    saved = read_session(outdir)
    pairs = _read_user_pairs(args.add, args.match) if args.add else None
    fixed = read_image(Path(saved["inputs"]["fixed"]))
    moving = read_image(Path(saved["inputs"]["moving"]))
    everything = read_correspondences_csv(outdir / OUTPUT_FILES["correspondences"])
    automatic = everything.subset(everything.source == AUTOMATIC)
    start = time.perf_counter()
    session = open_session(fixed, saved, automatic, moving)
    opened_s = time.perf_counter() - start
    start = time.perf_counter()
    for pair_id in args.remove or []:
        session.remove_correspondence(pair_id)
    if pairs is not None:
        session.add_correspondences(pairs[0], pairs[1], list(pairs[2]))
    refine_s = time.perf_counter() - start
    saved["user"] = session.to_dict()
    write_session(outdir, saved, automatic.concat(session.user_correspondences()))  # the clicks are safe first
    report = json.loads((outdir / OUTPUT_FILES["report"]).read_text(encoding="utf-8"))
    report.update(field_quality(session.field))
    report.update({"refine_s": round(refine_s, 3), "session_open_s": round(opened_s, 3)})
    report["user_pairs"] = session.feedback()
    if "fixed_landmarks" in saved["inputs"]:
        landmarks = _read_landmark_pair(
            saved["inputs"]["fixed_landmarks"], saved["inputs"]["moving_landmarks"], fixed, moving
        )
        report.update(_landmark_report(session.field, landmarks))
    warped = warp_image(moving, session.field)
    uncertainty = expected_error_map(session)
    corr = automatic.concat(session.user_correspondences())
    write_registration(outdir, session.field, warped, corr, report, saved, uncertainty)
    for item in report["user_pairs"]:
        note = "; ".join(item["warnings"]) or "ok"
        print(f"pair {item['id']} ({item['label']}): residual {item['residual_mm']:.2f} mm, {note}")
    print(f"field rebuilt in {refine_s:.2f} s ({len(session.pairs)} user pairs); outputs in {outdir}/")
    return 0


def _landmark_report(field: Field, landmarks: tuple) -> dict:
    """TRE before and after for landmark pairs."""
    from .report import landmark_errors

    return landmark_errors(field, *landmarks)


def cmd_margin(args: argparse.Namespace) -> int:
    """Minimal ablative margin of a tumour (pre-ablation) against an ablation zone (post-ablation)."""
    from .margin_report import run_margin

    figures = run_margin(
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


def _print_margin(figures: dict) -> None:
    """Print the key margin figures for a person."""
    point = ", ".join(f"{v:.1f}" for v in figures["min_margin_point_lps"])
    print(f"minimal ablative margin {figures['min_margin_mm']:.1f} mm at ({point}) LPS mm")
    print(
        f"coverage {figures['coverage_percent']:.1f} %, tumour volume outside the zone "
        f"{figures['outside_volume_ml']:.2f} ml, surface with margin >= 5 mm "
        f"{100 * figures['surface_fraction_ge_5mm']:.0f} %"
    )


def _demo_margin(case: SynthCase, outdir: Path, registration_dir: Path, seed: int) -> None:
    """Place a tumour and an ablation zone in the demo case and report the margin through our field."""
    from .io.images import write_image
    from .margin import demo_tumour_and_zone
    from .margin_report import run_margin

    liver = None
    names = (case.fixed_labels.meta.get("label_names", {}) if case.fixed_labels is not None else {}) or {}
    liver_values = [int(k) for k, v in names.items() if "liver" in str(v).lower()]
    if liver_values:
        liver = case.fixed_labels.with_array(np.isin(case.fixed_labels.array, liver_values).astype(np.uint8))
    tumour, zone, true_margin = demo_tumour_and_zone(case.fixed, case.true_field, liver, seed)
    write_image(tumour, outdir / "case" / "tumour_pre.nii.gz")
    write_image(zone, outdir / "case" / "ablation_post.nii.gz")
    figures = run_margin(
        outdir / "case" / "tumour_pre.nii.gz",
        outdir / "case" / "ablation_post.nii.gz",
        registration_dir / "displacement.nii.gz",
        outdir / "margin",
        pre_image_path=outdir / "case" / "moving.nii.gz",
        post_image_path=outdir / "case" / "fixed.nii.gz",
    )
    _print_margin(figures)
    error = figures["min_margin_mm"] - true_margin
    print(
        f"true minimal margin {true_margin:.1f} mm (error {error:+.1f} mm);"
        f" report in {outdir / 'margin' / 'report.html'}"
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train the learned kernel on synthetic deformations of real CTs (and phantoms)."""
    from .train import train_main

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
    from .train_encoder import default_encoder_config, train_encoder_main

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
    from scipy import ndimage

    from .geometry import Image
    from .io.atomic import write_text_atomic
    from .io.images import read_image
    from .io.outputs import OUTPUT_FILES, read_session
    from .preprocess import body_mask
    from .uncertainty import suggest_clicks

    outdir = Path(args.outdir)
    saved = read_session(outdir)
    path = outdir / OUTPUT_FILES["uncertainty"]
    if not path.is_file():
        raise IkrError("this output folder has no expected-error map (made by an older version: register again)", path)
    error = read_image(path)
    fixed = read_image(Path(saved["inputs"]["fixed"]))
    body = Image(body_mask(fixed).astype(np.uint8), fixed.geometry)
    near = read_image(Path(args.near_mask)) if args.near_mask else None
    points = suggest_clicks(error, args.n, near_mask=near, region=body)
    index = error.geometry.lps_to_index(points.reshape(-1, 3))
    values = ndimage.map_coordinates(error.array.astype(np.float64), index[:, ::-1].T, order=1)
    lines = ["x,y,z,expected_error_mm"]
    for p, v in zip(points.reshape(-1, 3), values, strict=True):
        lines.append(f"{p[0]:.2f},{p[1]:.2f},{p[2]:.2f},{v:.2f}")
        print(f"click near ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}) LPS mm: expected error {v:.1f} mm")
    write_text_atomic(outdir / "suggestions.csv", "\n".join(lines) + "\n")
    print(f"{len(values)} suggestions in {outdir / 'suggestions.csv'}")
    return 0


def _add_registration_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `register` and `demo`."""
    p.add_argument("--spacing", type=float, default=2.0, help="working grid spacing in mm (default 2)")
    p.add_argument("--kernel", default="learned", choices=["learned", "tps", "gaussian"])
    p.add_argument("--heads", default="both", choices=["both", "spatial", "semantic"])
    p.add_argument("--weights", default=None, help="learned kernel weights (default: the shipped ones)")
    p.add_argument(
        "--features", default="mind", choices=["mind", "learned"], help="matching features: MIND-SSC or the encoder"
    )
    p.add_argument("--encoder-weights", default=None, help="learned encoder weights (default: the shipped ones)")
    p.add_argument("--max-keypoints", type=int, default=2048)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every `ikr` subcommand."""
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
    _add_registration_flags(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("refine", help="add or remove clicked pairs on an `ikr register` output folder")
    p.add_argument("outdir")
    p.add_argument("--add", nargs="+", metavar="FILE", help="a pair CSV, or fixed and moving point files")
    p.add_argument("--match", default="order", choices=["order", "label"], help="how to pair two point files")
    p.add_argument("--remove", type=int, action="append", metavar="ID", help="remove the user pair with this id")
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
    p.add_argument("--heads", default="both", choices=["both", "spatial", "semantic"])
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ikr`; bad input ends with a one-line error and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IkrError as err:
        print(f"ikr {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"ikr {args.command}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
