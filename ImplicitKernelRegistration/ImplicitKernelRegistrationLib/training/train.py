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
with a model card. `train_main` is what `ikr train` calls. The steps live in their own modules:
`config` (TrainConfig and the two recipes), `cases` (steps 1-3), `corruption` (step 4), this module
(step 5, the loop, and the command), `validation` (step 6), `card` (the model card).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..core.errors import IkrError
from ..io.atomic import write_text_atomic
from ..registration.kernel import LearnedKernel, count_parameters, save_weights
from .card import model_card
from .cases import CaseTensors, build_cases
from .config import Progress, TrainConfig, default_config, quick_config
from .corruption import corrupt_keys, predict
from .torch_state import own_torch_state
from .validation import fixed_epe, validate


def bending_energy(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared second differences of (M, D, H, W, 3) displacement patches (voxel units)."""
    total = disp.new_zeros(())
    for a in (1, 2, 3):
        total = total + torch.diff(disp, n=2, dim=a).pow(2).mean()
        for b in range(a + 1, 4):
            total = total + 2.0 * torch.diff(torch.diff(disp, dim=a), dim=b).pow(2).mean()
    return total


def case_loss(kernel: torch.nn.Module, case: CaseTensors, config: TrainConfig, gen: torch.Generator) -> tuple:
    """(loss, endpoint error in voxels) of one case for one fresh draw of keys and queries."""
    use_matches = case.match_disp is not None and torch.rand((), generator=gen).item() < 0.5
    keys = corrupt_keys(case, config, gen, use_matches)
    pool_xyz = torch.cat([case.query_xyz, case.lm_xyz])
    pool_feat = torch.cat([case.query_feat, case.lm_feat])
    pool_true = torch.cat([case.query_true, case.lm_true])
    pick = torch.randint(pool_xyz.shape[0], (config.queries_per_case,), generator=gen)
    pred = predict(kernel, pool_xyz[pick], pool_feat[pick], keys)
    epe = (pred - keys.scale * pool_true[pick]).norm(dim=-1).mean()
    loss = epe
    if config.smooth_weight > 0:
        m = case.patch_xyz.shape[0]
        patch = predict(
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
