"""Training the learned feature encoder (`encoder.FeatureEncoder`) on synthetic deformations of real CTs.

Recipe (every number is an EncoderTrainConfig field):

1. Cases: each source CT is resampled to a working grid (alternating `spacings_mm`), deformed by
   `synth.make_case` with each family and seed (rigid offset, noise and local intensity change
   included). The family `val_family` and the sources `val_sources` are held out for validation.
2. Cached per case: the 14 encoder input channels of the fixed and the moving image (float16),
   Förstner keypoints of the fixed image in its body mask and their true displacement (voxels).
3. A step draws `keypoints_per_case` keypoints of `cases_per_step` cases and centres each search
   cube on the true match plus a random offset of up to `prior_error_vox` voxels (like the estimate
   a coarser scale leaves). The encoder is applied to the gathered input cubes only (it is
   pointwise, so this equals encoding the volume), the patch-SSD cost volume and the soft-argmin are
   those of `matching`, and the loss is the endpoint error of the soft-argmin (voxels).
4. Validation: the same endpoint error for MIND-SSC and for the encoder on a fixed draw of the
   held-out cases.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..core.config import Config
from ..core.errors import IkrError
from ..io.atomic import write_text_atomic
from ..registration.encoder import EncoderConfig, FeatureEncoder, encoder_inputs, save_encoder
from ..registration.matching import gather_cubes, patch_ssd, search_offsets, soft_argmin
from .config import DEFAULT_CTS, FAMILIES
from .torch_state import own_torch_state

Progress = Callable[[float, str], None]


@dataclass
class EncoderTrainConfig(Config):
    """Everything that decides an encoder training run (recorded in the weights file and model card)."""

    encoder: EncoderConfig
    sources: tuple[str, ...]
    val_sources: tuple[str, ...] = ("liver_ts_example_ct_sm_3mm.nii.gz",)
    families: tuple[str, ...] = FAMILIES
    val_family: str = "sliding"
    seeds_per_family: int = 1
    spacings_mm: tuple[float, ...] = (2.5, 3.5)
    max_keypoints: int = 1024
    keypoints_per_case: int = 96
    cases_per_step: int = 2
    search_radius_vox: int = 3
    prior_error_vox: float = 2.0
    temperature: float = 0.1
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1


@dataclass
class EncoderCase:
    """Cached tensors of one case: inputs of both images (1, 14, D, H, W), keypoints, truth (voxels)."""

    name: str
    family: str
    fixed_inputs: torch.Tensor
    moving_inputs: torch.Tensor
    keypoints: torch.Tensor
    true_vox: torch.Tensor


def default_encoder_config(data_dir: Path, seed: int = 0) -> EncoderTrainConfig:
    """The full recipe on the shared CTs (the liver slab and the sliding family held out)."""
    ct_dir = Path(data_dir) / "ct"
    sources = tuple(str(ct_dir / name) for name in DEFAULT_CTS if (ct_dir / name).exists())
    if not sources:
        raise IkrError("no training CTs found", ct_dir)
    return EncoderTrainConfig(encoder=EncoderConfig(), sources=sources, seed=seed)


def build_encoder_case(
    source: str, family: str, seed: int, spacing_mm: float, config: EncoderTrainConfig
) -> EncoderCase:
    """Resample, deform and cache one case (module docstring, steps 1-2)."""
    from ..io.images import read_image
    from ..registration.keypoints import forstner_keypoints
    from ..registration.preprocess import body_mask, normalise_ct, resample_to, to_tensor, working_geometry
    from ..synthetic.synth import make_case

    ct = read_image(source)
    ct_w = resample_to(ct, working_geometry(ct.geometry, spacing_mm))
    case = make_case(ct_w, family, seed, n_landmarks=20)
    fixed = to_tensor(normalise_ct(case.fixed.array))
    moving = to_tensor(normalise_ct(case.moving.array))
    mask = torch.from_numpy(body_mask(case.fixed))[None, None]
    keys = forstner_keypoints(fixed, mask, config.max_keypoints, seed)
    idx = keys.long().numpy()
    disp_mm = case.true_field.displacement_mm[idx[:, 2], idx[:, 1], idx[:, 0]].astype(np.float64)
    to_vox = np.linalg.inv(case.fixed.geometry.voxel_to_mm_matrix())
    true_vox = torch.from_numpy((disp_mm @ to_vox.T).astype(np.float32))
    return EncoderCase(
        name=f"{Path(source).name}/{family}/{seed}",
        family=family,
        fixed_inputs=encoder_inputs(fixed).half(),
        moving_inputs=encoder_inputs(moving).half(),
        keypoints=keys,
        true_vox=true_vox,
    )


def endpoint_error(
    features: Callable[[torch.Tensor], torch.Tensor],
    case: EncoderCase,
    pick: torch.Tensor,
    offset: torch.Tensor,
    config: EncoderTrainConfig,
) -> torch.Tensor:
    """Mean soft-argmin endpoint error (voxels) of keypoints `pick` searched around truth + `offset`."""
    radius = config.search_radius_vox
    keys = case.keypoints[pick]
    centres = (keys + case.true_vox[pick] + offset).round()
    cube = features(gather_cubes(case.moving_inputs, centres, radius + 1, 1))
    ref = features(gather_cubes(case.fixed_inputs, keys, 1, 1))
    cost = patch_ssd(cube, ref).reshape(len(pick), -1)
    cost = cost / cost.mean().clamp_min(1e-12)
    mean, _ = soft_argmin(cost, search_offsets(radius), config.temperature)
    pred = centres - keys + mean
    return (pred - case.true_vox[pick]).norm(dim=-1).mean()


def mind_only(inputs: torch.Tensor) -> torch.Tensor:
    """The MIND-SSC channels of gathered encoder inputs (the training-free baseline)."""
    return inputs[:, :12].float()


def _draw(case: EncoderCase, config: EncoderTrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint indices and prior offsets (voxels) for one case."""
    n = min(config.keypoints_per_case, case.keypoints.shape[0])
    pick = torch.randperm(case.keypoints.shape[0], generator=gen)[:n]
    offset = (torch.rand(n, 3, generator=gen) * 2.0 - 1.0) * config.prior_error_vox
    return pick, offset


