"""Validation of a trained kernel (recipe step 6 in train.py): endpoint and landmark errors beside its peers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ..registration.kernel import GaussianKernel, TPSKernel
from .config import TrainConfig
from .corruption import corrupt_keys, predict


def fixed_epe(kernel: torch.nn.Module, cases: list, config: TrainConfig) -> float:
    """Mean endpoint error (voxels) on one fixed seeded draw of keys and queries per case (no smoothness)."""
    was_training = kernel.training
    kernel.eval()
    errors = []
    with torch.no_grad():
        for i, case in enumerate(cases):
            gen = torch.Generator().manual_seed(20_000 + i)
            keys = corrupt_keys(case, config, gen)
            pred = predict(kernel, case.query_xyz, case.query_feat, keys)
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
                    pred = predict(peer, case.lm_xyz, case.lm_feat, keys)
                    err = ((pred - case.lm_true) @ case.vox_to_mm.T).norm(dim=-1).mean()
                    rows[name].append(float(err))
        out[set_name] = {
            fam: {name: float(np.mean(v)) for name, v in rows.items()} | {"n_cases": len(rows["none"])}
            for fam, rows in sorted(per_family.items())
        }
    return out
