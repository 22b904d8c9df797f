"""Training the learned kernel on synthetic deformations of real CTs and phantoms.

Recipe (docs/method.md, section 5; every number below is a TrainConfig field):

1. Cases. Each source (a real CT from ../shared/data/ct, or `phantom:SEED` for the procedural
   phantom) is resampled to an isotropic working grid (2.5 or 3.5 mm, alternating with the case seed;
   the pipeline works at 2 mm, which the magnitude and density augmentation of step 4 covers)
   and deformed by the synthetic generator (`synth.make_case`) with each family (breathing, bspline,
   local, sliding) and a few seeds. The true field is known on the working grid.
2. Hold-outs. One family (`val_family`, default "sliding") is never trained on, and one source
   (`val_sources`, default the liver slab CT) is never trained on; validation uses the held-out CT
   with every family, plus the held-out family on every training source.
3. Per-case tensors, computed once and cached in memory: MIND-SSC of the fixed working image,
   Förstner keypoints inside the body mask (at most `max_keypoints`, the pipeline's 2048; topped up
   with random body voxels up to `min_keypoints` where the detector finds few corners),
   the features and true displacements (working voxels) at keypoints, at a pool of random body voxels
   and at the generator's landmarks, and at small 5x5x5 voxel patches for the smoothness term. An
   optional fraction of cases also stores real matches (`matching.match_consistent` at one scale).
4. Keys as the registration would see them. Each step draws fresh corruption: a random subset of
   the keypoints (30-100 %, so the kernel sees several keypoint densities), the true displacement
   scaled by a log-uniform factor (`magnitude_scale`: one shared kernel covers the residual
   magnitudes, in working voxels, of all five coarse-to-fine scales of the pipeline; the pipeline
   uses this one kernel at every scale), Gaussian noise of a per-key sigma in `noise_vox`, a fraction
   of outliers (random offsets of 2-8 voxels), and a confidence that reflects the corruption
   (noisier keys get lower confidence, outliers get a random low-to-mid confidence); 2 % of keys are
   user-like (no noise, confidence 1). For matched cases the keys are the real matches instead.
5. Loss: mean endpoint error (voxels) at random pool queries and landmarks, plus `smooth_weight`
   times the bending energy (squared second differences) of the prediction on the patches.
   AdamW, cosine learning-rate decay, gradient clipping; seeded (torch and numpy) throughout.
6. Validation: mean TRE (mm) at landmarks per family for the learned kernel, the thin-plate spline and
   the Gaussian peers on the same corrupted keys (fixed seed), and the TRE without registration.

The weights file is written atomically (checkpoints during training, final at the end), together
with a model card (`model_card`). `train_main` is what `ikr train` calls.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..core.config import Config
from ..core.errors import IkrError
from ..core.geometry import Image
from ..io.atomic import write_text_atomic
from ..registration.kernel import (
    GaussianKernel,
    KernelConfig,
    LearnedKernel,
    TPSKernel,
    count_parameters,
    save_weights,
)
from .torch_state import own_torch_state

Progress = Callable[[float, str], None]
FAMILIES = ("breathing", "bspline", "local", "sliding")
DEFAULT_CTS = (
    "thorax_popi_T00_1p5mm.nii.gz",
    "abdomen_ts_example_ct_3mm.nii.gz",
    "liver_ts_example_ct_sm_3mm.nii.gz",
)


@dataclass
class TrainConfig(Config):
    """Everything that decides a training run (recorded in the weights file and the model card)."""

    kernel: KernelConfig = field(default_factory=KernelConfig)
    sources: tuple[str, ...] = ("phantom:0",)  # CT paths (NIfTI, HU) or "phantom:SEED"
    val_sources: tuple[str, ...] = ()  # names (file name or phantom:SEED) held out for validation
    families: tuple[str, ...] = FAMILIES
    val_family: str = "sliding"
    seeds_per_family: int = 2
    working_spacings_mm: tuple[float, ...] = (2.5, 3.5)
    phantom_size: tuple[int, int, int] = (128, 112, 96)
    phantom_spacing_mm: float = 2.5
    n_landmarks: int = 100
    max_keypoints: int = 2048
    min_keypoints: int = 128
    query_pool: int = 4096
    n_patches: int = 8
    patches_per_case: int = 2
    queries_per_case: int = 256
    cases_per_step: int = 2
    steps: int = 3500
    lr: float = 2e-3
    weight_decay: float = 1e-4
    noise_vox: tuple[float, float] = (0.25, 1.0)
    outlier_fraction: tuple[float, float] = (0.0, 0.2)
    magnitude_scale: tuple[float, float] = (0.15, 1.5)
    smooth_weight: float = 0.05
    match_fraction: float = 0.0
    match_radius_vox: int = 6
    seed: int = 0
    threads: int = 1
    output: str | None = None
    checkpoint_every: int = 500


def default_config(data_dir: Path, output: Path | None = None, seed: int = 0) -> TrainConfig:
    """The full recipe: the three shared CTs (liver slab held out) and two phantoms, about 30 min on 1 core.

    Keys like the pipeline's: working grids of 2 and 3 mm (the pipeline's default is 2 mm), real
    matches for every case (used for half of the draws), few outliers (the pipeline's
    forward/backward check removes most), and the local-linear read-out.
    """
    ct_dir = Path(data_dir) / "ct"
    sources = tuple(str(ct_dir / name) for name in DEFAULT_CTS if (ct_dir / name).exists())
    return TrainConfig(
        kernel=KernelConfig(local_linear=True),
        sources=(*sources, "phantom:0", "phantom:1"),
        val_sources=("liver_ts_example_ct_sm_3mm.nii.gz",),
        working_spacings_mm=(2.0, 3.0),
        outlier_fraction=(0.0, 0.05),
        match_fraction=1.0,
        steps=2500,
        output=None if output is None else str(output),
        seed=seed,
    )


def quick_config(output: Path | None = None, seed: int = 0) -> TrainConfig:
    """A tiny run for tests: one coarse phantom, two training families, seconds on one core."""
    return TrainConfig(
        sources=("phantom:0",),
        families=("bspline", "local", "sliding"),
        val_family="sliding",
        seeds_per_family=1,
        working_spacings_mm=(6.0,),
        phantom_size=(56, 48, 40),
        phantom_spacing_mm=6.0,
        n_landmarks=30,
        max_keypoints=300,
        query_pool=512,
        n_patches=2,
        patches_per_case=1,
        min_keypoints=100,
        queries_per_case=128,
        cases_per_step=2,
        steps=80,
        lr=3e-3,
        output=None if output is None else str(output),
        checkpoint_every=0,
        seed=seed,
    )


# ------------------------------------------------------------------------------------------ the cases


@dataclass
class CaseTensors:
    """Cached per-case tensors on the working grid: points (x, y, z) and displacements in voxels."""

    name: str
    family: str
    source: str
    vox_to_mm: torch.Tensor  # (3, 3): displacement in voxels -> mm (direction * spacing)
    key_xyz: torch.Tensor
    key_feat: torch.Tensor
    key_true: torch.Tensor
    query_xyz: torch.Tensor
    query_feat: torch.Tensor
    query_true: torch.Tensor
    lm_xyz: torch.Tensor
    lm_feat: torch.Tensor
    lm_true: torch.Tensor
    patch_xyz: torch.Tensor  # (M, 5, 5, 5, 3)
    patch_feat: torch.Tensor  # (M, 5, 5, 5, C)
    patch_true: torch.Tensor
    match_disp: torch.Tensor | None = None
    match_conf: torch.Tensor | None = None


def _source_name(source: str) -> str:
    """The short name of a source: the file name, or phantom:SEED."""
    return source if source.startswith("phantom:") else Path(source).name


def _load_source(source: str, config: TrainConfig) -> Image:
    """The CT (HU) of a source: a phantom for "phantom:SEED", else the image file."""
    if source.startswith("phantom:"):
        from ..synthetic.phantom import make_phantom

        s = config.phantom_spacing_mm
        ct, _, _ = make_phantom(int(source.split(":", 1)[1]), config.phantom_size, (s, s, s))
        return ct
    from ..io.images import read_image

    return read_image(Path(source))


def _disp_mm_to_vox(disp_mm: np.ndarray, vox_to_mm: np.ndarray) -> np.ndarray:
    """Displacements (..., 3) LPS mm -> working voxels (x, y, z)."""
    return disp_mm @ np.linalg.inv(vox_to_mm).T


def _patch_centres(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random voxel indices (x, y, z) inside `mask` at least 2 voxels from the border."""
    inner = np.zeros_like(mask)
    inner[2:-2, 2:-2, 2:-2] = mask[2:-2, 2:-2, 2:-2]
    zyx = np.argwhere(inner if inner.any() else mask)
    return zyx[rng.choice(len(zyx), size=n, replace=len(zyx) < n)][:, ::-1].astype(np.float32)


