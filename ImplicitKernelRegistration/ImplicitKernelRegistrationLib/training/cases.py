"""Training cases (recipe steps 1-3 in train.py): synthetic deformations and their cached tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import IkrError
from ..core.geometry import Image
from .config import FAMILIES, Progress, TrainConfig


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


def source_name(source: str) -> str:
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
        name=f"{source_name(source)}/{family}/{seed}",
        family=family,
        source=source_name(source),
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
            progress(0.3 * i / len(plan), f"preparing case {source_name(source)} {family} {seed}")
        if source not in loaded:
            loaded = {source: _load_source(source, config)}  # keep one CT in memory at a time
        spacing = config.working_spacings_mm[seed % len(config.working_spacings_mm)]
        case = build_case(loaded[source], source, family, seed, spacing, config)
        held_out = source_name(source) in config.val_sources or family == config.val_family
        (val_cases if held_out else train_cases).append(case)
    if not train_cases:
        raise IkrError("the training configuration leaves no training case after the hold-outs")
    return train_cases, val_cases