def train_encoder(config: EncoderTrainConfig, progress: Progress | None = None) -> dict:
    """Train the encoder (see `_train_encoder`) with its own seed and threads; the caller's are given back."""
    with own_torch_state(config.seed, config.threads):
        return _train_encoder(config, progress)


def _train_encoder(config: EncoderTrainConfig, progress: Progress | None = None) -> dict:
    """Train the encoder by the recipe of the module docstring; returns history, validation and the model."""
    report = progress or (lambda fraction, message: None)
    start = time.time()
    train_cases: list[EncoderCase] = []
    val_cases: list[EncoderCase] = []
    plan = [(s, f, k) for s in config.sources for f in config.families for k in range(config.seeds_per_family)]
    for i, (source, family, seed) in enumerate(plan):
        report(0.3 * i / len(plan), f"preparing {Path(source).name} {family} {seed}")
        spacing = config.spacings_mm[(i + seed) % len(config.spacings_mm)]
        case = build_encoder_case(source, family, seed, spacing, config)
        held_out = Path(source).name in config.val_sources or family == config.val_family
        (val_cases if held_out else train_cases).append(case)
    if not train_cases or not val_cases:
        raise IkrError("the encoder recipe needs both training and held-out cases")
    encoder = FeatureEncoder(config.encoder).train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    for step in range(config.steps):
        opt.zero_grad()
        picks = torch.randint(len(train_cases), (config.cases_per_step,), generator=gen).tolist()
        draws = [(train_cases[i], *_draw(train_cases[i], config, gen)) for i in picks]
        losses = [endpoint_error(encoder.head, case, pick, offset, config) for case, pick, offset in draws]
        loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, config.steps // 20) == 0:
            history.append({"step": step + 1, "epe_vox": float(loss.detach())})
            report(
                0.3 + 0.6 * (step + 1) / config.steps,
                f"step {step + 1}/{config.steps} epe {float(loss.detach()):.3f} vox",
            )
    encoder.eval()
    validation = validate_encoder(encoder, val_cases, train_cases, config)
    report(1.0, "done")
    return {
        "encoder": encoder,
        "history": history,
        "validation": validation,
        "n_parameters": sum(p.numel() for p in encoder.parameters()),
        "n_train_cases": len(train_cases),
        "n_val_cases": len(val_cases),
        "seconds": time.time() - start,
        "config": config.to_dict(),
    }