def build_case(ct: Image, source: str, family: str, seed: int, spacing_mm: float, config: TrainConfig) -> CaseTensors:
    """Resample, deform, detect, describe and cache one synthetic case (see the module docstring)."""
    from ..registration.features import mind_ssc, sample_features
    from ..registration.keypoints import forstner_keypoints
    from ..registration.preprocess import body_mask, normalise_ct, resample_to, to_tensor, working_geometry
    from ..synthetic.synth import make_case

    geometry = working_geometry(ct.geometry, spacing_mm)
    ct_w = resample_to(ct, geometry)
    case = make_case(ct_w, family, seed, n_landmarks=config.n_landmarks)
    fixed = case.fixed
    vox_to_mm = fixed.geometry.index_to_lps_matrix()[:3, :3]
    true_vox = _disp_mm_to_vox(case.true_field.displacement_mm.astype(np.float64), vox_to_mm)  # (z,y,x,3)
    image = to_tensor(normalise_ct(fixed.array))
    mask = body_mask(fixed)
    feats = mind_ssc(image)
    keys = forstner_keypoints(image, torch.from_numpy(mask)[None, None], config.max_keypoints, seed)
    rng = np.random.default_rng([config.seed, seed, len(source), FAMILIES.index(family)])
    zyx = np.argwhere(mask)
    if keys.shape[0] < config.min_keypoints:  # few corners (coarse grids, phantoms): top up with body voxels
        extra = zyx[rng.choice(len(zyx), size=config.min_keypoints - keys.shape[0], replace=False)][:, ::-1]
        keys = torch.unique(torch.cat([keys, torch.from_numpy(extra.astype(np.float32).copy())]), dim=0)
    pool = zyx[rng.choice(len(zyx), size=min(config.query_pool, len(zyx)), replace=False)][:, ::-1]
    pool = torch.from_numpy(pool.astype(np.float32).copy())
    lm_idx = fixed.geometry.lps_to_index(case.landmarks_fixed_lps)
    lm_true = _disp_mm_to_vox(case.landmarks_moving_lps - case.landmarks_fixed_lps, vox_to_mm)
    offs = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1)[..., ::-1].reshape(-1, 3)
    centres = _patch_centres(mask, config.n_patches, rng)
    shape = np.asarray(fixed.geometry.size) - 1
    patch = np.clip(centres[:, None, :] + offs[None], 0, shape).astype(np.float32)

    def at_voxels(pts: torch.Tensor) -> torch.Tensor:
        """True displacement (voxels) at integer voxel points (N, 3) xyz."""
        i = pts.long().numpy()
        return torch.from_numpy(true_vox[i[:, 2], i[:, 1], i[:, 0]].astype(np.float32))

    patch_t = torch.from_numpy(patch.reshape(-1, 3))
    out = CaseTensors(
        name=f"{_source_name(source)}/{family}/{seed}",
        family=family,
        source=_source_name(source),
        vox_to_mm=torch.from_numpy(vox_to_mm.astype(np.float32)),
        key_xyz=keys,
        key_feat=sample_features(feats, keys),
        key_true=at_voxels(keys),
        query_xyz=pool,
        query_feat=sample_features(feats, pool),
        query_true=at_voxels(pool),
        lm_xyz=torch.from_numpy(lm_idx.astype(np.float32)),
        lm_feat=sample_features(feats, torch.from_numpy(lm_idx.astype(np.float32))),
        lm_true=torch.from_numpy(lm_true.astype(np.float32)),
        patch_xyz=patch_t.reshape(-1, 5, 5, 5, 3),
        patch_feat=sample_features(feats, patch_t).reshape(-1, 5, 5, 5, feats.shape[1]),
        patch_true=at_voxels(patch_t).reshape(-1, 5, 5, 5, 3),
    )
    if rng.random() < config.match_fraction:
        _add_matches(out, case.moving, geometry, feats, config)
    return out


