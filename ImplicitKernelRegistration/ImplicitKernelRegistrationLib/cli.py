"""The `ikr` command line: argument parsing, progress display and exit codes; no algorithms here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .core.errors import IkrError

if TYPE_CHECKING:
    from .core.correspondences import Correspondences
    from .core.fields import Field
    from .core.geometry import Image
    from .registration.alignment import Alignment
    from .registration.pipeline import RegistrationConfig
    from .registration.refine import RefinementSession
    from .synthetic.synth import SynthCase

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
    from .io.atomic import atomic_directory
    from .io.images import write_image
    from .io.segmentations import write_labels
    from .synthetic.phantom import make_phantom

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
    from .synthetic.synth import check_magnitude, make_case, write_case

    check_magnitude(args.magnitude)
    ct = read_image(Path(args.ct))
    ct.meta["path"] = str(args.ct)
    labels = read_labels(Path(args.labels), reference=ct)[0] if args.labels else None
    case = make_case(ct, args.family, args.seed, labels=labels, magnitude_mm=args.magnitude)
    write_case(case, Path(args.output))
    print(f"wrote a {args.family} case (seed {args.seed}) to {args.output}")
    return 0


def _registration_config(args: argparse.Namespace) -> RegistrationConfig:
    """The RegistrationConfig named by the command-line flags."""
    from .registration.pipeline import RegistrationConfig

    return RegistrationConfig(
        spacing_mm=args.spacing,
        alignment=args.align,
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
    initial: Alignment | None = None,
    force_memory: bool = False,
    replace: bool = False,
) -> dict:
    """Register, evaluate and write every output (`replace`: over an earlier result); return the report."""
    fallback_start = time.time()  # the command's start where /proc cannot tell the process's
    from .core.fields import warp_image
    from .io.outputs import check_output_folder, write_registration
    from .registration.memory import check_memory
    from .registration.pipeline import register
    from .review.quality import assess
    from .review.report import command_figures, field_quality, landmark_errors
    from .review.uncertainty import expected_error_map

    check_output_folder(outdir)
    if not force_memory:
        check_memory(fixed.geometry, config.spacing_mm)
    with _ProgressBar("registering", enabled=not quiet) as progress:
        result = register(fixed, moving, config, fixed_mask, moving_mask, progress, initial)
    report = dict(result.report)
    report["peak_memory_registration_mb"] = report["peak_memory_mb"]
    report.update(field_quality(result.field))
    if landmarks is not None:
        report.update(landmark_errors(result.field, *landmarks))
    report["inputs"] = inputs
    report["quality"] = assess(
        fixed, moving, result.field, result.correspondences, result.alignment, report.get("n_keypoints_consistent")
    )
    start = time.perf_counter()
    uncertainty = expected_error_map(result)
    report["uncertainty_s"] = round(time.perf_counter() - start, 3)
    warped = warp_image(moving, result.field)
    session = {
        "inputs": inputs,
        "input_files": _input_fingerprints(inputs),
        "config": config.to_dict(),
        "working_geometry": result.working_geometry.to_dict(),
        "alignment": result.alignment.to_dict(),
        "user": {"next_id": 1, "pairs": []},
    }
    session["registration_id"] = report["registration_id"] = uuid.uuid4().hex

    def final_figures() -> dict:
        """The whole command's time and peak memory, once every other output is written."""
        figures = command_figures(report["device"], fallback_start)
        report.update(figures)
        return figures

    corr = result.correspondences
    write_registration(outdir, result.field, warped, corr, report, session, uncertainty, final_figures, replace=replace)
    return report