def validate_encoder(encoder: FeatureEncoder, val_cases: list, train_cases: list, config: EncoderTrainConfig) -> dict:
    """Endpoint error (voxels) of MIND-SSC and of the encoder per family, on one fixed draw per case."""
    out: dict = {"held_out_family": config.val_family, "held_out_sources": list(config.val_sources)}
    for set_name, cases in (("held_out", val_cases), ("train_cases", train_cases)):
        rows: dict[str, dict[str, list[float]]] = {}
        for i, case in enumerate(cases):
            gen = torch.Generator().manual_seed(30_000 + i)
            pick, offset = _draw(case, replace(config, keypoints_per_case=512), gen)
            row = rows.setdefault(case.family, {"mind": [], "encoder": []})
            with torch.no_grad():
                row["mind"].append(float(endpoint_error(mind_only, case, pick, offset, config)))
                row["encoder"].append(float(endpoint_error(encoder.head, case, pick, offset, config)))
        out[set_name] = {
            fam: {k: float(np.mean(v)) for k, v in row.items()} | {"n_cases": len(row["mind"])}
            for fam, row in sorted(rows.items())
        }
    return out


def encoder_card(result: dict, command: str) -> str:
    """Markdown model card of an encoder training run."""
    cfg, val = result["config"], result["validation"]
    lines = [
        "# IKR learned feature encoder: model card",
        "",
        f"- Format: ikr-encoder-v1; {result['n_parameters']:,} parameters (pointwise MLP on MIND-SSC, intensity "
        f"and local contrast; hidden {cfg['encoder']['hidden']} x {cfg['encoder']['layers']}; "
        f"{cfg['encoder']['out_channels']} unit-length channels).",
        f"- Seed {cfg['seed']}; {cfg['steps']} steps; {result['n_train_cases']} training and "
        f"{result['n_val_cases']} held-out cases; {result['seconds'] / 60:.1f} min on {cfg['threads']} CPU thread(s).",
        f"- Command: `{command}`",
        "",
        "## Data",
        "",
        "Synthetic deformations (`synth.make_case`: rigid offset, noise, local intensity change) of "
        + ", ".join(f"`{Path(s).name}`" for s in cfg["sources"])
        + f" on {' / '.join(str(s) for s in cfg['spacings_mm'])} mm grids. Held out: the family "
        f"`{val['held_out_family']}` and " + ", ".join(f"`{s}`" for s in val["held_out_sources"]) + ".",
        f"Loss: soft-argmin endpoint error of Förstner keypoints searched over +-{cfg['search_radius_vox']} voxels "
        f"around the true match displaced by up to {cfg['prior_error_vox']} voxels.",
        "",
        "## Validation: matching endpoint error (voxels), one scale, no regularisation",
        "",
    ]
    for set_name, title in (("held_out", "Held-out cases"), ("train_cases", "Training cases (for reference)")):
        lines += [f"### {title}", "", "| family | n | MIND-SSC | encoder |", "| --- | ---: | ---: | ---: |"]
        for fam, row in val[set_name].items():
            mark = " (held-out family)" if fam == val["held_out_family"] else ""
            lines.append(f"| {fam}{mark} | {row['n_cases']} | {row['mind']:.3f} | {row['encoder']:.3f} |")
        lines.append("")
    lines += [
        "## Limits",
        "",
        "Synthetic deformations only; one matching scale in the loss while the pipeline uses it at five. "
        "The whole-pipeline effect is measured by `bench/run.py` (method `ikr-encoder`).",
        "",
    ]
    return "\n".join(lines)


def train_encoder_main(
    output: Path, config: EncoderTrainConfig, progress: Progress | None = None, command: str = "ikr train-encoder"
) -> dict:
    """What `ikr train-encoder` runs: train, write the weights, the model card (.md) and the result (.json)."""
    result = train_encoder(config, progress)
    meta = {k: v for k, v in result.items() if k != "encoder"} | {"command": command}
    save_encoder(result["encoder"], Path(output), meta)
    write_text_atomic(Path(output).with_suffix(".md"), encoder_card(result, command))
    write_text_atomic(Path(output).with_suffix(".json"), json.dumps(meta, indent=2))
    return result