def _add_matches(case: CaseTensors, moving: Image, geometry: object, feats: torch.Tensor, config: TrainConfig) -> None:
    """Store real keypoint matches (one scale, forward/backward checked) for this case."""
    from ..registration.features import mind_ssc
    from ..registration.matching import match_consistent
    from ..registration.preprocess import normalise_ct, to_tensor

    feat_m = mind_ssc(to_tensor(normalise_ct(moving.array)))
    fwd, cons = match_consistent(feats, feat_m, case.key_xyz, config.match_radius_vox)
    case.match_disp = fwd.displacement.float()
    case.match_conf = cons.confidence.float()


def build_cases(config: TrainConfig, progress: Progress | None = None) -> tuple[list[CaseTensors], list[CaseTensors]]:
    """All training and validation cases of the recipe (held-out source and family go to validation)."""
    plan = [
        (source, family, seed)
        for source in config.sources
        for family in config.families
        for seed in range(config.seeds_per_family)
    ]
    train_cases, val_cases = [], []
    loaded: dict[str, Image] = {}
    for i, (source, family, seed) in enumerate(plan):
        if progress:
            progress(0.3 * i / len(plan), f"preparing case {_source_name(source)} {family} {seed}")
        if source not in loaded:
            loaded = {source: _load_source(source, config)}  # keep one CT in memory at a time
        spacing = config.working_spacings_mm[seed % len(config.working_spacings_mm)]
        case = build_case(loaded[source], source, family, seed, spacing, config)
        held_out = _source_name(source) in config.val_sources or family == config.val_family
        (val_cases if held_out else train_cases).append(case)
    if not train_cases:
        raise IkrError("the training configuration leaves no training case after the hold-outs")
    return train_cases, val_cases


