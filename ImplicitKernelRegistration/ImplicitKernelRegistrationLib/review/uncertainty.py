"""Where is the field unsure? An expected-error map, click suggestions, and the margin with an error bar.

Signals, per key then per control point of the DenseModel (all cheap: one kernel pass over the keys):
- the kernel's leave-fold-out residual of each key: the keys are split into N_FOLDS random folds and
  each fold is predicted by the kernel from the other folds (|key displacement - prediction|, mm);
  a clicked (user) key counts as exact (residual 0);
- the key's match confidence (0..1; the forward/backward check lowers it, user keys are 1);
- the distance to the nearest key and to the K-th nearest key (local key density), mm;
- the local displacement gradient (Frobenius norm of the field's Jacobian minus identity);
- the length of the residual fitted to the images (DenseModel.residual; zero when off), mm.
The per-key signals are averaged over each control point's K nearest keys with Shepard weights
1 / (SHEPARD_VOX^2 + r^2). A log-linear model maps them to log(error + EPS_MM); its coefficients and
the empirical quantiles of its residuals (for the 90 % interval and the mean) were fitted on synthetic
cases with known truth (Resources/weights/uncertainty_v1.json, model card uncertainty_v1.md). Around
a clicked pair the field is exact (refine.py's correction), so the map falls to CLICK_ERROR_MM there,
blended with Wendland's function over the correction radius.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..core.errors import IkrError
from ..core.fields import Field
from ..core.filters import gaussian_smooth
from ..core.geometry import Geometry, Image, voxels_to_mm
from ..io.atomic import write_text_atomic
from ..io.resources import UNCERTAINTY_PARAMS, weights_file
from ..registration.dense import DenseModel
from ..registration.features import mind_ssc, sample_features
from ..registration.pipeline import RegistrationResult
from ..registration.preprocess import BODY_THRESHOLD_HU, CT_WINDOW_HU, normalise_ct, resample_to
from ..registration.refine import CORRECTION_RADIUS_MM, RefinementSession, wendland

if TYPE_CHECKING:
    from .margin import MarginResult  # margin imports vtk (about 0.3 s): only margin_interval needs it

PARAMS_FORMAT = "ikr-uncertainty-v1"
DEFAULT_PARAMS = weights_file(UNCERTAINTY_PARAMS)
KEY_FEATURES = (
    "bias",
    "log_loo",
    "log_nearest",
    "log_kth",
    "unconfidence",
    "log_gradient",
    "log_spread",
    "log_disp",
    "log_border",
    "log_residual",
)
IMAGE_FEATURES = (  # need the moving image
    "log_mismatch",
    "log_texture",
    "log_depth",
    "log_flow",
    "log_structure",
    "log_flow_coarse",
)
FEATURE_NAMES = KEY_FEATURES + IMAGE_FEATURES
BLOCK_MM = 3.0  # the image features' grid: the working grid's voxels averaged over blocks of about this size
WINDOW_MM = 6.0  # the image features' Gaussian window (sigma); twice both for the coarse flow
N_FOLDS = 10
SHEPARD_VOX = 2.0
EPS_MM = 0.1
CLICK_ERROR_MM = 1.0
NEIGHBOURHOOD_MM = 15.0  # about the reach of one clicked pair (refine.CORRECTION_RADIUS_MM)
NEAR_MASK_MM = 30.0  # suggestions near a tumour mask lie within this distance of it
CORRELATION_MM = 20.0  # smoothness of the sampled field perturbations
MEAN_NORM_PER_SIGMA = float(np.sqrt(8.0 / np.pi))  # E|e| of a 3D isotropic Gaussian per unit sigma
SLAB = 16  # z slices per step of the expected-error map
_BODY_LEVEL = (BODY_THRESHOLD_HU - CT_WINDOW_HU[0]) / (CT_WINDOW_HU[1] - CT_WINDOW_HU[0])  # on normalise_ct's scale


@dataclass
class UncertaintyModel:
    """log(error + EPS_MM) = features @ coef + residual; residual quantiles give the interval and mean.

    `features` names the model's inputs (a subset of FEATURE_NAMES, "bias" first). A model that uses
    image features carries `without_image`, a model of the key features alone fitted on the same
    points, for callers that cannot give the moving image.
    """

    coef: np.ndarray
    residual_q05: float
    residual_q95: float
    mean_factor: float
    metadata: dict = field(default_factory=dict)
    features: tuple[str, ...] = KEY_FEATURES
    without_image: UncertaintyModel | None = None

    def log_error(self, features: np.ndarray) -> np.ndarray:
        """The predicted median of log(error + EPS_MM) for (N, F) features (F = len(self.features))."""
        return np.asarray(features, dtype=np.float64) @ self.coef

    def expected_from_log(self, mu: np.ndarray) -> np.ndarray:
        """Expected error (mm) from the predicted log error."""
        return np.maximum(np.exp(mu) * self.mean_factor - EPS_MM, 0.0)

    def interval_from_log(self, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 5th and 95th percentile of the error (mm) from the predicted log error."""
        lo = np.maximum(np.exp(mu + self.residual_q05) - EPS_MM, 0.0)
        return lo, np.maximum(np.exp(mu + self.residual_q95) - EPS_MM, 0.0)

    @property
    def needs_moving(self) -> bool:
        """Whether the model uses an image feature (computed from the moving image)."""
        return any(name in IMAGE_FEATURES for name in self.features)

    def for_inputs(self, moving: Image | None) -> UncertaintyModel:
        """The model to use: this one, or without the moving image its key-feature model."""
        if moving is not None or not self.needs_moving:
            return self
        if self.without_image is None:
            raise IkrError("this uncertainty model needs the moving image (its features compare the two images)")
        return self.without_image

    def to_dict(self) -> dict:
        """JSON-serialisable parameters."""
        out = {
            "format": PARAMS_FORMAT,
            "features": list(self.features),
            "coef": [float(v) for v in self.coef],
            "residual_q05": float(self.residual_q05),
            "residual_q95": float(self.residual_q95),
            "mean_factor": float(self.mean_factor),
            "eps_mm": EPS_MM,
            "metadata": self.metadata,
        }
        if self.without_image is not None:
            out["without_image"] = self.without_image.to_dict()
        return out

    @staticmethod
    def from_dict(data: dict, path: Path | None = None) -> UncertaintyModel:
        """Inverse of to_dict; refuses other formats and unknown features."""
        if not isinstance(data, dict) or data.get("format") != PARAMS_FORMAT:
            raise IkrError(f"not an {PARAMS_FORMAT} parameters file", path)
        names = tuple(data.get("features", ()))
        if not names or names[0] != "bias" or any(n not in FEATURE_NAMES for n in names):
            raise IkrError(f"the uncertainty parameters use unknown features: {data.get('features')}", path)
        try:
            inner = data.get("without_image")
            model = UncertaintyModel(
                np.asarray(data["coef"], dtype=np.float64),
                float(data["residual_q05"]),
                float(data["residual_q95"]),
                float(data["mean_factor"]),
                dict(data.get("metadata") or {}),
                names,
                None if inner is None else UncertaintyModel.from_dict(inner, path),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise IkrError(f"incomplete uncertainty parameters ({err})", path) from err
        if model.coef.shape != (len(names),):
            raise IkrError(f"{len(model.coef)} coefficients for {len(names)} features", path)
        if model.without_image is not None and model.without_image.needs_moving:
            raise IkrError("the model without the moving image uses image features", path)
        return model


def load_uncertainty_model(path: Path | None = None) -> UncertaintyModel:
    """The fitted parameters (the shipped ones unless a path is given)."""
    path = Path(path or DEFAULT_PARAMS)
    if not path.is_file():
        raise IkrError("the uncertainty model's parameters are missing (run bench/uncertainty.py --fit)", path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IkrError(f"unreadable uncertainty parameters ({err})", path) from err
    return UncertaintyModel.from_dict(data, path)


def save_uncertainty_model(model: UncertaintyModel, path: Path) -> Path:
    """Write the parameters as JSON, atomically."""
    write_text_atomic(Path(path), json.dumps(model.to_dict(), indent=2) + "\n")
    return Path(path)


# ------------------------------------------------------------------------------------------- signals


def _source_parts(source: RegistrationResult | RefinementSession) -> tuple[DenseModel, np.ndarray, Geometry]:
    """The dense model, the user pairs' fixed points (LPS, (U, 3)) and the fixed grid of a result or session."""
    if isinstance(source, RefinementSession):
        pairs = np.array([p.fixed_lps for p in source.pairs]).reshape(-1, 3)
        return source.model, pairs, source.target
    if isinstance(source, RegistrationResult):
        return source.model, np.zeros((0, 3)), source.field.geometry
    raise IkrError(
        f"a {type(source).__name__} carries no uncertainty signals (expected a registration result or a "
        "refinement session of this version)"
    )


def _check_model(model: object) -> None:
    """Refuse a model without keys or neighbour bookkeeping (an older session)."""
    needed = ("keys", "disp", "conf", "neighbours", "kth_distance", "points", "control_shape", "kernel")
    if not all(hasattr(model, name) for name in needed) or model.keys.shape[0] < 2 or model.neighbours.numel() == 0:
        raise IkrError("this registration has no kernel key set to estimate its uncertainty from (older version?)")


def key_loo_residuals(model: DenseModel, n_folds: int = N_FOLDS, seed: int = 0) -> np.ndarray:
    """Leave-fold-out residual (mm) of each key: predicted by the kernel from the keys of the other folds."""
    _check_model(model)
    n = model.keys.shape[0]
    folds = np.random.default_rng(seed).permutation(n) % max(2, min(n_folds, n))
    pred = torch.zeros_like(model.disp)
    feats = model.key_features
    with torch.no_grad():
        for f in np.unique(folds):
            held = torch.from_numpy(np.nonzero(folds == f)[0]).to(model.device)
            rest = torch.from_numpy(np.nonzero(folds != f)[0]).to(model.device)
            pred[held] = model.kernel(
                model.keys[held][None],
                None if feats is None else feats[held][None],
                model.keys[rest][None],
                model.disp[rest][None],
                None if feats is None else feats[rest][None],
                model.conf[rest][None],
            )[0]
    diff = voxels_to_mm((model.disp - pred).cpu().numpy(), model.working)
    return np.linalg.norm(diff, axis=1)


def _control_gradient(model: DenseModel) -> np.ndarray:
    """Frobenius norm of the displacement's Jacobian on the control grid (dimensionless), (P,)."""
    grid = math.prod(model.control_shape)  # the control grid's rows (region ghosts follow them; dense.py)
    values = voxels_to_mm(model.values[:grid].cpu().numpy(), model.working).reshape(*model.control_shape, 3)
    steps = _control_spacing_mm(model)[::-1]  # z, y, x
    norm2 = np.zeros(model.control_shape)
    for c in range(3):
        for axis, step in enumerate(steps):
            if model.control_shape[axis] > 1:
                norm2 += np.gradient(values[..., c], step, axis=axis) ** 2
    return np.sqrt(norm2).reshape(-1)


def _control_spacing_mm(model: DenseModel) -> np.ndarray:
    """The control grid's spacing (x, y, z) in mm."""
    n = np.asarray(model.working.size, dtype=np.float64)
    m = np.asarray(model.control_shape[::-1], dtype=np.float64)
    return np.asarray(model.working.spacing_mm) * (n - 1) / np.maximum(m - 1, 1)


def _residual_length(model: DenseModel) -> np.ndarray:
    """The length (mm) of the residual fitted to the images (DenseModel.residual; 0 when off) at every control point."""
    with torch.no_grad():
        values = model.residual_at(model.points[: math.prod(model.control_shape)]).cpu().numpy()
    return np.linalg.norm(voxels_to_mm(values, model.working), axis=1)


def _key_signals(model: DenseModel, n_user: int, seed: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The features drawn from the keys and the field, at every control point: name -> (P,). The leave-fold-out
    residuals (N_FOLDS kernel passes, most of the cost) only when `names` holds log_loo."""
    conf = np.clip(model.conf.cpu().numpy(), 0.0, 1.0)
    if n_user:
        conf[-n_user:] = 1.0
    vox_mm = float(np.mean(model.working.spacing_mm))
    grid = math.prod(model.control_shape)  # the control grid's rows (region ghosts follow them; dense.py)
    nb = model.neighbours[:grid].cpu().numpy()
    points = model.points[:grid].cpu().numpy()
    r = np.linalg.norm(model.keys.cpu().numpy()[nb] - points[:, None], axis=-1)
    w = 1.0 / (SHEPARD_VOX**2 + r**2)
    w /= w.sum(axis=1, keepdims=True)
    kth = model.kth_distance[:grid].cpu().numpy() * vox_mm
    disp = voxels_to_mm(model.disp.cpu().numpy(), model.working)[nb]  # (P, K, 3) mm
    mean = np.sum(w[..., None] * disp, axis=1)
    spread = np.sqrt(np.sum(w * np.sum((disp - mean[:, None]) ** 2, axis=-1), axis=1))
    values = np.linalg.norm(voxels_to_mm(model.values[:grid].cpu().numpy(), model.working), axis=1)
    size = np.asarray(model.working.size, dtype=np.float64)
    border = np.min(np.minimum(points, size - 1 - points) * np.asarray(model.working.spacing_mm), axis=1)
    signals = {
        "bias": np.ones(len(nb)),
        "log_nearest": np.log(r[:, 0] * vox_mm + 1.0),
        "log_kth": np.log(kth + 1.0),
        "unconfidence": np.sum(w * (1.0 - conf[nb]), axis=1),
        "log_gradient": np.log(_control_gradient(model) + 0.01),
        "log_spread": np.log(spread + EPS_MM),
        "log_disp": np.log(values + 1.0),
        "log_border": np.log(np.maximum(border, 0.0) + 1.0),
        "log_residual": np.log(_residual_length(model) + EPS_MM),
    }
    if "log_loo" in names:
        loo = key_loo_residuals(model, seed=seed)
        if n_user:
            loo[-n_user:] = 0.0
        signals["log_loo"] = np.log(np.sum(w * loo[nb], axis=1) + EPS_MM)
    return signals


def _gradient(volume: torch.Tensor, dim: int) -> torch.Tensor:
    """Central differences (one-sided at the ends) of a tensor along `dim`, in voxels."""
    n = volume.shape[dim]
    if n < 2:
        return torch.zeros_like(volume)
    out = torch.empty_like(volume)
    out.narrow(dim, 1, n - 2).copy_((volume.narrow(dim, 2, n - 2) - volume.narrow(dim, 0, n - 2)) / 2.0)
    out.narrow(dim, 0, 1).copy_(volume.narrow(dim, 1, 1) - volume.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).copy_(volume.narrow(dim, n - 1, 1) - volume.narrow(dim, n - 2, 1))
    return out


def _windowed(volume: torch.Tensor, sigma: tuple[float, ...]) -> torch.Tensor:
    """A Gaussian window of (1, C, D, H, W) computed on blocks of 2 voxels: block means, then a Gaussian of
    `sigma` (in blocks); the result lies on the block grid (half the size)."""
    return gaussian_smooth(F.avg_pool3d(volume, 2, ceil_mode=True), sigma)


def _local_flow(fixed_mind: torch.Tensor, warped_mind: torch.Tensor, sigma: tuple[float, ...]) -> torch.Tensor:
    """Lucas-Kanade on MIND: the structure tensor T (6 entries) and its right-hand side b (3), windowed.

    Returns (1, 9, D/2, H/2, W/2) on blocks of 2 voxels (`_windowed`): Txx, Tyy, Tzz, Txy, Txz, Tyz, bx, by, bz
    (gradients in voxels of the input grid), so that the local offset d (input voxels, x y z) that would
    bring the warped moving image onto the fixed one solves T d = -b.
    """
    moving = warped_mind[0].float()  # (C, D, H, W)
    g = (_gradient(moving, 3), _gradient(moving, 2), _gradient(moving, 1))  # x, y, z
    diff = moving - fixed_mind[0].float()
    entries = [(g[i] * g[j]).sum(dim=0) for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    entries += [(g[i] * diff).sum(dim=0) for i in range(3)]
    return _windowed(torch.stack(entries)[None], sigma)


def _flow_signals(tensor: np.ndarray, spacing_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Lucas-Kanade offset's length (mm) and the structure tensor's smallest eigenvalue, from (P, 9) samples."""
    t = np.empty((len(tensor), 3, 3))
    for k, (i, j) in enumerate(((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))):
        t[:, i, j] = t[:, j, i] = tensor[:, k]
    lam = 0.01 * float(np.mean(np.trace(t, axis1=1, axis2=2))) + 1e-12
    d = -np.linalg.solve(t + lam * np.eye(3), tensor[:, 6:9, None])[..., 0]
    return np.linalg.norm(d * spacing_xyz, axis=1), np.maximum(np.linalg.eigvalsh(t)[:, 0], 0.0) / lam


def image_signals(model: DenseModel, moving: Image, names: tuple[str, ...] = IMAGE_FEATURES) -> dict[str, np.ndarray]:
    """The image features `names` at every control point, from the moving image warped by the model's field.

    The MIND-SSC descriptors of the fixed image (the model's own) and of the warped moving image are
    averaged over blocks of about BLOCK_MM and compared there, in a Gaussian window (WINDOW_MM, computed
    on blocks twice as large): log_flow: the length (mm) of the local offset that Lucas-Kanade on the
    two finds (what is left to register there); log_flow_coarse: the same on blocks and in a window
    twice as large; log_structure: the window's smallest structure-tensor eigenvalue (relative to the
    mean trace: can the images tell the offset at all?); log_mismatch: their mean squared difference
    in the window; log_texture: the warped image's gradient magnitude (normalised CT per mm) in the
    window; log_depth: distance (mm) inside the body (> BODY_THRESHOLD_HU) of the warped image.
    """
    work = model.working
    warped = resample_to(moving, work, transform=model.field_on(work).to_sitk_transform())
    image = torch.from_numpy(normalise_ct(warped.array))[None, None].to(model.device)
    factor = tuple(max(1, int(round(BLOCK_MM / s))) for s in work.spacing_mm[::-1])  # z, y, x
    block_mm = np.asarray(work.spacing_mm)[::-1] * np.asarray(factor)
    sigma = tuple(float(v) for v in WINDOW_MM / (2.0 * block_mm))  # in blocks of two
    # control points (working voxels, x y z) -> block coordinates: centre of block i is (i + 0.5) f - 0.5
    f_xyz = torch.tensor(factor[::-1], dtype=torch.float32, device=model.points.device)
    control = model.points[: math.prod(model.control_shape)]  # the control grid (region ghosts follow it)
    on_block = (control + 0.5) / f_xyz - 0.5
    on_half = (on_block + 0.5) / 2.0 - 0.5
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        fixed = F.avg_pool3d(model.features.float(), factor, ceil_mode=True)
        warped_mind = F.avg_pool3d(mind_ssc(image), factor, ceil_mode=True)
        tensor = sample_features(_local_flow(fixed, warped_mind, sigma), on_half).cpu().numpy()
        offset_mm, structure = _flow_signals(tensor, block_mm[::-1])
        out["log_flow"], out["log_structure"] = np.log(offset_mm + EPS_MM), np.log(structure + 1e-3)
        if "log_flow_coarse" in names:
            half = (F.avg_pool3d(fixed, 2, ceil_mode=True), F.avg_pool3d(warped_mind, 2, ceil_mode=True))
            coarse = sample_features(_local_flow(*half, sigma), (on_half + 0.5) / 2.0 - 0.5).cpu().numpy()
            out["log_flow_coarse"] = np.log(_flow_signals(coarse, 2.0 * block_mm[::-1])[0] + EPS_MM)
        if "log_mismatch" in names:
            mismatch = (warped_mind - fixed).square().mean(dim=1, keepdim=True)
            out["log_mismatch"] = np.log(
                sample_features(_windowed(mismatch, sigma), on_half).cpu().numpy()[:, 0] + 1e-3
            )
        if "log_texture" in names:
            pooled = F.avg_pool3d(image, factor, ceil_mode=True)[0, 0]
            grads = [_gradient(pooled, d) / float(block_mm[d]) for d in range(3)]
            texture = _windowed(torch.sqrt(sum(g.square() for g in grads))[None, None], sigma)
            out["log_texture"] = np.log(sample_features(texture, on_half).cpu().numpy()[:, 0] + 1e-3)
        if "log_depth" in names:
            body = F.avg_pool3d((image > _BODY_LEVEL).float(), factor, ceil_mode=True)[0, 0].cpu().numpy() > 0.5
            depth = ndimage.distance_transform_edt(body, sampling=block_mm)
            at = ndimage.map_coordinates(depth, on_block.cpu().numpy()[:, ::-1].T, order=1, mode="nearest")
            out["log_depth"] = np.log(at + 1.0)
    return out


def control_features(
    model: DenseModel,
    n_user: int = 0,
    seed: int = 0,
    moving: Image | None = None,
    names: tuple[str, ...] | None = None,
) -> np.ndarray:
    """The features `names` (P, F) at every control point; the last n_user keys are clicks.

    By default the features of the shipped model for these inputs (UncertaintyModel.for_inputs). The
    image features need `moving` (and the model's fixed features, MIND-SSC of the fixed image).
    """
    if names is None:
        names = load_uncertainty_model().for_inputs(moving).features
    wanted = [n for n in names if n in IMAGE_FEATURES]
    if wanted and (moving is None or model.features is None):
        raise IkrError(f"the image features {wanted} need the moving image and the fixed image's features")
    signals = _key_signals(model, n_user, seed, tuple(names)) if any(n in KEY_FEATURES[1:] for n in names) else {}
    signals["bias"] = np.ones(math.prod(model.control_shape))
    if wanted:
        signals.update(image_signals(model, moving, tuple(wanted)))
    return np.stack([signals[n] for n in names], axis=1)


def _control_geometry(model: DenseModel) -> Geometry:
    """The control grid as a Geometry (same origin and direction as the working grid)."""
    return Geometry(
        tuple(int(v) for v in model.control_shape[::-1]),
        tuple(float(v) for v in _control_spacing_mm(model)),
        model.working.origin_lps,
        model.working.direction,
    )


def _control_at_points(model: DenseModel, values: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear samples (N, F) of control-grid values (P, F) at LPS points (nearest value beyond the grid)."""
    grid = _control_geometry(model)
    idx = grid.lps_to_index(np.atleast_2d(points_lps))[:, ::-1].T
    vol = values.reshape(*model.control_shape, -1)
    return np.stack(
        [ndimage.map_coordinates(vol[..., f], idx, order=1, mode="nearest") for f in range(vol.shape[-1])], axis=1
    )


def point_features(
    source: RegistrationResult | RefinementSession,
    points_lps: np.ndarray,
    moving: Image | None = None,
    names: tuple[str, ...] = FEATURE_NAMES,
) -> np.ndarray:
    """The features `names` (N, F) at fixed-space points (for fitting; image features need `moving`)."""
    model, pairs, _ = _source_parts(source)
    return _control_at_points(model, control_features(model, len(pairs), moving=moving, names=names), points_lps)


def _model_features(params: UncertaintyModel, model: DenseModel, n_user: int, moving: Image | None) -> np.ndarray:
    """The features of `params` (already chosen for the inputs) at every control point."""
    return control_features(model, n_user, moving=moving, names=params.features)


def _click_factor(pairs: np.ndarray, points_lps: np.ndarray) -> np.ndarray:
    """Wendland weight (N,) of the nearest clicked pair: 1 at a pair, 0 beyond the correction radius."""
    if len(pairs) == 0:
        return np.zeros(len(points_lps))
    w = np.zeros(len(points_lps))
    for p in pairs:
        w = np.maximum(w, wendland(np.linalg.norm(points_lps - p, axis=1), CORRECTION_RADIUS_MM))
    return w


def expected_error_at(
    source: RegistrationResult | RefinementSession,
    points_lps: np.ndarray,
    params: UncertaintyModel | None = None,
    moving: Image | None = None,
) -> dict[str, np.ndarray]:
    """Expected error and its 90 % interval (mm) at fixed-space points: keys expected, lo, hi.

    `moving` (the moving image as registered) gives the image features; without it the model of the
    key features alone is used, which ranks the error less well (model card).
    """
    params = (params or load_uncertainty_model()).for_inputs(moving)
    model, pairs, _ = _source_parts(source)
    points_lps = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    mu = params.log_error(_control_at_points(model, _model_features(params, model, len(pairs), moving), points_lps))
    w = _click_factor(pairs, points_lps)
    lo, hi = params.interval_from_log(mu)
    blend = lambda v: v * (1.0 - w) + CLICK_ERROR_MM * w  # noqa: E731
    return {"expected": blend(params.expected_from_log(mu)), "lo": lo * (1.0 - w), "hi": blend(hi)}


def expected_error_map(
    source: RegistrationResult | RefinementSession,
    target_geometry: Geometry | None = None,
    params: UncertaintyModel | None = None,
    moving: Image | None = None,
) -> Image:
    """The expected registration error (float32 mm) on `target_geometry` (default: the fixed grid).

    `moving` (the moving image as registered) gives the image features (see expected_error_at).
    """
    params = (params or load_uncertainty_model()).for_inputs(moving)
    model, pairs, fixed = _source_parts(source)
    target = target_geometry or fixed
    mu = params.log_error(_model_features(params, model, len(pairs), moving))
    control = Image(mu.reshape(model.control_shape).astype(np.float32), _control_geometry(model))
    resampled = sitk.Resample(
        control.to_sitk(),
        target.reference_image(),
        sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
        True,  # nearest-neighbour extrapolation beyond the control grid
    )
    log_error = sitk.GetArrayViewFromImage(resampled)
    clicks = _click_factor_on_grid(pairs, target) if len(pairs) else None
    out = np.empty(target.shape_zyx, dtype=np.float32)
    for z0 in range(0, out.shape[0], SLAB):  # in slabs: small float64 temporaries, same values
        z1 = min(z0 + SLAB, out.shape[0])
        expected = params.expected_from_log(log_error[z0:z1].astype(np.float64))
        if clicks is not None:
            expected = expected * (1.0 - clicks[z0:z1]) + CLICK_ERROR_MM * clicks[z0:z1]
        out[z0:z1] = expected
    return Image(out, target, {"quantity": "expected registration error", "unit": "mm"})


def _click_factor_on_grid(pairs: np.ndarray, geometry: Geometry) -> np.ndarray:
    """`_click_factor` at every voxel of `geometry` (z, y, x), evaluated only in each pair's box.

    Wendland's function is zero beyond CORRECTION_RADIUS_MM, so each pair needs only the voxels of
    the index box around its ball (about 40^3 voxels at 1.5 mm instead of the whole grid).
    """
    out = np.zeros(geometry.shape_zyx)
    size = np.asarray(geometry.size)
    # A ball of radius R reaches R * |row i of the LPS -> index matrix| along index axis i.
    reach = CORRECTION_RADIUS_MM * np.linalg.norm(np.linalg.inv(geometry.voxel_to_mm_matrix()), axis=1)
    for pair, centre in zip(pairs, geometry.lps_to_index(pairs), strict=True):
        lo = np.clip(np.floor(centre - reach).astype(int) - 1, 0, size)
        hi = np.clip(np.ceil(centre + reach).astype(int) + 2, 0, size)
        if np.any(hi <= lo):
            continue
        z, y, x = np.meshgrid(*(np.arange(lo[a], hi[a]) for a in (2, 1, 0)), indexing="ij")
        points = geometry.index_to_lps(np.stack([x, y, z], axis=-1).reshape(-1, 3))
        weight = wendland(np.linalg.norm(points - pair, axis=1), CORRECTION_RADIUS_MM).reshape(z.shape)
        box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        out[box] = np.maximum(out[box], weight)
    return out


# ------------------------------------------------------------------------------------ fitting


def fit_uncertainty(
    features: np.ndarray,
    errors_mm: np.ndarray,
    metadata: dict | None = None,
    names: tuple[str, ...] = KEY_FEATURES,
    ridge: float = 1e-3,
) -> UncertaintyModel:
    """Least-squares fit (light ridge on the features' variance) of log(error + EPS_MM) on the features `names`.

    The residuals' 5th and 95th percentiles and mean factor are kept for the interval and the mean.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.log(np.asarray(errors_mm, dtype=np.float64) + EPS_MM)
    scale = np.where(np.arange(x.shape[1]) == 0, 0.0, x.var(axis=0))
    coef = np.linalg.solve(x.T @ x + ridge * len(y) * np.diag(scale), x.T @ y)
    res = y - x @ coef
    return UncertaintyModel(
        coef,
        float(np.quantile(res, 0.05)),
        float(np.quantile(res, 0.95)),
        float(np.mean(np.exp(res))),
        dict(metadata or {}),
        tuple(names),
    )


# --------------------------------------------------------------------------------- suggestions


def _on_grid(mask: Image, geometry: Geometry) -> np.ndarray:
    """A mask (> 0) resampled by nearest neighbour onto `geometry` (identity in LPS)."""
    if mask.geometry == geometry:
        return mask.array > 0
    return resample_to(mask, geometry, default_value=0.0, interpolation="nearest").array > 0


def _distance_in_box(box: tuple[slice, ...], centre: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Distance in mm from voxel `centre` (z, y, x) to every voxel of the index box."""
    axes = np.ogrid[box]
    return np.sqrt(sum(((axis - c) * sp) ** 2 for axis, c, sp in zip(axes, centre, spacing_zyx, strict=True)))


def suggest_clicks(
    expected_error: Image,
    n: int = 5,
    near_mask: Image | None = None,
    min_distance_mm: float = 10.0,
    region: Image | None = None,
) -> np.ndarray:
    """Fixed-space points (k <= n, 3; LPS mm) where one clicked pair would remove the most expected error.

    Greedy: each point maximises the expected error it would remove, the error map weighted by the
    reach of one pair (a Gaussian of about NEIGHBOURHOOD_MM), and the error it removes (Wendland
    weight of refine.CORRECTION_RADIUS_MM around it) is taken off the map before the next point is
    chosen, so later points go where error remains. Only error that matters counts: inside `region`
    (e.g. the body) and, with `near_mask` (fixed space, any grid; e.g. the tumour), within
    NEAR_MASK_MM of it, where the points also lie; points keep `min_distance_mm` apart. An empty
    mask is an error.
    """
    g = expected_error.geometry
    spacing_zyx = np.asarray(g.spacing_mm)[::-1]
    allowed = np.isfinite(expected_error.array)
    if region is not None:
        allowed &= _on_grid(region, g)
    if near_mask is not None:
        if not np.any(near_mask.array > 0):
            raise IkrError("the tumour mask is empty: nothing to suggest clicks near", near_mask.meta.get("path"))
        inside = _on_grid(near_mask, g)
        if not inside.any():
            raise IkrError("the tumour mask lies outside the fixed image", near_mask.meta.get("path"))
        allowed &= ndimage.distance_transform_edt(~inside, sampling=spacing_zyx) <= NEAR_MASK_MM
    # error outside the region of interest or the image is not the user's concern: it counts as zero
    remaining = np.where(allowed, expected_error.array.astype(np.float64), 0.0)
    sigma_vox = NEIGHBOURHOOD_MM / 2.0 / spacing_zyx
    reach_vox = np.ceil(CORRECTION_RADIUS_MM / spacing_zyx).astype(int)
    blocked = ~allowed
    chosen = []
    for _ in range(int(n)):
        score = ndimage.gaussian_filter(remaining, sigma_vox, mode="constant")
        score[blocked] = -np.inf
        flat = int(np.argmax(score))
        if not np.isfinite(score.flat[flat]) or score.flat[flat] <= 0.0:
            break
        centre = np.array(np.unravel_index(flat, score.shape))
        chosen.append(g.index_to_lps(centre[::-1].astype(np.float64)[None])[0])
        lo, hi = np.maximum(centre - reach_vox, 0), np.minimum(centre + reach_vox + 1, score.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        dist = _distance_in_box(box, centre, spacing_zyx)
        remaining[box] *= 1.0 - wendland(dist, CORRECTION_RADIUS_MM)
        blocked[box] |= dist < min_distance_mm
    return np.array(chosen, dtype=np.float64).reshape(-1, 3)


# ----------------------------------------------------------------------------------- the margin


def _box(masks: list[np.ndarray], pad_vox: np.ndarray, shape: tuple[int, int, int]) -> tuple[slice, ...]:
    """The index box (z, y, x slices) around the union of masks, padded."""
    union = np.zeros(shape, dtype=bool)
    for m in masks:
        union |= m
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(axis=0) - pad_vox, 0)
    hi = np.minimum(idx.max(axis=0) + pad_vox + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _smooth_noise(shape: tuple[int, ...], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth Gaussian random vector field (shape + (3,)), unit standard deviation per component."""
    out = np.empty((*shape, 3), dtype=np.float64)
    for c in range(3):
        v = ndimage.gaussian_filter(rng.normal(size=shape), sigma_vox, mode="wrap")
        out[..., c] = v / max(float(v.std()), 1e-12)
    return out


def margin_interval(
    tumour_moving: Image,
    ablation_fixed: Image,
    field: Field,
    expected_error: Image,
    n_samples: int = 20,
    seed: int = 0,
    point: MarginResult | None = None,
) -> dict:
    """The minimal margin with a 5th-95th percentile interval over fields sampled from the uncertainty.

    `point` is the margin already measured through `field` (margin.compute_margin), when the caller has it.

    Each sample adds to `field` a smooth Gaussian perturbation (correlation about CORRELATION_MM) whose
    length has, voxel by voxel, the expected error as its mean; the margin is measured by
    margin.compute_margin; the sampled minima are centred on the measured one (their median moved onto
    it), since a minimum over a perturbed surface is biased low. Also P(min margin < 0 mm) and P(< 5 mm)
    over the samples.
    """
    from .margin import compute_margin

    point = point or compute_margin(tumour_moving, ablation_fixed, field)
    g = field.geometry
    error = expected_error.array
    if expected_error.geometry != g:
        src = expected_error.to_sitk()
        ref = g.reference_image()
        out = sitk.Resample(src, ref, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        error = sitk.GetArrayFromImage(out)
    spacing_zyx = np.asarray(g.spacing_mm)[::-1]
    on_fixed = [point.warped_tumour.array > 0, _on_grid(ablation_fixed, g)]
    box = _box(on_fixed, np.ceil((CORRELATION_MM + 3.0 * float(error.max())) / spacing_zyx).astype(int), g.shape_zyx)
    sigma_mm = error[box].astype(np.float64)[..., None] / MEAN_NORM_PER_SIGMA
    base = field.displacement_mm[box].astype(np.float64)
    work = Field(field.displacement_mm.copy(), g)
    rng = np.random.default_rng(seed)
    mins = []
    for _ in range(int(n_samples)):
        noise = _smooth_noise(base.shape[:3], CORRELATION_MM / 2.0 / spacing_zyx, rng)
        work.displacement_mm[box] = (base + noise * sigma_mm).astype(work.displacement_mm.dtype)
        try:
            mins.append(compute_margin(tumour_moving, ablation_fixed, work).min_margin_mm)
        except IkrError:
            continue  # a sample that pushes the tumour out of view says nothing about the margin
    if not mins:
        raise IkrError("no sampled field gave a measurable margin")
    # The minimum over a surface of a perturbed margin is biased low (noise can only make some point
    # smaller): centre the samples on the measured margin so that the interval describes it.
    mins = np.asarray(mins) - (float(np.median(mins)) - point.min_margin_mm)
    return {
        "min_margin_mm": point.min_margin_mm,
        "min_margin_p5_mm": float(np.percentile(mins, 5)),
        "min_margin_p95_mm": float(np.percentile(mins, 95)),
        "p_min_margin_below_0mm": float(np.mean(mins < 0.0)),
        "p_min_margin_below_5mm": float(np.mean(mins < 5.0)),
        "n_samples": int(len(mins)),
        "sampled_min_margins_mm": [float(v) for v in mins],
    }
