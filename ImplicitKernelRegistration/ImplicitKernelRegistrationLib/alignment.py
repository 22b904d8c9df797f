"""Automatic initial alignment: rigid, then affine, before the deformable hierarchy (SimpleITK).

A patient scanned on another day lies differently: the two CTs differ by a large rigid motion (tens
of degrees and millimetres) and a small affine part, while the keypoint search reaches +-32 mm at
its coarsest. This stage finds an affine map A (fixed LPS -> moving LPS, ITK's convention and the
direction of the displacement field) with SimpleITK's registration framework, on both images
downsampled to a coarse isotropic grid:

1. a start: the translation between the body masks' centres (or the user's transform);
2. rigid (Euler3D), Mattes mutual information inside the fixed body, from a few start rotations
   about the long axis; the best metric wins;
3. affine from the rigid result.

The deformable hierarchy then registers the fixed image to the moving image seen through A, and the
final field is A(x + u(x)) - x: `displacement.nii.gz` and `transform.h5` include the alignment.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import IkrError
from .geometry import Geometry, Image
from .preprocess import block_average, body_mask

ALIGN_MODES = ("affine", "rigid", "none")
ALIGN_SPACING_MM = 5.0  # the coarse grid: the body's outline and organs, 0.5 s per stage on the thorax
START_ANGLES_DEG = (-20.0, -10.0, 0.0, 10.0, 20.0)  # start rotations about the long (z) axis
SEARCH_SPACING_MM = 10.0
FINE_SPACING_MM = 3.0  # the last stage (rigid or affine) runs on this grid  # the grid of the start search
SEARCH_Z_FRACTION = 0.3  # start shifts along z reach +-40 % of the fixed body's length
SEARCH_STEP_MM = 15.0
N_REFINED_STARTS = 3
_HU_WINDOW = (-1000.0, 1000.0)
METRIC_SAMPLES = 50_000  # voxels of the fixed body the metric samples (a regular subset) at each grid
ITERATIONS = 40
FINE_ITERATIONS = 80
HISTOGRAM_BINS = 64
_LINEARITY_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Alignment:
    """An affine map of LPS points, fixed -> moving: y = matrix @ x + translation."""

    matrix: np.ndarray
    translation: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 3)
        translation = np.asarray(self.translation, dtype=np.float64).reshape(3)
        if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(translation))):
            raise IkrError("the alignment has a NaN or infinite coefficient")
        if abs(np.linalg.det(matrix)) < 1e-6:
            raise IkrError("the alignment's matrix is singular (it collapses space)")
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "translation", translation)

    @staticmethod
    def identity() -> Alignment:
        """The alignment that changes nothing."""
        return Alignment(np.eye(3), np.zeros(3))

    @property
    def is_identity(self) -> bool:
        """True when the map is the identity (to 1e-9)."""
        return bool(np.allclose(self.matrix, np.eye(3), atol=1e-9) and np.allclose(self.translation, 0, atol=1e-9))

    def apply(self, points_lps: np.ndarray) -> np.ndarray:
        """Map (..., 3) fixed-space points to moving space."""
        return np.asarray(points_lps, dtype=np.float64) @ self.matrix.T + self.translation

    def inverse_apply(self, points_lps: np.ndarray) -> np.ndarray:
        """Map (..., 3) moving-space points back to fixed space."""
        return (np.asarray(points_lps, dtype=np.float64) - self.translation) @ np.linalg.inv(self.matrix).T

    def to_sitk(self) -> sitk.AffineTransform:
        """The same map as a SimpleITK AffineTransform (centre at the origin)."""
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(self.matrix.reshape(-1).tolist())
        transform.SetTranslation(self.translation.tolist())
        return transform

    @staticmethod
    def from_sitk(transform: sitk.Transform, where: object | None = None) -> Alignment:
        """The affine map of a linear SimpleITK transform (rigid, similarity, affine, or a composite of them)."""
        probe = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], dtype=np.float64)
        try:
            mapped = np.array([transform.TransformPoint(p.tolist()) for p in probe])
        except RuntimeError as err:
            raise IkrError(f"the transform cannot map points ({str(err).splitlines()[0]})", where) from err
        translation = mapped[0]
        matrix = (mapped[1:] - translation).T / 100.0
        alignment = Alignment(matrix, translation)
        check = np.random.default_rng(0).uniform(-300, 300, size=(16, 3))
        expected = np.array([transform.TransformPoint(p.tolist()) for p in check])
        if np.abs(alignment.apply(check) - expected).max() > _LINEARITY_TOLERANCE_MM:
            raise IkrError("the transform is not linear (rigid or affine); give a rigid or affine transform", where)
        return alignment

    def to_dict(self) -> dict:
        """JSON-serialisable form (matrix row by row)."""
        return {"matrix": self.matrix.tolist(), "translation_mm": self.translation.tolist()}

    @staticmethod
    def from_dict(data: dict) -> Alignment:
        """Inverse of to_dict."""
        return Alignment(np.asarray(data["matrix"], float), np.asarray(data["translation_mm"], float))

    def summary(self, centre_lps: np.ndarray) -> dict:
        """Rotation angle (deg), the shift of `centre_lps` (mm), scale factors and shear of the map."""
        u, s, vt = np.linalg.svd(self.matrix)
        rotation = u @ vt
        angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))
        shift = self.apply(np.asarray(centre_lps, float)) - np.asarray(centre_lps, float)
        return {
            "rotation_deg": round(angle, 3),
            "shift_at_centre_mm": [round(float(v), 3) for v in shift],
            "shift_at_centre_norm_mm": round(float(np.linalg.norm(shift)), 3),
            "scale": [round(float(v), 5) for v in s],
        }


@dataclass
class AlignmentResult:
    """The alignment found, and what the report says about it."""

    alignment: Alignment
    report: dict


def read_initial_transform(path: str) -> Alignment:
    """A user's start transform from an ITK file (.h5, .tfm, .txt, .mat), fixed -> moving, linear only."""
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as err:
        raise IkrError(f"not a readable ITK transform file ({str(err).strip().splitlines()[-1][:160]})", path) from err
    return Alignment.from_sitk(transform, where=path)