def _input_fingerprints(inputs: dict) -> dict:
    """Path, size and SHA-256 of the fixed and moving inputs, tying the session to them."""
    from .io.guard import fingerprint

    return {role: fingerprint(inputs[role]) for role in ("fixed", "moving") if Path(inputs[role]).exists()}


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
    from .io.guard import check_writable, folder_lock

    outdir = Path(args.output)
    check_writable(outdir)
    with folder_lock(outdir, command="ikr register"):
        _remove_stale(outdir, "ikr register")
        previous_pairs = _previous_user_pairs(outdir, args.overwrite)
        fixed, fixed_series = _read_input_image(args.fixed, args.fixed_series, "fixed")
        moving, moving_series = _read_input_image(args.moving, args.moving_series, "moving")
        fixed_mask = _read_mask(args.fixed_mask) if args.fixed_mask else None
        moving_mask = _read_mask(args.moving_mask) if args.moving_mask else None
        landmarks = _read_landmark_pair(args.fixed_landmarks, args.moving_landmarks, fixed, moving)
        inputs = {"fixed": str(Path(args.fixed).resolve()), "moving": str(Path(args.moving).resolve())}
        inputs.update({k: v for k, v in (("fixed_series", fixed_series), ("moving_series", moving_series)) if v})
        if landmarks is not None:
            inputs["fixed_landmarks"] = str(Path(args.fixed_landmarks).resolve())
            inputs["moving_landmarks"] = str(Path(args.moving_landmarks).resolve())
        initial = None
        if args.initial:
            from .registration.alignment import read_initial_transform

            initial = read_initial_transform(args.initial)
            inputs["initial"] = str(Path(args.initial).resolve())
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
            initial,
            args.force_memory,
            replace=previous_pairs is not None,
        )
        _keep_previous_pairs(outdir, previous_pairs)
    _print_summary(report, outdir)
    return _strict_status(report, args.strict)


def _remove_stale(outdir: Path, command: str) -> None:
    """Remove temporaries that a killed run left in or beside `outdir` (call under the folder lock); say so."""
    from .io.guard import remove_stale_temporaries

    removed = remove_stale_temporaries(outdir)
    if removed:
        print(f"{command}: removed {removed} temporary files left by an interrupted run in {outdir}", file=sys.stderr)


def _previous_user_pairs(outdir: Path, overwrite: bool) -> list | None:
    """Refuse to register over an earlier ikr result unless --overwrite; return its clicked pairs (None: no result)."""
    from .io.outputs import check_output_folder

    if not check_output_folder(outdir):
        return None
    try:
        saved = json.loads((outdir / "session.json").read_text(encoding="utf-8"))
        pairs = list(saved.get("user", {}).get("pairs", []))
    except (OSError, ValueError, AttributeError, TypeError):
        pairs = []
    if not overwrite:
        clicked = f" and {len(pairs)} clicked pairs" if pairs else ""
        raise IkrError(f"holds an earlier ikr result{clicked}; pass --overwrite to replace it", outdir)
    return pairs


PREVIOUS_PAIRS_FILE = "user_pairs_before_overwrite.csv"


def _keep_previous_pairs(outdir: Path, pairs: list | None) -> None:
    """Write the clicked pairs of the result just replaced as a pair CSV `ikr refine --add` reads; say so."""
    if not pairs:
        return
    from .io.atomic import write_text_atomic

    lines = ["fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,label"]
    for p in pairs:
        label = str(p.get("label", "")).replace(",", " ").replace("\n", " ")
        lines.append(",".join(f"{v:.4f}" for v in (*p["fixed_lps"], *p["moving_lps"])) + f",{label}")
    path = write_text_atomic(outdir / PREVIOUS_PAIRS_FILE, "\n".join(lines) + "\n")
    print(
        f"ikr register: the {len(pairs)} clicked pairs of the replaced result are in {path};"
        f" apply them with: ikr refine {outdir} --add {path}",
        file=sys.stderr,
    )


def _read_input_image(path: str, series_uid: str | None, role: str) -> tuple[Image, dict | None]:
    """Read the fixed or moving image; for a DICOM folder, say which series was chosen and why."""
    from .io.images import read_image
    from .registration.preprocess import check_voxel_spacing

    image = read_image(Path(path), series_uid=series_uid, choose_series=True)
    check_voxel_spacing(image, path)
    choice = image.meta.get("series_choice")
    if not choice:
        return image, None
    print(f"ikr register: {role} image: {choice['why']}", file=sys.stderr)
    return image, choice


