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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.correspondences import Correspondences
from ..core.errors import IkrError
from ..core.fields import Field
from ..core.geometry import Geometry, Image, voxels_to_mm
from ..io.resources import ENCODER_WEIGHTS, KERNEL_WEIGHTS, weights_file
from .alignment import Alignment, align
from .config import DEFAULT_SCALES, FEATURE_NAMES, RegistrationConfig, ScaleSettings  # noqa: F401 (re-exported)
from .dense import DenseModel, split_by_region
from .features import FeatureExtractor, mind_ssc, sample_features
from .kernel import KernelConfig, make_kernel
from .key_optimisation import optimise_keys
from .keypoints import forstner_keypoints, lattice_keypoints
from .matching import match_consistent, match_keypoints
from .preprocess import MOVING_VIEW_MARGIN_MM, make_working_pair

Progress = Callable[[float, str], None]

# The shipped weights (model cards beside them in Resources/weights/, same stem, .md).
DEFAULT_WEIGHTS = weights_file(KERNEL_WEIGHTS)
DEFAULT_ENCODER = weights_file(ENCODER_WEIGHTS)


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


def load_features(config: RegistrationConfig, device: torch.device) -> FeatureExtractor:
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
    query_region: torch.Tensor | None = None,
    key_region: torch.Tensor | None = None,
    n_regions: int = 1,
) -> torch.Tensor:
    """The kernel's displacement (Q, 3) at query points from keys, features sampled from the volume; with
    regions, each query from the keys of its own region (dense.split_by_region)."""
    q_feat = k_feat = None
    if feature_volume is not None:
        q_feat = sample_features(feature_volume, query_xyz)
        k_feat = sample_features(feature_volume, key_xyz)
    if query_region is None or key_region is None:
        groups = [(torch.arange(query_xyz.shape[0]), torch.arange(key_xyz.shape[0]))]
    else:
        groups = split_by_region(query_region, key_region, n_regions)
    out = torch.zeros(query_xyz.shape[0], 3, device=query_xyz.device)
    for queries, keys in groups:
        queries, keys = queries.to(query_xyz.device), keys.to(query_xyz.device)
        out[queries] = kernel(
            query_xyz[queries][None].float(),
            None if q_feat is None else q_feat[queries][None],
            key_xyz[keys][None].float(),
            key_disp[keys][None].float(),
            None if k_feat is None else k_feat[keys][None],
            key_conf[keys][None],
        )[0]
    return out


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


def lungs_report(lungs: np.ndarray | None, geometry: Geometry, key_region: torch.Tensor) -> str:
    """The report's line on the lung mask: off, none found, or its volume and the keys inside it."""
    if lungs is None:
        return "not used (region-aware neighbourhoods off)"
    if not lungs.any():
        return "none found in the fixed image (no lungs in view): one region, every key"
    volume_ml = float(lungs.sum()) * float(np.prod(geometry.spacing_mm)) / 1000.0
    inside = int(key_region.sum())
    return (
        f"automatic lung mask of the fixed image, {volume_ml:.0f} ml: region-aware neighbourhoods "
        f"({inside} keys inside the lungs, {int(key_region.numel()) - inside} outside)"
    )


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
    # Building a kernel or an encoder draws initial weights (then replaced by a weights file's) from
    # torch's global RNG: draw them from a copy of it, so that the caller's RNG state stays as it was.
    # Nothing in the registration itself is random (keypoints and the residual take config.seed).
    with torch.random.fork_rng(devices=[]):
        kernel = load_kernel(config, device)
        extract = load_features(config, device)

    report_progress(0.0, "resampling onto the working grid")
    start_transform = None if alignment.is_identity else alignment.to_sitk()
    pair = make_working_pair(
        fixed, moving, config.spacing_mm, device, fixed_mask, moving_mask, start_transform, config.lung_regions
    )
    regions = None if pair.lungs is None or not pair.lungs.any() else torch.from_numpy(pair.lungs).to(device)
    report_progress(0.05, "detecting keypoints")
    keypoints = forstner_keypoints(
        pair.fixed, pair.fixed_mask, config.max_keypoints, config.seed, nms_radius_vox=config.keypoint_nms_vox
    )
    if config.lattice_keys > 0:
        keypoints = torch.cat([keypoints, lattice_keypoints(pair.fixed_mask, config.lattice_keys)])
    if keypoints.shape[0] < 8:
        raise IkrError(f"only {keypoints.shape[0]} keypoints found in the fixed image's mask; too few to register")
    kernel_features = mind_ssc(pair.fixed)
    model = DenseModel(kernel, kernel_features, pair.geometry, config.control_step_vox, alignment=alignment,
                       regions=regions)  # fmt: skip
    key_region = model.region_at(keypoints)
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
                    kernel, keypoints, keypoints[keep], total[keep], confidence[keep], kernel_features,
                    key_region, key_region[keep], model.n_regions,
                )  # fmt: skip
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
        key_report = None
        moving_mind = None
        if (config.key_iterations > 0 and model.local) or config.residual_iterations > 0:
            moving_mind = pyramid[1][1] if 1 in pyramid and extract is mind_ssc else mind_ssc(pair.moving)
            pyramid.clear()  # the matching is done: hold one copy of the moving descriptors, not two
            # channels last: both stages read it as a (voxels, channels) table (residual.channels_last), then a view
            moving_mind = moving_mind.float().contiguous(memory_format=torch.channels_last_3d)
        if config.key_iterations > 0 and model.local:
            report_progress(0.9, "optimising the keys against the images")
            total[keep], key_report = optimise_keys(
                model, keypoints[keep], total[keep], confidence[keep], moving_mind, pair.fixed_mask,
                config.key_optimisation_settings(), config.seed,
            )  # fmt: skip
        else:
            model.set_keys(keypoints[keep], total[keep], confidence[keep])
            if config.key_iterations > 0:
                key_report = {"skipped": "the TPS kernel is not local: its keys are not optimised"}
        residual_report = None
        if config.residual_iterations > 0:
            report_progress(0.92, "fitting the residual to the images")
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
            "lungs": lungs_report(pair.lungs, pair.geometry, key_region),
        },
        "working_size": list(pair.geometry.size),
        "key_optimisation": key_report,
        "residual": residual_report,
        "config": config.to_dict(),
    }
    report_progress(1.0, "done")
    return RegistrationResult(field_fixed, correspondences, pair.geometry, report, model, alignment)
