"""Calibration benchmark of the expected-error map (issues 12, 17); `--fit` also fits and commits its parameters.

    .venv/bin/python bench/uncertainty.py --fit            # fit on the training cases, write uncertainty_v1.json + .md
    .venv/bin/python bench/uncertainty.py --set independent --samples 0 --card   # the independent generator's cases
    .venv/bin/python bench/uncertainty.py --card           # the held-out synth cases (with margin intervals)
    .venv/bin/python bench/uncertainty.py --select --compare log_flow,log_residual   # choose features (synth only)

Training cases are seeded synthetic deformations (synth.make_case, the project's training generator) of
the abdomen CT (breathing, bspline, local), registered with the learned kernel at a 3 mm working grid.
Evaluation: the held-out synth cases (the liver-slab CT, every family, and the family `sliding`), or
(`--set independent`) the cases of bench/eval_generator.py with the seeds of `bench/run.py --set
independent` (never used for fitting). Per case: Spearman of expected vs true error over landmarks and
random body points, coverage of the 90 % interval, TRE reduction near a demo tumour from 5 suggested vs
5 random clicks (with their true matches), whether the margin interval holds the true-warp margin, and
the map's cost vs the registration's. The map is given the moving image (its image features).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from cases import ABDOMEN, INDEPENDENT_CASES, LIVER, CaseSpec, EvalSpec, _labels_for, load_case
from scipy import ndimage, stats

from ImplicitKernelRegistrationLib.core.fields import sample_field
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.io.atomic import write_text_atomic
from ImplicitKernelRegistrationLib.io.images import read_image
from ImplicitKernelRegistrationLib.io.resources import KERNEL_WEIGHTS
from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.registration.refine import session_from_result
from ImplicitKernelRegistrationLib.review.uncertainty import (
    DEFAULT_PARAMS,
    FEATURE_NAMES,
    UncertaintyModel,
    expected_error_at,
    expected_error_map,
    fit_uncertainty,
    load_uncertainty_model,
    margin_interval,
    point_features,
    save_uncertainty_model,
    suggest_clicks,
)
from ImplicitKernelRegistrationLib.synthetic.synth import make_case
from ImplicitKernelRegistrationLib.synthetic.tumour import ball_occupancy, demo_tumour_and_zone

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "bench" / "work"
SEED = 0
TRAIN = (
    CaseSpec(ABDOMEN, "breathing", 0),
    CaseSpec(ABDOMEN, "bspline", 0),
    CaseSpec(ABDOMEN, "local", 0, 4.0),
    CaseSpec(ABDOMEN, "bspline", 1),
)
HELD_OUT = (
    CaseSpec(LIVER, "bspline", 0),
    CaseSpec(LIVER, "breathing", 1),
    CaseSpec(LIVER, "local", 0, 4.0),
    CaseSpec(LIVER, "sliding", 0),
    CaseSpec(ABDOMEN, "sliding", 0),
)
N_BODY_POINTS = 300
# The shipped model's inputs (review/uncertainty.py FEATURE_NAMES holds every candidate, the cache keeps them all):
# the Lucas-Kanade offsets left between the fixed and the warped moving image at two window sizes (what the images
# show is left), the residual's length (how much the images had to correct the kernel field there) and the distance
# to the K-th nearest key (how sparse the keys are). Chosen by leave-one-case-out Spearman on the training cases
# and checked on the held-out synth cases' points (`--select`; synth only, session 7): LOCO min / mean 0.61 / 0.64
# and held-out min / mean 0.47 / 0.68, against 0.51 / 0.62 and 0.42 / 0.62 for the offsets alone (session 6).
MODEL_FEATURES = ("bias", "log_flow", "log_flow_coarse", "log_residual", "log_kth")
# Without the moving image (a caller that cannot give it): the key features of v1.
WITHOUT_IMAGE = ("bias", "log_loo", "log_nearest", "log_kth", "unconfidence", "log_gradient")
REGION_MM = 30.0
# Keep the shipped key-feature model (session 4's fit, marked by a `note` in its metadata) instead of its refit:
# refitted on the engine with the residual, its coefficients lost their meaning (session 6, model card).
KEEP_WITHOUT_IMAGE = True


# The independent generator's cases (bench/eval_generator.py, the seeds of `run.py --set independent`):
# evaluation only, never fitted on. The 1.5 mm thorax last: it costs most.
INDEPENDENT = tuple(sorted(INDEPENDENT_CASES, key=lambda s: s.ct.startswith("thorax")))


def make(spec: CaseSpec | EvalSpec):
    """The case of a spec: synth cases in memory, independent ones built once under bench/work/cases."""
    if isinstance(spec, EvalSpec):
        return load_case(spec.build(DATA, WORK))
    ct = read_image(DATA / "ct" / spec.ct)
    return make_case(ct, spec.family, spec.seed, labels=_labels_for(spec, DATA), magnitude_mm=spec.magnitude_mm)


def run_case(spec: CaseSpec | EvalSpec) -> tuple:
    """Make the case and register it (learned kernel, 3 mm working grid); returns case, result, seconds."""
    case = make(spec)
    start = time.perf_counter()
    result = register(case.fixed, case.moving, RegistrationConfig(spacing_mm=3.0, device="cpu", seed=SEED))
    return case, result, time.perf_counter() - start


def true_errors(case, field, points: np.ndarray) -> np.ndarray:
    """|field - true field| (mm) at fixed points."""
    return np.linalg.norm(sample_field(field, points) - sample_field(case.true_field, points), axis=1)


def body_points(case, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random voxel centres (LPS) of the fixed image's body, away from the border."""
    body = body_mask(case.fixed)
    zyx = np.argwhere(body)
    pick = zyx[rng.choice(len(zyx), size=min(n, len(zyx)), replace=False)]
    return case.fixed.geometry.index_to_lps(pick[:, ::-1].astype(float))


