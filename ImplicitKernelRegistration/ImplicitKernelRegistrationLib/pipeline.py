"""The registration hierarchy: five scales of match -> kernel reconstruction, coarse to fine.

Data flow: images -> working pair -> keypoints of the fixed image -> (per scale) features, matching
of the fixed keypoints into the moving image warped by the current field -> the keypoints' total
displacements -> the kernel reconstructs the dense field from them. The field is therefore always
`kernel(correspondences)`, which is what lets a clicked pair (one more correspondence) rebuild it.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .correspondences import Correspondences
from .errors import IkrError
from .features import mind_ssc, points_to_grid, sample_features
from .fields import Field, resample_field
from .geometry import Geometry, Image
from .kernel import KernelConfig, make_kernel, reconstruct_dense
from .keypoints import forstner_keypoints, gaussian_smooth
from .matching import match_consistent
from .preprocess import make_working_pair

Progress = Callable[[float, str], None]

# The shipped weights: Resources/weights/ at the top of the checkout (see Resources/MODEL_CARD.md).
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "Resources" / "weights" / "kernel_v1.pt"


@dataclass(frozen=True)
class ScaleSettings:
    """One level of the hierarchy, in working voxels: search cube radius and lattice step, smoothing."""

    search_radius_vox: int
    step_vox: float
    smoothing_vox: float
    mind_dilation: int


# At a 2 mm working grid: searches of +-36, +-20, +-8, +-4 and +-2 mm, each finer than the last.
DEFAULT_SCALES: tuple[ScaleSettings, ...] = (
    ScaleSettings(6, 3.0, 2.0, 3),
    ScaleSettings(5, 2.0, 1.0, 2),
    ScaleSettings(4, 1.0, 0.5, 2),
    ScaleSettings(4, 0.5, 0.0, 2),
    ScaleSettings(2, 0.5, 0.0, 1),
)


@dataclass
class RegistrationConfig:
    """Settings of one registration; every field is recorded in the report."""

    spacing_mm: float = 2.0
    kernel: str = "learned"
    heads: str = "both"
    weights: str | None = None
    max_keypoints: int = 2048
    device: str = "auto"
    seed: int = 0
    control_step_vox: int = 3
    consistency_threshold_vox: float = 1.5
    scales: tuple[ScaleSettings, ...] = field(default_factory=lambda: DEFAULT_SCALES)

    def to_dict(self) -> dict:
        """JSON-serialisable settings."""
        out = asdict(self)
        out["scales"] = [asdict(s) for s in self.scales]
        return out


@dataclass
class RegistrationResult:
    """The field on the fixed grid, the correspondences it was built from, and the report."""

    field: Field
    correspondences: Correspondences
    working_geometry: Geometry
    report: dict


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda` where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IkrError(
            "--device cuda was requested but no CUDA device is available (use --device auto or cpu)"
        )
    if name not in ("cpu", "cuda"):
        raise IkrError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def load_kernel(config: RegistrationConfig, device: torch.device) -> torch.nn.Module:
    """The kernel named by the config (learned: the shipped weights unless others are given)."""
    weights = None
    if config.kernel == "learned":
        weights = Path(config.weights) if config.weights else DEFAULT_WEIGHTS
        if not weights.is_file():
            raise IkrError("the learned kernel's weights are missing (run `ikr train`)", weights)
    kernel_config = KernelConfig(heads=config.heads)
    if weights is not None:
        from .kernel import load_weights

        kernel_config = load_weights(weights)[0].config
        if config.heads != kernel_config.heads:
            raise IkrError(f"these weights were trained with heads={kernel_config.heads!r}", weights)
    return make_kernel(config.kernel, kernel_config, weights).to(device)


def warp_volume(
    volume: torch.Tensor, displacement_vox: torch.Tensor, padding: str = "border"
) -> torch.Tensor:
    """Sample (1,C,D,H,W) at x + d(x), d given as (1,3,D,H,W) voxels (x, y, z); trilinear."""
    shape = tuple(volume.shape[2:])
    axes = [torch.arange(n, device=volume.device, dtype=torch.float32) for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    pts = torch.stack([xx, yy, zz], dim=-1) + displacement_vox[0].permute(1, 2, 3, 0)
    grid = points_to_grid(pts, shape).unsqueeze(0)
    return F.grid_sample(volume.float(), grid, mode="bilinear", padding_mode=padding, align_corners=True)


def voxels_to_mm(displacement_vox: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacements (..., 3) in working voxels (x, y, z) -> LPS mm (direction and spacing applied)."""
    m = geometry.direction_matrix * np.asarray(geometry.spacing_mm)[None, :]
    return np.asarray(displacement_vox, dtype=np.float64) @ m.T