def _coarse(image: sitk.Image, spacing_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """The image block-averaged to about `spacing_mm` (HU clipped, float32) and its body mask (uint8)."""
    shrunk = block_average(Image.from_sitk(image), spacing_mm)
    mask = body_mask(shrunk).astype(np.uint8)
    clipped = shrunk.with_array(np.clip(shrunk.array, *_HU_WINDOW))
    return clipped.to_sitk(), Image(mask, shrunk.geometry).to_sitk()


def _sampling(fixed_mask: sitk.Image) -> float:
    """The fraction of the whole grid to sample so that about METRIC_SAMPLES body voxels are used."""
    stats = sitk.StatisticsImageFilter()
    stats.Execute(fixed_mask)
    body = max(1.0, stats.GetSum())
    return float(min(1.0, METRIC_SAMPLES / body))


def _mask_centre(mask: sitk.Image) -> np.ndarray:
    """The centre (LPS mm) of a binary mask's foreground, or of the grid when it is empty."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if stats.HasLabel(1):
        return np.asarray(stats.GetCentroid(1), dtype=np.float64)
    geometry = Geometry.from_sitk(mask)
    return geometry.index_to_lps((np.asarray(geometry.size, float) - 1)[None] / 2)[0]


def _method(
    fixed_mask: sitk.Image, iterations: int, shrink: tuple[int, ...], learning_rate: float = 4.0
) -> sitk.ImageRegistrationMethod:
    """Mattes MI inside the fixed body, regular-step gradient descent with physical-shift scales."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(_sampling(fixed_mask), seed=1)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate,
        minStep=0.02,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel([0.5 * (f - 1) for f in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _metric(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes MI (negative: lower is better) of the pair under `transform`, on the fixed body."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(_sampling(fixed_mask), seed=1)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    return float(method.MetricEvaluate(fixed, moving))


def _rigid_from(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    centre: np.ndarray,
    start: Alignment,
    angle: float,
    shrink: tuple[int, ...],
) -> tuple[sitk.Euler3DTransform, float]:
    """Rigid registration from `start` turned by `angle` degrees about z at `centre`; (transform, metric)."""
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(centre.tolist())
    turn = sitk.Euler3DTransform()
    turn.SetCenter(centre.tolist())
    turn.SetRotation(0.0, 0.0, math.radians(angle))
    begin = Alignment.from_sitk(sitk.CompositeTransform([start.to_sitk(), turn]))
    # start = begin, written as a rotation about `centre` plus a translation (rigid part only)
    u, _, vt = np.linalg.svd(begin.matrix)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        rotation = u @ np.diag([1, 1, -1]) @ vt
    rigid.SetMatrix(rotation.reshape(-1).tolist())
    rigid.SetTranslation((begin.apply(centre) - centre).tolist())
    method = _method(fixed_mask, ITERATIONS, shrink)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed, moving)
    return rigid, float(method.GetMetricValue())


def _start_candidates(centre: np.ndarray, start: Alignment, extent_z_mm: float) -> list[Alignment]:
    """Start maps to try: `start` turned about z at the fixed body's centre and shifted along z."""
    shifts = np.arange(-SEARCH_Z_FRACTION * extent_z_mm, SEARCH_Z_FRACTION * extent_z_mm + 1e-6, SEARCH_STEP_MM)
    out = []
    for angle in START_ANGLES_DEG:
        turn = sitk.Euler3DTransform()
        turn.SetCenter(centre.tolist())
        turn.SetRotation(0.0, 0.0, math.radians(angle))
        turned = Alignment.from_sitk(sitk.CompositeTransform([start.to_sitk(), turn]))
        for dz in shifts:
            out.append(Alignment(turned.matrix, turned.translation + np.array([0.0, 0.0, dz])))
    return out


def align(
    fixed: Image,
    moving: Image,
    mode: str = "affine",
    initial: Alignment | None = None,
    spacing_mm: float = ALIGN_SPACING_MM,
) -> AlignmentResult:
    """Find the affine (or rigid) map fixed -> moving; `mode="none"` keeps `initial` (or the identity)."""
    if mode not in ALIGN_MODES:
        raise IkrError(f"unknown alignment {mode!r}; choose one of {', '.join(ALIGN_MODES)}")
    start_time = time.perf_counter()
    if mode == "none":
        alignment = initial or Alignment.identity()
        return AlignmentResult(
            alignment, {"mode": "none", "initial": initial is not None, **_summary(alignment, fixed)}
        )
    fixed_c, fixed_mask = _coarse(fixed.to_sitk(), spacing_mm)
    moving_c, moving_mask = _coarse(moving.to_sitk(), spacing_mm)
    fixed_s, fixed_mask_s = _coarse(fixed_c, SEARCH_SPACING_MM)
    moving_s, _ = _coarse(moving_c, SEARCH_SPACING_MM)
    fixed_centre = _mask_centre(fixed_mask)
    user_start = initial is not None
    if initial is None:
        initial = Alignment(np.eye(3), _mask_centre(moving_mask) - fixed_centre)
    metric_start = _metric(fixed_c, moving_c, fixed_mask, initial.to_sitk())
    # 1. a coarse search over start rotations and shifts along the body's long axis (cut fields of view)
    extent_z = float(np.ptp(Geometry.from_sitk(fixed_mask).corners_lps()[:, 2]))
    candidates = [initial] if user_start else _start_candidates(fixed_centre, initial, extent_z)
    scored = sorted(
        ((_metric(fixed_s, moving_s, fixed_mask_s, c.to_sitk()), i) for i, c in enumerate(candidates)),
        key=lambda item: item[0],
    )
    # 2. rigid from the best few starts on the search grid, then on the alignment grid
    best: tuple[sitk.Euler3DTransform, float] | None = None
    for _, i in scored[:N_REFINED_STARTS]:
        candidate = _rigid_from(fixed_s, moving_s, fixed_mask_s, fixed_centre, candidates[i], 0.0, (1,))
        if best is None or candidate[1] < best[1]:
            best = candidate
    assert best is not None
    t_starts = time.perf_counter() - start_time
    rigid, metric_rigid = _rigid_from(
        fixed_c, moving_c, fixed_mask, fixed_centre, Alignment.from_sitk(best[0]), 0.0, (1,)
    )
    # 3. the chosen model (rigid or affine) on the fine grid, kept when it improves the metric there
    fixed_f, fixed_mask_f = _coarse(fixed.to_sitk(), FINE_SPACING_MM)
    moving_f, _ = _coarse(moving.to_sitk(), FINE_SPACING_MM)
    result = Alignment.from_sitk(rigid)
    metric_final = _metric(fixed_f, moving_f, fixed_mask_f, rigid)
    final = sitk.AffineTransform(3) if mode == "affine" else sitk.Euler3DTransform()
    final.SetCenter(fixed_centre.tolist())
    final.SetMatrix(rigid.GetMatrix())
    final.SetTranslation(rigid.GetTranslation())
    method = _method(fixed_mask_f, FINE_ITERATIONS, (1,), learning_rate=1.0)
    method.SetInitialTransform(final, inPlace=True)
    method.Execute(fixed_f, moving_f)
    metric_fine = _metric(fixed_f, moving_f, fixed_mask_f, final)
    if metric_fine <= metric_final:
        result, metric_final = Alignment.from_sitk(final), metric_fine
    report = {
        "mode": mode,
        "initial": "user" if user_start else "body centres",
        "spacing_mm": spacing_mm,
        "mattes_mi_start": round(metric_start, 4),
        "mattes_mi_final_fine_grid": round(metric_final, 4),
        "align_s": round(time.perf_counter() - start_time, 3),
        "starts_s": round(t_starts, 3),
        **_summary(result, fixed),
    }
    return AlignmentResult(result, report)


def _summary(alignment: Alignment, fixed: Image) -> dict:
    """The alignment's matrix and summary about the fixed image's centre, for the report."""
    g = fixed.geometry
    centre = g.index_to_lps((np.asarray(g.size, float) - 1)[None] / 2)[0]
    return {**alignment.to_dict(), **alignment.summary(centre)}