def _read_mask(path: str) -> Image:
    """Read a fixed or moving mask and check that it is a mask (0/1 or labels), not an image."""
    from .io.images import read_mask

    return read_mask(Path(path))


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
    from .synthetic.synth import make_case, write_case

    ct_path = Path(args.ct) if args.ct else default_demo_ct()
    if ct_path is not None:
        ct, source = read_image(ct_path), ct_path.name
    else:
        from .synthetic.phantom import make_phantom

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
        landmarks=landmarks, quiet=args.quiet, force_memory=args.force_memory,
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
    from .io.guard import check_writable, folder_lock
    from .io.images import check_readable

    outdir = Path(args.outdir)
    check_readable(outdir)
    check_writable(outdir)
    pairs = _read_user_pairs(args.add, args.match) if args.add else None
    with folder_lock(outdir, command="ikr refine"):
        _remove_stale(outdir, "ikr refine")
        session, report = _refine_under_lock(outdir, args.remove or [], pairs)
    for item in report["user_pairs"]:
        note = "; ".join(item["warnings"]) or "ok"
        print(f"pair {item['id']} ({item['label']}): residual {item['residual_mm']:.2f} mm, {note}")
    print(f"field rebuilt in {report['refine_s']:.2f} s ({len(session.pairs)} user pairs); outputs in {outdir}/")
    _warn_quality(report)
    return _strict_status(report, args.strict)


def _open_saved_registration(outdir: Path) -> tuple[dict, dict, Image, Image, Correspondences]:
    """The checked session, report, inputs and automatic correspondences of an output folder."""
    from .core.correspondences import AUTOMATIC
    from .io.guard import check_fingerprint
    from .io.images import read_image
    from .io.outputs import OUTPUT_FILES, interrupted_generation, read_correspondences_csv, read_report, read_session

    saved = read_session(outdir)
    report = read_report(outdir)
    if saved.get("registration_id") and report.get("registration_id") not in (None, saved["registration_id"]):
        raise IkrError("session.json and report.json come from different registrations: register again", outdir)
    journal = interrupted_generation(outdir)
    if journal is not None:
        print(
            f"ikr refine: the last write of {outdir} was interrupted; rebuilding every output from session.json"
            f" (generation {saved.get('generation', '?')})",
            file=sys.stderr,
        )
    for role, recorded in (saved.get("input_files") or {}).items():
        check_fingerprint(role, recorded)
    everything = read_correspondences_csv(
        outdir / OUTPUT_FILES["correspondences"], _expected_correspondences(saved, journal)
    )
    fixed = read_image(Path(saved["inputs"]["fixed"]), series_uid=_series_uid(saved, "fixed"))
    moving = read_image(Path(saved["inputs"]["moving"]), series_uid=_series_uid(saved, "moving"))
    return saved, report, fixed, moving, everything.subset(everything.source == AUTOMATIC)


def _expected_correspondences(saved: dict, journal: dict | None) -> dict | None:
    """What correspondences.csv must match: session.json's record, or the interrupted write's."""
    expected = saved.get("correspondences")
    if not expected or journal is None:
        return expected
    return {**expected, "also_sha256": journal.get("correspondences_sha256")}


def _series_uid(saved: dict, role: str) -> str | None:
    """The DICOM series a registration used for one input (None for image files)."""
    choice = saved["inputs"].get(f"{role}_series")
    return choice.get("uid") if isinstance(choice, dict) else None


def _refine_under_lock(outdir: Path, remove: list[int], pairs: tuple | None) -> tuple[RefinementSession, dict]:
    """Apply removals and clicked pairs, compute every output in memory, then write them (session last)."""
    from .core.fields import warp_image
    from .io.outputs import write_registration
    from .registration.refine import check_moving_points, open_session
    from .review.quality import assess
    from .review.report import field_quality
    from .review.uncertainty import expected_error_map

    saved, report, fixed, moving, automatic = _open_saved_registration(outdir)
    if pairs is not None:
        check_moving_points(pairs[1], moving.geometry)
    start = time.perf_counter()
    session = open_session(fixed, saved, automatic, moving)
    opened_s = time.perf_counter() - start
    start = time.perf_counter()
    for pair_id in remove:
        session.remove_correspondence(pair_id)
    if pairs is not None:
        session.add_correspondences(pairs[0], pairs[1], list(pairs[2]))
    refine_s = time.perf_counter() - start
    saved["user"] = session.to_dict()
    report.update(field_quality(session.field))
    report.update({"refine_s": round(refine_s, 3), "session_open_s": round(opened_s, 3)})
    report["user_pairs"] = session.feedback()
    report["quality"] = assess(
        fixed, moving, session.field, automatic.concat(session.user_correspondences()), session.model.alignment
    )
    if "fixed_landmarks" in saved["inputs"]:
        landmarks = _read_landmark_pair(
            saved["inputs"]["fixed_landmarks"], saved["inputs"]["moving_landmarks"], fixed, moving
        )
        report.update(_landmark_report(session.field, landmarks))
    warped = warp_image(moving, session.field)
    uncertainty = expected_error_map(session)
    corr = automatic.concat(session.user_correspondences())
    write_registration(outdir, session.field, warped, corr, report, saved, uncertainty)
    return session, report


