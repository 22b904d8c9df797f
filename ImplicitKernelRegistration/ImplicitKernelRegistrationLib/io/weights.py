"""Weights files of the learned parts: one torch file holding a format tag, a config, a state dict, metadata.

Written atomically; read with `torch.load(weights_only=True)`, so a file can never run code; a
missing, corrupt or foreign file is refused with a one-line message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import IkrError
from .atomic import atomic_path


def save_module(path: Path, fmt: str, config: dict, module: torch.nn.Module, metadata: dict) -> Path:
    """Write {format, config, state_dict (CPU copies), metadata (JSON types only)} to `path` atomically."""
    payload = {
        "format": fmt,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "metadata": json.loads(json.dumps(metadata, default=str)),  # plain types: loadable weights_only
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_payload(path: Path, fmt: str, what: str) -> dict:
    """The payload of a `fmt` weights file (a dict with config and state_dict); refuse anything else."""
    path = Path(path)
    if not path.is_file():
        raise IkrError(f"{what} weights file not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt/unsafe files
        raise IkrError(
            f"not a readable {what} weights file (corrupt or not a torch file): {type(exc).__name__}", path
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise IkrError(f"not an {fmt} weights file (format: {found!r})", path)
    return payload