# --------------------------------------------------------------------------------------- corruption


@dataclass
class Keys:
    """One draw of keys for a case: positions, displacements (voxels), confidences, features, scale."""

    xyz: torch.Tensor
    disp: torch.Tensor
    conf: torch.Tensor
    feat: torch.Tensor
    scale: float


def corrupt_keys(case: CaseTensors, config: TrainConfig, gen: torch.Generator, use_matches: bool = False) -> Keys:
    """Keys as a registration would produce them: subset, scaled truth + noise + outliers, confidences."""
    n = case.key_xyz.shape[0]
    keep_n = max(min(n, 8), int(n * (0.3 + 0.7 * torch.rand((), generator=gen).item())))
    keep = torch.randperm(n, generator=gen)[:keep_n]
    if use_matches and case.match_disp is not None:
        return Keys(case.key_xyz[keep], case.match_disp[keep], case.match_conf[keep], case.key_feat[keep], 1.0)
    lo, hi = config.magnitude_scale
    scale = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand((), generator=gen).item())
    true = case.key_true[keep] * scale
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    sigma = config.noise_vox[0] + (config.noise_vox[1] - config.noise_vox[0]) * u(keep_n)
    disp = true + torch.randn(keep_n, 3, generator=gen) * sigma[:, None]
    conf = (
        1.0
        - 0.6 * (sigma - config.noise_vox[0]) / max(1e-6, config.noise_vox[1])
        + 0.1 * torch.randn(keep_n, generator=gen)
    )
    f_out = config.outlier_fraction[0] + (config.outlier_fraction[1] - config.outlier_fraction[0]) * u(()).item()
    outlier = u(keep_n) < f_out
    direction = torch.nn.functional.normalize(torch.randn(keep_n, 3, generator=gen), dim=-1)
    offset = direction * (2.0 + 6.0 * u(keep_n))[:, None]
    disp = torch.where(outlier[:, None], true + offset, disp)
    conf = torch.where(outlier, 0.05 + 0.6 * u(keep_n), conf)
    user = u(keep_n) < 0.02
    disp = torch.where(user[:, None], true, disp)
    conf = torch.where(user, torch.ones_like(conf), conf).clamp(0.02, 1.0)
    return Keys(case.key_xyz[keep], disp, conf, case.key_feat[keep], scale)


