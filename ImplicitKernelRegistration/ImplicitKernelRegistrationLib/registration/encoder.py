"""The learned feature encoder: a small per-voxel network on top of MIND-SSC, for matching.

The encoder's input at each voxel is the MIND-SSC descriptor (12 channels), the normalised intensity
and the intensity minus its 5x5x5 mean (local contrast): 14 channels. A pointwise MLP (1x1x1
convolutions, one hidden layer of 24, GELU) maps them to 12 unit-length channels, so the output
drops in wherever MIND-SSC is used for matching (`matching.cost_volume`). Being pointwise, it is
applied in slabs of the volume with bounded memory, and in training to the sampled search cubes only.

The kernel's semantic head keeps reading MIND-SSC (it was trained on it); the encoder only changes
what is matched. Weights files have the format `ikr-encoder-v1` and are read with weights_only=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Config
from ..core.errors import IkrError
from ..core.filters import box_filter
from ..io.weights import load_payload, save_module
from .features import mind_ssc

ENCODER_FORMAT = "ikr-encoder-v1"
IN_CHANNELS = 14
_SLAB_VOXELS = 1 << 20  # voxels per slab of the pointwise network


@dataclass
class EncoderConfig(Config):
    """Encoder shape: hidden width, number of hidden layers, output channels."""

    hidden: int = 24
    layers: int = 1
    out_channels: int = 12


def encoder_inputs(image: torch.Tensor) -> torch.Tensor:
    """The 14 input channels (1, 14, D, H, W) of a normalised image (1, 1, D, H, W): MIND, intensity, contrast."""
    img = image.float()
    return torch.cat([mind_ssc(img), img, img - box_filter(img, 2)], dim=1)


class FeatureEncoder(nn.Module):
    """Pointwise MLP from the 14 input channels to `out_channels` unit-length features."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or EncoderConfig()
        c = self.config
        mods: list[nn.Module] = []
        width = IN_CHANNELS
        for _ in range(c.layers):
            mods += [nn.Conv3d(width, c.hidden, 1), nn.GELU()]
            width = c.hidden
        mods.append(nn.Conv3d(width, c.out_channels, 1))
        self.net = nn.Sequential(*mods)

    def head(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network on input channels (N, 14, ...) of any spatial shape -> (N, out, ...), unit length."""
        shape = inputs.shape
        flat = inputs.reshape(shape[0], shape[1], -1, 1, 1)
        return F.normalize(self.net(flat), dim=1).reshape(shape[0], -1, *shape[2:])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Features (1, out, D, H, W) of a normalised image (1, 1, D, H, W), slab by slab."""
        inputs = encoder_inputs(image)
        d = inputs.shape[2]
        per_slice = max(1, inputs.shape[3] * inputs.shape[4])
        slab = max(1, _SLAB_VOXELS // per_slice)
        out = torch.empty((1, self.config.out_channels, *inputs.shape[2:]), device=inputs.device)
        with torch.no_grad():
            for start in range(0, d, slab):
                out[:, :, start : start + slab] = self.head(inputs[:, :, start : start + slab])
        return out


def save_encoder(encoder: FeatureEncoder, path: Path, metadata: dict) -> Path:
    """Write an ikr-encoder-v1 file atomically: format, config, state_dict (CPU), JSON-able metadata."""
    return save_module(path, ENCODER_FORMAT, encoder.config.to_dict(), encoder, metadata)


def load_encoder(path: Path) -> tuple[FeatureEncoder, dict]:
    """Read an ikr-encoder-v1 file (weights_only) into an encoder in eval mode; refuse anything else."""
    payload = load_payload(Path(path), ENCODER_FORMAT, "encoder")
    try:
        encoder = FeatureEncoder(EncoderConfig.from_dict(dict(payload["config"])))
        encoder.load_state_dict(payload["state_dict"])
    except (IkrError, TypeError, KeyError, RuntimeError) as exc:
        raise IkrError(f"encoder weights do not fit the encoder architecture: {exc}", path) from exc
    return encoder.eval(), dict(payload.get("metadata") or {})
