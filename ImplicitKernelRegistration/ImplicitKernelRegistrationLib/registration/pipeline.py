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

from ..core.correspondences import Correspondences
from ..core.errors import IkrError
from ..core.fields import Field
from ..core.geometry import Geometry, Image
from ..io.resources import ENCODER_WEIGHTS, KERNEL_WEIGHTS, weights_file
from .alignment import Alignment, align
from .dense import DenseModel
from .features import mind_ssc, sample_features
from .kernel import KernelConfig, make_kernel
from .keypoints import forstner_keypoints, lattice_keypoints
from .matching import match_consistent, match_keypoints
from .preprocess import MOVING_VIEW_MARGIN_MM, make_working_pair
from .residual import ResidualSettings

Progress = Callable[[float, str], None]

# The shipped weights (model cards beside them in Resources/weights/, same stem, .md).
DEFAULT_WEIGHTS = weights_file(KERNEL_WEIGHTS)
DEFAULT_ENCODER = weights_file(ENCODER_WEIGHTS)
FEATURE_NAMES = ("mind", "learned")


@dataclass(frozen=True)
class ScaleSettings:
    """One level of the hierarchy: image pooling factor, search cube radius and step (pooled voxels).

    check: run the backward match and drop keypoints whose round trip fails (forward/backward
    consistency); without it every forward match is kept with its own confidence.
    """

    downsample: int
    search_radius_vox: int
    step_vox: float
    check: bool = True


# At a 2 mm working grid the five searches reach +-32, +-12, +-6, +-4 and +-2 mm around the
# current estimate, on images pooled to 8, 4, 2, 2 and 2 mm. The two coarse scales skip the backward
# match: the finer scales search around their result again and do check it (this saves a quarter of
# the runtime and left the TRE unchanged on the thorax and abdomen cases of bench/).
DEFAULT_SCALES: tuple[ScaleSettings, ...] = (
    ScaleSettings(4, 4, 1.0, check=False),
    ScaleSettings(2, 3, 1.0, check=False),
    ScaleSettings(1, 3, 1.0),
    ScaleSettings(1, 2, 1.0),
    ScaleSettings(1, 2, 0.5),
)


@dataclass
class RegistrationConfig:
    """Settings of one registration; every field is recorded in the report."""

    spacing_mm: float = 2.0
    # Rigid by default: on an already aligned breathing-like case (bench clinical set, abdomen) an affine
    # start cost 0.23 mm of TRE (1.19 against 0.96 mm without alignment), a rigid one 0.01 mm; both recover
    # a repositioned patient (test_alignment).
    alignment: str = "rigid"
    kernel: str = "learned"
    heads: str = "both"
    weights: str | None = None
    features: str = "mind"
    encoder_weights: str | None = None
    max_keypoints: int = 2048
    # Denser keys (bench/results/accuracy_dev.md, session 4): a non-maximum suppression radius of 2 working
    # voxels (3: the detector's default) and about 1000 keys on a regular lattice inside the fixed mask
    # (keypoints.lattice_keypoints; 0: none) lowered the TRE on every independent case of bench/ (mean 0.77 ->
    # 0.65 mm) but folded the field on the two contrast-and-ablation liver cases (0.3-0.4 % of the body):
    # off by default until the lattice keys' matches are made safer there.
    keypoint_nms_vox: int = 3
    lattice_keys: int = 0
    device: str = "auto"
    seed: int = 0
    control_step_vox: int = 5
    consistency_threshold_vox: float = 1.5
    # The residual fitted to the images after the last scale (residual.py); 0 iterations: none. Off by
    # default for now: it lowers the TRE on most independent cases but not on breathing-like ones, and
    # costs seconds on the CPU (bench/results/accuracy_dev.md); turn it on with 30 iterations.
    residual_iterations: int = 0
    residual_step_vox: int = 3
    residual_learning_rate: float = 0.1
    residual_smoothness: float = 1.0
    residual_points: int = 16384
    scales: tuple[ScaleSettings, ...] = field(default_factory=lambda: DEFAULT_SCALES)

    def residual_settings(self) -> ResidualSettings:
        """The residual_* fields as the residual stage's settings."""
        return ResidualSettings(
            self.residual_iterations,
            self.residual_step_vox,
            self.residual_learning_rate,
            self.residual_smoothness,
            self.residual_points,
        )

    def to_dict(self) -> dict:
        """JSON-serialisable settings."""
        out = asdict(self)
        out["scales"] = [asdict(s) for s in self.scales]
        return out

    @staticmethod
    def from_dict(data: dict) -> RegistrationConfig:
        """Inverse of to_dict (unknown keys are an error)."""
        values = dict(data)
        scales = tuple(ScaleSettings(**s) for s in values.pop("scales", [asdict(s) for s in DEFAULT_SCALES]))
        try:
            return RegistrationConfig(**values, scales=scales)
        except TypeError as err:
            raise IkrError(f"unknown registration settings ({err})") from err