# ------------------------------------------------------------------------------------------- training


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared second differences of (M, D, H, W, 3) displacement patches (voxel units)."""
    total = disp.new_zeros(())
    for a in (1, 2, 3):
        total = total + torch.diff(disp, n=2, dim=a).pow(2).mean()
        for b in range(a + 1, 4):
            total = total + 2.0 * torch.diff(torch.diff(disp, dim=a), dim=b).pow(2).mean()
    return total


def _predict(kernel: torch.nn.Module, xyz: torch.Tensor, feat: torch.Tensor, keys: Keys) -> torch.Tensor:
    """Kernel prediction (Q, 3) at points from one case's keys."""
    return kernel(xyz[None], feat[None], keys.xyz[None], keys.disp[None], keys.feat[None], keys.conf[None])[0]


def case_loss(kernel: torch.nn.Module, case: CaseTensors, config: TrainConfig, gen: torch.Generator) -> tuple:
    """(loss, endpoint error in voxels) of one case for one fresh draw of keys and queries."""
    use_matches = case.match_disp is not None and torch.rand((), generator=gen).item() < 0.5
    keys = corrupt_keys(case, config, gen, use_matches)
    pool_xyz = torch.cat([case.query_xyz, case.lm_xyz])
    pool_feat = torch.cat([case.query_feat, case.lm_feat])
    pool_true = torch.cat([case.query_true, case.lm_true])
    pick = torch.randint(pool_xyz.shape[0], (config.queries_per_case,), generator=gen)
    pred = _predict(kernel, pool_xyz[pick], pool_feat[pick], keys)
    epe = (pred - keys.scale * pool_true[pick]).norm(dim=-1).mean()
    loss = epe
    if config.smooth_weight > 0:
        m = case.patch_xyz.shape[0]
        patch = _predict(
            kernel, case.patch_xyz.reshape(-1, 3), case.patch_feat.reshape(-1, case.key_feat.shape[1]), keys
        )
        loss = loss + config.smooth_weight * bending_energy(patch.reshape(m, 5, 5, 5, 3))
    return loss, float(epe.detach())


def _metadata(config: TrainConfig, history: list, validation: dict | None, step: int, n_params: int) -> dict:
    """The metadata stored in the weights file."""
    return {
        "train_config": config.to_dict(),
        "step": step,
        "history": history,
        "validation": validation or {},
        "n_parameters": n_params,
        "torch": str(torch.__version__),
    }


def train(config: TrainConfig, progress: Progress | None = None) -> dict:
    """Train the learned kernel (see `_train`) with its own seed and threads; the caller's are given back."""
    with own_torch_state(config.seed, config.threads):
        return _train(config, progress)