def _landmark_report(field: Field, landmarks: tuple) -> dict:
    """TRE before and after for landmark pairs."""
    from .review.report import landmark_errors

    return landmark_errors(field, *landmarks)


def cmd_margin(args: argparse.Namespace) -> int:
    """Minimal ablative margin of a tumour (pre-ablation) against an ablation zone (post-ablation)."""
    from .review.margin_report import run_margin

    _check_thresholds(args.thresholds)
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


def _check_thresholds(thresholds: list[float]) -> None:
    """Refuse margin thresholds that are not finite numbers of mm between -50 and 50."""
    bad = [t for t in thresholds if not (np.isfinite(t) and -50.0 <= t <= 50.0)]
    if bad:
        raise IkrError(f"--thresholds {bad[0]}: a margin threshold must be a number of mm between -50 and 50")


def _print_margin(figures: dict) -> None:
    """Print the key margin figures for a person."""
    from .review.margin import fraction_key

    point = ", ".join(f"{v:.1f}" for v in figures["min_margin_point_lps"])
    print(f"minimal ablative margin {figures['min_margin_mm']:.1f} mm at ({point}) LPS mm")
    surface = ", ".join(
        f"margin >= {t:g} mm {100 * figures[fraction_key(t)]:.0f} %"
        for t in figures.get("thresholds_mm", [])
        if fraction_key(t) in figures
    )
    print(
        f"coverage {figures['coverage_percent']:.1f} %, tumour volume outside the zone "
        f"{figures['outside_volume_ml']:.2f} ml; tumour surface with {surface or 'no threshold asked'}"
    )


def _demo_margin(case: SynthCase, outdir: Path, registration_dir: Path, seed: int) -> None:
    """Place a tumour and an ablation zone in the demo case and report the margin through our field."""
    from .io.images import write_image
    from .review.margin import demo_tumour_and_zone
    from .review.margin_report import run_margin

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
    from .training.train import train_main

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
    from .training.train_encoder import default_encoder_config, train_encoder_main

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

    from .core.geometry import Image
    from .io.atomic import write_text_atomic
    from .io.images import read_image
    from .io.outputs import OUTPUT_FILES, read_session
    from .registration.preprocess import body_mask
    from .review.uncertainty import suggest_clicks

    outdir = Path(args.outdir)
    saved = read_session(outdir)
    _refuse_interrupted(outdir)
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


def _refuse_interrupted(outdir: Path) -> None:
    """Refuse to read a folder whose last write was interrupted (its files may mix two generations)."""
    from .io.outputs import interrupted_generation

    if interrupted_generation(outdir) is not None:
        raise IkrError(f"its last write was interrupted; run `ikr refine {outdir}` to rebuild its outputs", outdir)


def cmd_batch(args: argparse.Namespace) -> int:
    """Register every case of a manifest (and measure margins) on a Dask cluster; summarise the cohort."""
    from .batch import batch_command

    _check_thresholds(args.thresholds)
    return batch_command(args)


def _add_registration_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `register` and `demo`."""
    p.add_argument("--spacing", type=float, default=2.0, help="working grid spacing in mm (default 2)")
    p.add_argument(
        "--align",
        default="rigid",
        choices=["rigid", "affine", "none"],
        help="automatic initial alignment before the deformable stage (default rigid; affine: rigid, then affine)",
    )
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
    p.add_argument("--strict", action="store_true", help="exit with status 3 when the quality verdict is not ok")
    p.add_argument(
        "--force-memory", action="store_true", help="run even when the estimated peak memory exceeds the free memory"
    )


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