@dataclass
class RegistrationResult:
    """The field on the fixed grid, the correspondences it was built from, and the report."""

    field: Field
    correspondences: Correspondences
    working_geometry: Geometry
    report: dict
    model: DenseModel
    alignment: Alignment = field(default_factory=Alignment.identity)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda` where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IkrError("--device cuda was requested but no CUDA device is available (use --device auto or cpu)")
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


def load_features(config: RegistrationConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The matching features named by the config: MIND-SSC, or the learned encoder (shipped weights by default)."""
    if config.features == "mind":
        return mind_ssc
    if config.features != "learned":
        raise IkrError(f"unknown features {config.features!r}; choose one of {', '.join(FEATURE_NAMES)}")
    from .encoder import load_encoder

    weights = Path(config.encoder_weights) if config.encoder_weights else DEFAULT_ENCODER
    return load_encoder(weights)[0].to(device)


def pool(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a (1,C,D,H,W) volume by an integer factor (identity for 1)."""
    return volume if factor == 1 else F.avg_pool3d(volume, factor, ceil_mode=True)


def to_pooled(points_xyz: torch.Tensor, factor: int) -> torch.Tensor:
    """Working-voxel coordinates -> coordinates on the grid pooled by `factor`."""
    return (points_xyz - (factor - 1) / 2.0) / factor


def kernel_at_points(
    kernel: torch.nn.Module,
    query_xyz: torch.Tensor,
    key_xyz: torch.Tensor,
    key_disp: torch.Tensor,
    key_conf: torch.Tensor,
    feature_volume: torch.Tensor | None,
) -> torch.Tensor:
    """The kernel's displacement (Q, 3) at query points from keys, features sampled from the volume."""
    q_feat = k_feat = None
    if feature_volume is not None:
        q_feat = sample_features(feature_volume, query_xyz)[None]
        k_feat = sample_features(feature_volume, key_xyz)[None]
    out = kernel(query_xyz[None].float(), q_feat, key_xyz[None].float(), key_disp[None].float(), k_feat, key_conf[None])
    return out[0]


def voxels_to_mm(displacement_vox: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacements (..., 3) in working voxels (x, y, z) -> LPS mm (direction and spacing applied)."""
    return np.asarray(displacement_vox, dtype=np.float64) @ geometry.voxel_to_mm_matrix().T


def mm_to_voxels(displacement_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Displacements (..., 3) in LPS mm -> working voxels (x, y, z)."""
    return np.asarray(displacement_mm, dtype=np.float64) @ np.linalg.inv(geometry.voxel_to_mm_matrix()).T


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process and its children so far (resident set; plus CUDA's peak on a GPU), MB.

    Linux's VmHWM is this process's own peak (every thread included); getrusage's ru_maxrss (the
    fallback elsewhere) can carry a parent's peak over into a child process. Children that have
    ended add their largest peak (RUSAGE_CHILDREN): the sum bounds the peak of the whole command.
    Called at the end of a command (after its outputs are written), it is the peak the user saw.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next(row for row in status if row.startswith("VmHWM:"))
        rss_mb = float(line.split()[1]) / 1024.0
    except (OSError, StopIteration, ValueError, IndexError):
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    rss_mb += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    if device.type == "cuda":
        rss_mb += torch.cuda.max_memory_allocated(device) / 2**20
    return float(rss_mb)


def register(
    fixed: Image,
    moving: Image,
    config: RegistrationConfig | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    progress: Progress | None = None,
    initial: Alignment | None = None,
) -> RegistrationResult:
    """Register `moving` to `fixed`: a Field on the fixed grid mapping fixed to moving points (LPS mm).

    First the initial alignment (`config.alignment`: affine, rigid or none; started from `initial`
    when given), then the deformable hierarchy on the moving image seen through it; the field
    includes the alignment. On a GPU that runs out of memory the registration is run again on the
    CPU, and the report says so.
    """
    config = config or RegistrationConfig()
    device = resolve_device(config.device)
    start = time.perf_counter()
    if progress is not None:
        progress(
            0.0,
            {"rigid": "aligning (rigid)", "affine": "aligning (rigid, then affine)"}.get(config.alignment, "starting"),
        )
    aligned = align(fixed, moving, config.alignment, initial)
    try:
        result = _register_on(fixed, moving, config, device, fixed_mask, moving_mask, progress, aligned.alignment)
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        result = _register_on(fixed, moving, config, cpu, fixed_mask, moving_mask, progress, aligned.alignment)
        result.report["device_note"] = "the GPU ran out of memory; this registration ran on the CPU"
    result.report["alignment"] = aligned.report
    result.report["runtime_s"] = round(time.perf_counter() - start, 3)
    return result


def _register_on(
    fixed: Image,
    moving: Image,
    config: RegistrationConfig,
    device: torch.device,
    fixed_mask: Image | None,
    moving_mask: Image | None,
    progress: Progress | None,
    alignment: Alignment,
) -> RegistrationResult:
    """The deformable registration on one device, after the alignment (see `register`)."""
    report_progress = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    kernel = load_kernel(config, device)
    extract = load_features(config, device)

    report_progress(0.0, "resampling onto the working grid")
    start_transform = None if alignment.is_identity else alignment.to_sitk()
    pair = make_working_pair(fixed, moving, config.spacing_mm, device, fixed_mask, moving_mask, start_transform)
    report_progress(0.05, "detecting keypoints")
    keypoints = forstner_keypoints(
        pair.fixed, pair.fixed_mask, config.max_keypoints, config.seed, nms_radius_vox=config.keypoint_nms_vox
    )
    if config.lattice_keys > 0:
        keypoints = torch.cat([keypoints, lattice_keypoints(pair.fixed_mask, config.lattice_keys)])
    if keypoints.shape[0] < 8:
        raise IkrError(f"only {keypoints.shape[0]} keypoints found in the fixed image's mask; too few to register")
    kernel_features = mind_ssc(pair.fixed)
    pyramid: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    total = torch.zeros_like(keypoints)
    confidence = torch.ones(keypoints.shape[0], device=device)
    keep = torch.ones(keypoints.shape[0], dtype=torch.bool, device=device)
    n_scales = len(config.scales)
    with torch.no_grad():
        for s, scale in enumerate(config.scales):
            f = scale.downsample
            report_progress(0.1 + 0.8 * s / n_scales, f"scale {s + 1}/{n_scales}: matching")
            if f not in pyramid:
                reuse = f == 1 and extract is mind_ssc
                fixed_features = kernel_features if reuse else extract(pool(pair.fixed, f))
                pyramid[f] = (fixed_features, extract(pool(pair.moving, f)))
            prior = total
            if s > 0:
                prior = kernel_at_points(
                    kernel, keypoints, keypoints[keep], total[keep], confidence[keep], kernel_features
                )
            if scale.check:
                forward, check = match_consistent(
                    *pyramid[f],
                    to_pooled(keypoints, f),
                    scale.search_radius_vox,
                    threshold_vox=config.consistency_threshold_vox,
                    step_vox=scale.step_vox,
                    prior=prior / f,
                )
                confidence, keep = check.confidence, check.keep
            else:
                forward = match_keypoints(
                    *pyramid[f], to_pooled(keypoints, f), scale.search_radius_vox, scale.step_vox, prior=prior / f
                )
                confidence, keep = forward.confidence, torch.ones_like(keep)
            total = forward.displacement * f
            if int(keep.sum()) < 8:
                keep = torch.ones_like(keep)
        report_progress(0.9, "reconstructing the dense field")
        model = DenseModel(kernel, kernel_features, pair.geometry, config.control_step_vox, alignment=alignment)
        model.set_keys(keypoints[keep], total[keep], confidence[keep])
        residual_report = None
        if config.residual_iterations > 0:
            report_progress(0.92, "fitting the residual to the images")
            moving_mind = pyramid[1][1] if 1 in pyramid and extract is mind_ssc else mind_ssc(pair.moving)
            residual_report = model.fit_residual(moving_mind, pair.fixed_mask, config.residual_settings(), config.seed)
        report_progress(0.95, "sampling the field onto the fixed grid")
        field_fixed = model.field_on(fixed.geometry)

    fixed_points = pair.geometry.index_to_lps(keypoints.cpu().numpy().astype(np.float64))
    moving_points = alignment.apply(fixed_points + voxels_to_mm(total.cpu().numpy(), pair.geometry))
    correspondences = Correspondences(
        fixed_points, moving_points - fixed_points, (confidence * keep.float()).cpu().numpy()
    )
    report = {
        "runtime_s": round(time.perf_counter() - start, 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": str(device),
        "n_keypoints": int(keypoints.shape[0]),
        "n_keypoints_consistent": int(keep.sum()),
        "working_spacing_mm": config.spacing_mm,
        "masks": {
            "keypoints": "the given fixed mask" if fixed_mask is not None else "automatic body mask of the fixed image",
            "moving": "the given moving mask" if moving_mask is not None else "none",
            "moving_field_of_view": f"keys kept {MOVING_VIEW_MARGIN_MM:g} mm inside the moving image (after alignment)",
            "alignment_metric": "automatic body mask of the fixed image",
        },
        "working_size": list(pair.geometry.size),
        "residual": residual_report,
        "config": config.to_dict(),
    }
    report_progress(1.0, "done")
    return RegistrationResult(field_fixed, correspondences, pair.geometry, report, model, alignment)