def _train(config: TrainConfig, progress: Progress | None = None) -> dict:
    """Train the learned kernel by the recipe of the module docstring; returns history and validation."""
    start = time.time()
    train_cases, val_cases = build_cases(config, progress)
    kernel = LearnedKernel(config.kernel).train()
    opt = torch.optim.AdamW(kernel.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps))
    )
    gen = torch.Generator().manual_seed(config.seed)
    epe_start = fixed_epe(kernel, train_cases, config)
    history: list[dict] = []
    window: list[tuple[float, float]] = []
    report_every = max(1, config.steps // 50)
    for step in range(config.steps):
        opt.zero_grad()
        picks = torch.randint(len(train_cases), (config.cases_per_step,), generator=gen).tolist()
        losses = [case_loss(kernel, train_cases[i], config, gen) for i in picks]
        loss = torch.stack([val for val, _ in losses]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(kernel.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append((float(loss.detach()), float(np.mean([e for _, e in losses]))))
        if (step + 1) % report_every == 0 or step + 1 == config.steps:
            loss_m, epe_m = np.mean(window, axis=0)
            history.append({"step": step + 1, "loss": float(loss_m), "epe_vox": float(epe_m)})
            window = []
            if progress:
                progress(0.3 + 0.6 * (step + 1) / config.steps, f"step {step + 1}/{config.steps} loss {loss_m:.3f}")
        if config.output and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            meta = _metadata(config, history, None, step + 1, count_parameters(kernel))
            save_weights(kernel, config.kernel, Path(config.output), meta)
    kernel.eval()
    epe_end = fixed_epe(kernel, train_cases, config)
    if progress:
        progress(0.9, "validating learned, TPS and Gaussian kernels")
    validation = validate(kernel, val_cases, train_cases, config)
    result = {
        "history": history,
        "fixed_epe_vox": {"start": epe_start, "end": epe_end},
        "validation": validation,
        "n_parameters": count_parameters(kernel),
        "n_train_cases": len(train_cases),
        "n_val_cases": len(val_cases),
        "seconds": time.time() - start,
        "config": config.to_dict(),
        "kernel": kernel,
    }
    if config.output:
        meta = _metadata(config, history, validation, config.steps, result["n_parameters"])
        save_weights(kernel, config.kernel, Path(config.output), meta)
    if progress:
        progress(1.0, "done")
    return result


# ------------------------------------------------------------------------------------------ validation


def fixed_epe(kernel: torch.nn.Module, cases: list, config: TrainConfig) -> float:
    """Mean endpoint error (voxels) on one fixed seeded draw of keys and queries per case (no smoothness)."""
    was_training = kernel.training
    kernel.eval()
    errors = []
    with torch.no_grad():
        for i, case in enumerate(cases):
            gen = torch.Generator().manual_seed(20_000 + i)
            keys = corrupt_keys(case, config, gen)
            pred = _predict(kernel, case.query_xyz, case.query_feat, keys)
            errors.append(float((pred - keys.scale * case.query_true).norm(dim=-1).mean()))
    kernel.train(was_training)
    return float(np.mean(errors))


def validate(kernel: torch.nn.Module, val_cases: list, train_cases: list, config: TrainConfig) -> dict:
    """Mean landmark TRE (mm) per family and kernel on the same seeded keys; held-out family apart."""
    peers = {
        "learned": kernel,
        "tps": TPSKernel(config.kernel.tps_smoothing, config.kernel.conf_eps),
        "gaussian": GaussianKernel(config.kernel.gaussian_sigma, config.kernel.k, config.kernel.conf_eps),
    }
    sets = {"held_out": val_cases, "train_cases": train_cases[: max(1, len(val_cases))]}
    out: dict = {"held_out_family": config.val_family, "held_out_sources": list(config.val_sources)}
    for set_name, cases in sets.items():
        per_family: dict[str, dict[str, list[float]]] = {}
        for i, case in enumerate(cases):
            gen = torch.Generator().manual_seed(10_000 + i)
            keys = corrupt_keys(case, replace(config, magnitude_scale=(1.0, 1.0)), gen)
            rows = per_family.setdefault(case.family, {name: [] for name in ("none", *peers)})
            rows["none"].append(float((case.lm_true @ case.vox_to_mm.T).norm(dim=-1).mean()))
            with torch.no_grad():
                for name, peer in peers.items():
                    pred = _predict(peer, case.lm_xyz, case.lm_feat, keys)
                    err = ((pred - case.lm_true) @ case.vox_to_mm.T).norm(dim=-1).mean()
                    rows[name].append(float(err))
        out[set_name] = {
            fam: {name: float(np.mean(v)) for name, v in rows.items()} | {"n_cases": len(rows["none"])}
            for fam, rows in sorted(per_family.items())
        }
    return out


# ------------------------------------------------------------------------------------------ reporting


def model_card(result: dict) -> str:
    """Markdown model card: data, command, seed, validation TRE per family and kernel variant."""
    cfg = result["config"]
    val = result["validation"]
    lines = [
        "# IKR learned kernel: model card",
        "",
        f"- Format: ikr-kernel-v1; {result['n_parameters']:,} parameters; heads: {cfg['kernel']['heads']}; "
        f"K = {cfg['kernel']['k']}; features: MIND-SSC ({cfg['kernel']['feat_dim']} channels).",
        f"- Seed: {cfg['seed']}; steps: {cfg['steps']}; {result['n_train_cases']} training and "
        f"{result['n_val_cases']} validation cases; {result['seconds'] / 60:.1f} min on "
        f"{cfg['threads']} CPU thread(s).",
        f"- Command: `{result.get('command', 'ikr train')}`",
        "",
        "## Data",
        "",
        "Synthetic deformations (families: " + ", ".join(cfg["families"]) + ") of these sources, on a "
        f"{' / '.join(str(s) for s in cfg['working_spacings_mm'])} mm working grid: "
        + ", ".join(f"`{_source_name(s)}`" for s in cfg["sources"])
        + ".",
        f"Held out of training: the family `{val['held_out_family']}` and the source(s) "
        + (", ".join(f"`{s}`" for s in val["held_out_sources"]) or "none")
        + ".",
        "Keys are true keypoint displacements corrupted like real matches (noise "
        f"{cfg['noise_vox'][0]}-{cfg['noise_vox'][1]} voxels, outliers {cfg['outlier_fraction'][0]:.0%}-"
        f"{cfg['outlier_fraction'][1]:.0%}, confidences that reflect the corruption); real matches for "
        f"{cfg['match_fraction']:.0%} of cases. Real CTs: POPI (Léon Bérard Cancer Center & CREATIS, Lyon); "
        "TotalSegmentator example (Wasserthal et al. 2023, CC BY 4.0).",
        "",
        "## Validation: mean landmark TRE (mm) on the same keys",
        "",
    ]
    for set_name, title in (
        ("held_out", "Held-out cases (held-out source: every family; held-out family: every source)"),
        ("train_cases", "Training cases (for reference)"),
    ):
        lines += [
            f"### {title}",
            "",
            "| family | n | no registration | learned | TPS | Gaussian |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for fam, row in val.get(set_name, {}).items():
            mark = " (held-out family)" if fam == val["held_out_family"] else ""
            lines.append(
                f"| {fam}{mark} | {row['n_cases']} | {row['none']:.2f} | {row['learned']:.2f} | "
                f"{row['tps']:.2f} | {row['gaussian']:.2f} |"
            )
        lines.append("")
    if result["history"]:
        first, last = result["history"][0], result["history"][-1]
        lines += [
            "## Training curve",
            "",
            f"Endpoint error at training queries: {first['epe_vox']:.3f} voxels (step {first['step']}) -> "
            f"{last['epe_vox']:.3f} voxels (step {last['step']}); on one fixed draw of keys: "
            f"{result['fixed_epe_vox']['start']:.3f} (untrained) -> {result['fixed_epe_vox']['end']:.3f} voxels.",
            "",
        ]
    lines += [
        "## Limits",
        "",
        "Trained on synthetic deformations only (no real image pair with expert landmarks is available "
        "here); the TRE above measures the sparse-to-dense step on corrupted true keys, not the whole "
        "pipeline. The abdomen and liver-slab CTs come from the same public example dataset.",
        "",
    ]
    return "\n".join(lines)


def train_main(
    output: Path,
    data_dir: Path | None = None,
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    heads: str = "both",
    threads: int = 1,
    progress: Progress | None = None,
    command: str = "ikr train",
) -> dict:
    """What `ikr train` runs: build the config, train, write weights, model card (.md) and result (.json)."""
    output = Path(output)
    if quick:
        config = quick_config(output, seed)
    else:
        if data_dir is None or not (Path(data_dir) / "ct").is_dir():
            raise IkrError("no ct/ folder with training CTs here (pass the shared data folder)", data_dir)
        config = default_config(Path(data_dir), output, seed)
    config = replace(config, kernel=replace(config.kernel, heads=heads), threads=threads)
    if steps is not None:
        config = replace(config, steps=int(steps))
    result = train(config, progress)
    result["command"] = command
    write_text_atomic(output.with_suffix(".md"), model_card(result))
    summary = {k: v for k, v in result.items() if k != "kernel"}
    write_text_atomic(output.with_suffix(".json"), json.dumps(summary, indent=2))
    return result


def _cli(argv: list[str] | None = None) -> int:
    """`python -m ImplicitKernelRegistrationLib.training.train` (the same as `ikr train`)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="train the IKR learned kernel")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--data", default=None, help="the shared data folder (holds ct/)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--heads", default="both", choices=["both", "spatial", "semantic"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    def show(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:5.1f}%] {message}", flush=True)

    command = "python -m ImplicitKernelRegistrationLib.training.train " + " ".join(argv or sys.argv[1:])
    result = train_main(
        Path(args.output),
        args.data and Path(args.data),
        args.quick,
        args.seed,
        args.steps,
        args.heads,
        args.threads,
        show,
        command,
    )
    print(json.dumps(result["validation"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