def training_points(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate feature (N, len(FEATURE_NAMES)) and the true error (N,) at a training case's points.

    Cached under bench/work/uncertainty/ by case name: `--fit` clears the cache first (the engine may
    have changed) unless --reuse is given.
    """
    cache = WORK / "uncertainty" / f"{spec.name}.npz"
    if cache.exists():
        data = np.load(cache)
        if tuple(data["names"]) == FEATURE_NAMES:
            return data["x"], data["y"]
    case, result, _ = run_case(spec)
    pts = np.concatenate([case.landmarks_fixed_lps, body_points(case, N_BODY_POINTS, np.random.default_rng(SEED))])
    x = point_features(result, pts, moving=case.moving)
    y = true_errors(case, result.field, pts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, y=y, names=np.array(FEATURE_NAMES))
    return x, y


def loco_spearman(xs: list[np.ndarray], ys: list[np.ndarray], names: tuple[str, ...]) -> list[float]:
    """Leave-one-case-out Spearman per case of the model on the features `names` (columns of FEATURE_NAMES)."""
    cols = [FEATURE_NAMES.index(n) for n in names]
    out = []
    for i in range(len(xs)):
        rest = [j for j in range(len(xs)) if j != i]
        model = fit_uncertainty(np.concatenate([xs[j] for j in rest])[:, cols], np.concatenate([ys[j] for j in rest]))
        out.append(float(stats.spearmanr(model.log_error(xs[i][:, cols]), ys[i]).statistic))
    return out


def held_out_spearman(
    xs: list[np.ndarray], ys: list[np.ndarray], held: list[tuple[np.ndarray, np.ndarray]], names: tuple[str, ...]
) -> tuple[list[float], UncertaintyModel]:
    """Spearman per held-out case of the model on the features `names` fitted on every training case; and the model."""
    cols = [FEATURE_NAMES.index(n) for n in names]
    model = fit_uncertainty(np.concatenate(xs)[:, cols], np.concatenate(ys))
    return [float(stats.spearmanr(model.log_error(x[:, cols]), y).statistic) for x, y in held], model


def select(args: argparse.Namespace) -> None:
    """Greedy forward selection of the image model's features by leave-one-case-out Spearman on the training
    cases (min, then mean), then each step's fit on all of them scored on the held-out synth cases' points."""
    train = [training_points(spec) for spec in TRAIN]
    held = [training_points(spec) for spec in HELD_OUT]
    xs, ys = [x for x, _ in train], [y for _, y in train]
    chosen: tuple[str, ...] = ("bias",)
    candidates = [n for n in FEATURE_NAMES if n != "bias"]
    for _ in range(args.steps):
        scored = []
        for name in candidates:
            per = loco_spearman(xs, ys, (*chosen, name))
            scored.append((min(per), float(np.mean(per)), name, per))
        scored.sort(reverse=True)
        best = scored[0]
        for lo, mean, name, _ in scored[:5]:
            print(f"  + {name}: LOCO min {lo:.3f} mean {mean:.3f}")
        chosen = (*chosen, best[2])
        candidates.remove(best[2])
        per_held, _ = held_out_spearman(xs, ys, held, chosen)
        print(
            f"{chosen}: LOCO per case {', '.join(f'{v:.2f}' for v in best[3])}; held-out per case "
            f"{', '.join(f'{v:.2f}' for v in per_held)} (min {min(per_held):.2f}, mean {np.mean(per_held):.2f})",
            flush=True,
        )
    for names in args.compare or ():
        feats = ("bias", *names.split(","))
        per_held, model = held_out_spearman(xs, ys, held, feats)
        per = loco_spearman(xs, ys, feats)
        print(
            f"{feats}: LOCO {', '.join(f'{v:.2f}' for v in per)}; held-out {', '.join(f'{v:.2f}' for v in per_held)}"
            f" (min {min(per_held):.2f}, mean {np.mean(per_held):.2f}); coef {np.round(model.coef, 3).tolist()}"
        )


def kept_without_image(params: Path):
    """The key-feature model of `params` if KEEP_WITHOUT_IMAGE and it is the kept one (a `note` says so), else None."""
    if not KEEP_WITHOUT_IMAGE or not params.is_file():
        return None
    inner = load_uncertainty_model(params).without_image
    if inner is None or inner.features != WITHOUT_IMAGE or "note" not in inner.metadata:
        return None
    return inner


def without_image_text(kept, refit) -> str:
    """The card's sentence on the model used without the moving image."""
    coef = lambda m: ", ".join(f"{n} {c:+.3f}" for n, c in zip(WITHOUT_IMAGE, m.coef, strict=True))  # noqa: E731
    if kept is None:
        return f"Without the moving image the key-feature model is used (fitted on the same points: {coef(refit)})."
    return (
        f"Without the moving image the key-feature model is used, with session 4's coefficients (fitted on the "
        f"engine without the residual: {coef(kept)}); refitted on this engine it gives {coef(refit)}, which were "
        "not kept (session 6: the confidence weight's sign flips and a click on a corrupted region no longer "
        "lowered the expected error there, Testing/test_uncertainty.py)."
    )


def fit(args: argparse.Namespace) -> None:
    """Fit on the training cases; write the parameters and the model card section."""
    if not args.reuse:
        for old in (WORK / "uncertainty").glob("*.npz"):
            old.unlink()
    xs, ys, names = [], [], []
    for spec in TRAIN:
        x, y = training_points(spec)
        xs.append(x)
        ys.append(y)
        names.append(spec.name)
        print(f"{spec.name}: {len(y)} points, mean error {y.mean():.2f} mm", flush=True)
    features = ("bias", *args.features) if args.features else MODEL_FEATURES
    cols = [FEATURE_NAMES.index(n) for n in features]
    x, y = np.concatenate(xs)[:, cols], np.concatenate(ys)
    meta = {"training_cases": names, "n_points": int(len(y)), "seed": SEED, "command": " ".join(sys.argv)}
    model = fit_uncertainty(x, y, meta, features)
    key_cols = [FEATURE_NAMES.index(n) for n in WITHOUT_IMAGE]
    refit = fit_uncertainty(np.concatenate(xs)[:, key_cols], y, {}, WITHOUT_IMAGE)
    kept = kept_without_image(args.params)
    model.without_image = kept or refit
    rho = stats.spearmanr(model.log_error(x), y).statistic
    lo, hi = model.interval_from_log(model.log_error(x))
    cover = float(np.mean((y >= lo) & (y <= hi)))
    per_case = [
        float(stats.spearmanr(model.log_error(xc[:, cols]), yc).statistic) for xc, yc in zip(xs, ys, strict=True)
    ]
    model.metadata.update(
        {"train_spearman": float(rho), "train_coverage90": cover, "train_spearman_per_case": per_case}
    )
    save_uncertainty_model(model, args.params)
    coef = ", ".join(f"{n} {c:+.3f}" for n, c in zip(features, model.coef, strict=True))
    card = (
        f"# IKR expected-error model ({args.params.stem}): model card\n\n"
        "## Fit\n\n"
        f"- Command: `{' '.join(sys.argv)}` (seed {SEED}); parameters: `{args.params.name}`.\n"
        f"- Data: {len(names)} cases of the project's training generator (`synth.make_case`) on the abdomen CT "
        f"(TotalSegmentator example, CC BY 4.0): {', '.join(names)}; registered with the shipped learned kernel "
        f"({KERNEL_WEIGHTS}) at a 3 mm working grid, the engine's other settings at their defaults; {len(y)} points "
        f"(landmarks + {N_BODY_POINTS} random body voxels per case), error = |registered field - true field|. "
        "Never fitted on the independent generator (bench/eval_generator.py).\n"
        "- Held out (as for the kernel): the liver-slab CT and the family `sliding`.\n"
        f"- Model: log(error + 0.1 mm) = {coef} (features in review/uncertainty.py); residual 5th / 95th "
        f"percentile {model.residual_q05:+.3f} / {model.residual_q95:+.3f}; mean factor {model.mean_factor:.3f}. "
        + without_image_text(kept, refit)
        + "\n"
        f"- On the training points: Spearman {rho:.2f} (per case {', '.join(f'{v:.2f}' for v in per_case)}), "
        f"90 % interval coverage {100 * cover:.1f} %.\n"
        "- Limits: the image features see only what the images can show is left to register, the residual's "
        "length only where the images made the engine correct the kernel field, the key distance only where keys "
        "are sparse. Where the moving image lacks the anatomy (near the ends of a slab's field of view, where the "
        "deformation brings in what was out of view) or where there is little structure, they see little and the "
        "map ranks the error poorly; the 90 % interval is calibrated on the training cases only.\n"
    )
    write_text_atomic(args.params.with_suffix(".md"), card)
    print(card)


def click_gain(case, result, error_map: Image, tumour_fixed: Image, rng: np.random.Generator) -> tuple[float, float]:
    """Mean-error reduction near the tumour from 5 suggested clicks and from 5 random ones (mean of 3 draws)."""
    g = case.fixed.geometry
    body = Image(body_mask(case.fixed).astype(np.uint8), g)
    dist = ndimage.distance_transform_edt(tumour_fixed.array < 0.5, sampling=np.asarray(g.spacing_mm)[::-1])
    region = (dist <= REGION_MM) & body.array.astype(bool)
    zyx = np.argwhere(region)
    pts = g.index_to_lps(zyx[:, ::-1].astype(float))
    before = true_errors(case, result.field, pts).mean()

    def gain(clicks: np.ndarray) -> float:
        session = session_from_result(result, case.fixed)
        session.add_correspondences(clicks, clicks + sample_field(case.true_field, clicks))
        return before - true_errors(case, session.field, pts).mean()

    suggested = suggest_clicks(error_map, 5, near_mask=tumour_fixed, region=body)
    randoms = [gain(pts[rng.choice(len(pts), 5, replace=False)]) for _ in range(3)]
    return gain(suggested), float(np.mean(randoms))


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate on the held-out synth cases or the independent generator's cases; print the table."""
    params = load_uncertainty_model(args.params)
    rng = np.random.default_rng(SEED)
    specs = INDEPENDENT if args.set == "independent" else HELD_OUT
    if args.only:
        specs = tuple(s for s in specs if s.name in args.only)
    rows = []
    for spec in specs[: args.cases]:
        case, result, reg_s = run_case(spec)
        start = time.perf_counter()
        emap = expected_error_map(result, params=params, moving=case.moving)
        map_s = time.perf_counter() - start
        lm = case.landmarks_fixed_lps
        pts = np.concatenate([lm, body_points(case, N_BODY_POINTS, rng)])
        err = true_errors(case, result.field, pts)
        at = expected_error_at(result, pts, params, moving=case.moving)
        rho = float(stats.spearmanr(at["expected"], err).statistic)
        rho_lm = float(stats.spearmanr(at["expected"][: len(lm)], err[: len(lm)]).statistic)
        cover = float(np.mean((err >= at["lo"]) & (err <= at["hi"])))
        labels = None
        if case.fixed_labels is not None:
            labels = case.fixed_labels.with_array((case.fixed_labels.array == 5).astype(np.uint8))
        tumour, zone, true_margin = demo_tumour_and_zone(case.fixed, case.true_field, labels, SEED)
        margin, holds = "-", None
        if args.samples > 0:
            interval = margin_interval(tumour, zone, result.field, emap, n_samples=args.samples, seed=SEED)
            holds = interval["min_margin_p5_mm"] <= true_margin <= interval["min_margin_p95_mm"]
            margin = (
                f"{true_margin:.1f} in [{interval['min_margin_p5_mm']:.1f}, "
                f"{interval['min_margin_p95_mm']:.1f}] (est {interval['min_margin_mm']:.1f})"
            )
        centre = case.fixed.geometry.index_to_lps(np.argwhere(zone.array > 0.5).mean(axis=0)[::-1][None])[0]
        tumour_fixed = Image(ball_occupancy(case.fixed.geometry, centre, 10.0), case.fixed.geometry)
        g_sugg, g_rand = click_gain(case, result, emap, tumour_fixed, rng)
        rows.append(
            {
                "case": spec.name + (f" ({spec.unseen})" if spec.unseen else ""),
                "tre": float(err[: len(lm)].mean()),
                "rho": rho,
                "rho_lm": rho_lm,
                "cover": cover,
                "g_sugg": g_sugg,
                "g_rand": g_rand,
                "margin": margin,
                "holds": holds,
                "cost": map_s / reg_s,
                "expected": at["expected"],
                "error": err,
            }
        )
        print({k: v for k, v in rows[-1].items() if k not in ("expected", "error")}, flush=True)
    table = calibration_table(rows)
    print("\n" + table)
    if args.card:
        card = args.params.with_suffix(".md")
        title = "Independent generator" if args.set == "independent" else "Held-out calibration"
        what = (
            "cases of bench/eval_generator.py (stationary velocity fields; never used for fitting), the seeds of "
            "`bench/run.py --set independent`"
            if args.set == "independent"
            else f"held-out synth cases; {args.samples} sampled fields per margin interval"
        )
        section = (
            f"\n## {title}\n\nCommand: `{' '.join(sys.argv)}` (seed {SEED}; learned kernel, 3 mm working grid; "
            f"{what}). Spearman of expected vs true error over the landmarks and {N_BODY_POINTS} random body "
            "points (landmarks alone in brackets); 90 % cover over the same points. Click gain: mean true-error "
            f"reduction (mm) within {REGION_MM:g} mm of a demo tumour after 5 suggested / 5 random clicks with "
            "their true matches. Map cost: the map's time over the registration's.\n\n"
        )
        write_text_atomic(card, card.read_text(encoding="utf-8") + section + table + "\n")


def calibration_table(rows: list[dict]) -> str:
    """The calibration table (markdown)."""
    lines = [
        "| case | TRE mm | Spearman (landmarks) | 90% cover | click gain sugg / rand mm | true margin in interval "
        "| map cost |"
    ]
    lines.append("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        holds = "" if r["holds"] is None else (" yes" if r["holds"] else " NO")
        lines.append(
            f"| {r['case']} | {r['tre']:.2f} | {r['rho']:.2f} ({r['rho_lm']:.2f}) | {100 * r['cover']:.0f} % | "
            f"{r['g_sugg']:.2f} / {r['g_rand']:.2f} | {r['margin']}{holds} | {100 * r['cost']:.0f} % |"
        )
    gs, gr = sum(r["g_sugg"] for r in rows), sum(r["g_rand"] for r in rows)
    checked = [r["holds"] for r in rows if r["holds"] is not None]
    lines.append(
        f"| **all** (min Spearman {min(r['rho'] for r in rows):.2f}, mean {np.mean([r['rho'] for r in rows]):.2f}) "
        f"| | | {100 * np.mean([r['cover'] for r in rows]):.0f} % | "
        f"ratio {gs / gr if gr > 0 else float('nan'):.2f} | {f'{sum(checked)}/{len(checked)}' if checked else '-'} | "
        f"{100 * max(r['cost'] for r in rows):.0f} % (max) |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: --fit, or evaluate."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="fit and write the parameters and model card")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--reuse", action="store_true", help="--fit: reuse the cached training features")
    parser.add_argument("--features", nargs="+", help="--fit: these features (after bias) instead of MODEL_FEATURES")
    parser.add_argument("--set", default="synth", choices=("synth", "independent"), help="which cases to evaluate")
    parser.add_argument("--only", nargs="+", help="only the cases with these names")
    parser.add_argument("--cases", type=int, default=99, help="at most this many cases")
    parser.add_argument("--card", action="store_true", help="append the table to the model card")
    parser.add_argument("--samples", type=int, default=20, help="sampled fields per margin interval (0: none)")
    parser.add_argument(
        "--select", action="store_true", help="greedy feature selection on the training cases (held-out synth scored)"
    )
    parser.add_argument("--steps", type=int, default=4, help="--select: features to add")
    parser.add_argument("--compare", nargs="+", help="--select: also score these comma-separated feature sets")
    args = parser.parse_args(argv)
    if args.select:
        select(args)
    else:
        fit(args) if args.fit else evaluate(args)


if __name__ == "__main__":
    main()