def mm_to_voxels(displacement_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacements (..., 3) in LPS mm -> working voxels (x, y, z)."""
    m = geometry.direction_matrix * np.asarray(geometry.spacing_mm)[None, :]
    return np.asarray(displacement_mm, dtype=np.float64) @ np.linalg.inv(m).T


def dense_to_field(dense_vox: torch.Tensor, working: Geometry, target: Geometry) -> Field:
    """A (1,3,D,H,W) voxel displacement on the working grid -> a Field in LPS mm on `target`."""
    disp = dense_vox[0].permute(1, 2, 3, 0).detach().cpu().numpy()
    field_working = Field(voxels_to_mm(disp, working).astype(np.float32), working)
    if target == working:
        return field_working
    return resample_field(field_working, target)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process (resident set; plus CUDA's peak allocation on a GPU), MB."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if device.type == "cuda":
        rss_mb += torch.cuda.max_memory_allocated(device) / 2**20
    return float(rss_mb)


def _features(image: torch.Tensor, scale: ScaleSettings) -> torch.Tensor:
    """MIND-SSC of the image smoothed for this scale."""
    smoothed = gaussian_smooth(image, scale.smoothing_vox) if scale.smoothing_vox > 0 else image
    return mind_ssc(smoothed, radius=1, dilation=scale.mind_dilation)


def register(
    fixed: Image,
    moving: Image,
    config: RegistrationConfig | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    progress: Progress | None = None,
) -> RegistrationResult:
    """Register `moving` to `fixed`: a Field on the fixed grid mapping fixed to moving points (LPS mm)."""
    config = config or RegistrationConfig()
    report_progress = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    kernel = load_kernel(config, device)

    report_progress(0.0, "resampling onto the working grid")
    pair = make_working_pair(fixed, moving, config.spacing_mm, device, fixed_mask, moving_mask)
    shape = tuple(pair.fixed.shape[2:])
    report_progress(0.05, "detecting keypoints")
    keypoints = forstner_keypoints(pair.fixed, pair.fixed_mask, config.max_keypoints, config.seed)
    if keypoints.shape[0] < 8:
        raise IkrError(
            f"only {keypoints.shape[0]} keypoints found in the fixed image's mask; too few to register"
        )
    kernel_features = mind_ssc(pair.fixed)

    dense = torch.zeros(1, 3, *shape, device=device)
    total = torch.zeros_like(keypoints)
    confidence = torch.ones(keypoints.shape[0], device=device)
    keep = torch.ones(keypoints.shape[0], dtype=torch.bool, device=device)
    n_scales = len(config.scales)
    with torch.no_grad():
        for s, scale in enumerate(config.scales):
            report_progress(0.1 + 0.8 * s / n_scales, f"scale {s + 1}/{n_scales}: matching")
            feat_fixed = _features(pair.fixed, scale)
            feat_moving = _features(warp_volume(pair.moving, dense), scale)
            forward, check = match_consistent(
                feat_fixed,
                feat_moving,
                keypoints,
                scale.search_radius_vox,
                threshold_vox=max(config.consistency_threshold_vox, scale.step_vox),
                step_vox=scale.step_vox,
            )
            residual = forward.displacement
            total = residual + sample_features(dense, keypoints + residual)
            confidence, keep = check.confidence, check.keep
            if int(keep.sum()) < 8:
                keep = torch.ones_like(keep)
            report_progress(0.1 + 0.8 * (s + 0.5) / n_scales, f"scale {s + 1}/{n_scales}: reconstructing")
            dense = reconstruct_dense(
                kernel,
                shape,
                keypoints[keep],
                total[keep],
                confidence[keep],
                kernel_features,
                config.control_step_vox,
            )

    report_progress(0.92, "writing the field on the fixed grid")
    field_fixed = dense_to_field(dense, pair.geometry, fixed.geometry)
    kp = keypoints.cpu().numpy().astype(np.float64)
    correspondences = Correspondences(
        pair.geometry.index_to_lps(kp),
        voxels_to_mm(total.cpu().numpy(), pair.geometry),
        (confidence * keep.float()).cpu().numpy(),
    )
    report = {
        "runtime_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device),
        "n_keypoints": int(keypoints.shape[0]),
        "n_keypoints_consistent": int(keep.sum()),
        "working_spacing_mm": config.spacing_mm,
        "working_size": list(pair.geometry.size),
        "config": config.to_dict(),
    }
    report_progress(1.0, "done")
    return RegistrationResult(field_fixed, correspondences, pair.geometry, report)
