"""Automatic initial alignment: rigid, then affine, before the deformable hierarchy (SimpleITK).

A patient scanned on another day lies differently: the two CTs differ by a large rigid motion (tens
of degrees and millimetres) and a small affine part, while the keypoint search reaches +-32 mm at
its coarsest. This stage finds an affine map A (fixed LPS -> moving LPS, ITK's convention and the
direction of the displacement field) with SimpleITK's registration framework, on block-averaged
copies of both images:

1. a start: the translation between the body masks' centres, turned about the long axis and shifted
   along it over a grid of starts (a cut field of view moves the centre), each scored on a 12 mm
   copy; or the user's transform;
2. rigid (Euler3D) from the best three starts on the 12 mm copy, the best again on a 6 mm copy;
3. affine (or rigid) on a 3 mm copy, kept when it improves the metric there.

Every stage uses Mattes mutual information inside the fixed body (robust to contrast change) on
block-averaged copies of the images.

The deformable hierarchy then registers the fixed image to the moving image seen through A, and the
final field is A(x + u(x)) - x: `displacement.nii.gz` and `transform.h5` include the alignment.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import SimpleITK as sitk

from ..core.errors import IkrError
from ..core.geometry import Geometry, Image
from .config import ALIGN_MODES
from .preprocess import CT_WINDOW_HU, block_average, body_mask

FINE_SPACING_MM = 3.0  # the pyramid: the last stage (rigid or affine) runs on a 3 mm grid,
ALIGN_SPACING_MM = 6.0  # the rigid refinement on 6 mm,
SEARCH_SPACING_MM = 12.0  # and the search over starts on 12 mm
START_ANGLES_DEG = (-20.0, -10.0, 0.0, 10.0, 20.0)  # start rotations about the long (z) axis
SEARCH_Z_FRACTION = 0.3  # start shifts along z reach +-30 % of the fixed body's length
SEARCH_STEP_MM = 15.0
N_REFINED_STARTS = 3  # the best starts that are optimised on the search grid
ITERATIONS = 40
FINE_ITERATIONS = 80
_LINEARITY_TOLERANCE_MM = 1e-3
T = TypeVar("T")
_MIN_SIZE = 8  # voxels kept along each axis at every level (ITK's smoothing needs 4; a thin slab stays usable)


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
    def from_point_map(map_points: Callable[[np.ndarray], np.ndarray]) -> Alignment:
        """The affine map that agrees with `map_points` ((N, 3) -> (N, 3), LPS mm) at the origin and 100 mm along
        each axis (exact when `map_points` is affine)."""
        mapped = map_points(np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], dtype=np.float64))
        return Alignment((mapped[1:] - mapped[0]).T / 100.0, mapped[0])

    @staticmethod
    def from_sitk(transform: sitk.Transform, where: object | None = None) -> Alignment:
        """The affine map of a linear SimpleITK transform (rigid, similarity, affine, or a composite of them)."""

        def map_points(points: np.ndarray) -> np.ndarray:
            """The transform applied to each point."""
            return np.array([transform.TransformPoint(p.tolist()) for p in points])

        try:
            alignment = Alignment.from_point_map(map_points)
        except RuntimeError as err:
            raise IkrError(f"the transform cannot map points ({str(err).splitlines()[0]})", where) from err
        check = np.random.default_rng(0).uniform(-300, 300, size=(16, 3))
        if np.abs(alignment.apply(check) - map_points(check)).max() > _LINEARITY_TOLERANCE_MM:
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
        """Rotation angle (deg), the shift of `centre_lps` (mm) and the scale factors (singular values) of the map."""
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


def _to_sitk(image: Image) -> sitk.Image:
    """HU clipped to the window, as a float32 SimpleITK image."""
    return image.with_array(np.clip(image.array, *CT_WINDOW_HU).astype(np.float32)).to_sitk()


def _level(image: Image, mask: np.ndarray, spacing_mm: float) -> tuple[Image, np.ndarray]:
    """A coarser level: the image block-averaged to about `spacing_mm`, and its mask (block majority)."""
    coarse = block_average(image, spacing_mm, _MIN_SIZE)
    coarse_mask = block_average(Image(mask.astype(np.float32), image.geometry), spacing_mm, _MIN_SIZE).array > 0.5
    return coarse, coarse_mask


@dataclass
class _Pair:
    """Fixed and moving at one level of the alignment pyramid, the fixed body mask, the metric's settings."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image
    bins: int
    fraction: float  # of the grid sampled by the metric, about the `samples` asked of _pair in the body


def _pair(fixed: Image, mask: np.ndarray, moving: Image, bins: int, samples: int) -> _Pair:
    """One level of the pyramid as SimpleITK images."""
    mask_image = Image(mask.astype(np.uint8), fixed.geometry).to_sitk()
    return _Pair(_to_sitk(fixed), _to_sitk(moving), mask_image, bins, _sampling(mask_image, samples))


def _sampling(fixed_mask: sitk.Image, samples: int) -> float:
    """The fraction of the whole grid to sample so that about `samples` body voxels are used."""
    stats = sitk.StatisticsImageFilter()
    stats.Execute(fixed_mask)
    return float(min(1.0, samples / max(1.0, stats.GetSum())))


def _mask_centre(mask: sitk.Image) -> np.ndarray:
    """The centre (LPS mm) of a binary mask's foreground, or of the grid when it is empty."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    if stats.HasLabel(1):
        return np.asarray(stats.GetCentroid(1), dtype=np.float64)
    return Geometry.from_sitk(mask).centre_lps()


def _method(
    level: _Pair, iterations: int = 0, learning_rate: float = 4.0, threads: int = 0
) -> sitk.ImageRegistrationMethod:
    """Mattes MI inside the fixed body; regular-step gradient descent with physical-shift scales.

    Without iterations (the metric's value only) no gradient images are made: the value is the same,
    and making them was most of an evaluation's cost on the 3 mm level. `threads` > 0 sets ITK's threads.
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=level.bins)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(level.fraction, seed=1)
    method.SetMetricFixedMask(level.fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    if threads > 0:
        method.SetNumberOfThreads(threads)
    if not iterations:
        method.SetMetricUseFixedImageGradientFilter(False)
        method.SetMetricUseMovingImageGradientFilter(False)
    else:
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=learning_rate,
            minStep=0.02,
            numberOfIterations=iterations,
            relaxationFactor=0.6,
            gradientMagnitudeTolerance=1e-6,
        )
        method.SetOptimizerScalesFromPhysicalShift()
    return method


def _metric(level: _Pair, transform: sitk.Transform, threads: int = 0) -> float:
    """Mattes MI (negative: lower is better) of the pair under `transform`, on the fixed body."""
    method = _method(level, threads=threads)
    method.SetInitialTransform(transform, inPlace=False)
    try:
        return float(method.MetricEvaluate(level.fixed, level.moving))
    except RuntimeError:  # too few samples overlap the moving image: the worst possible score
        return math.inf


def _optimise(
    level: _Pair, transform: sitk.Transform, iterations: int, learning_rate: float, threads: int = 0
) -> float:
    """Optimise `transform` in place on one level; the final metric."""
    start = transform.GetParameters()
    method = _method(level, iterations, learning_rate, threads)
    method.SetInitialTransform(transform, inPlace=True)
    try:
        method.Execute(level.fixed, level.moving)
    except RuntimeError:  # the optimiser left the moving image: keep the start
        transform.SetParameters(start)
    return _metric(level, transform, threads)


def _in_threads(run: Callable[[T], float], items: list[T]) -> list[float]:
    """run(item) for each item, in as many threads as ITK would use (each call on one ITK thread; SimpleITK
    releases the GIL): the search's metric evaluations are small, and one call barely keeps two cores busy."""
    workers = max(1, min(len(items), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, items))


def _rigid(centre: np.ndarray, start: Alignment) -> sitk.Euler3DTransform:
    """The rigid transform about `centre` closest to `start` (its rotation part and its shift of `centre`)."""
    u, _, vt = np.linalg.svd(start.matrix)
    rotation = u @ np.diag([1.0, 1.0, float(np.sign(np.linalg.det(u @ vt)))]) @ vt
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(centre.tolist())
    rigid.SetMatrix(rotation.reshape(-1).tolist())
    rigid.SetTranslation((start.apply(centre) - centre).tolist())
    return rigid


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
    fixed_f = block_average(fixed, FINE_SPACING_MM, _MIN_SIZE)
    moving_f = block_average(moving, FINE_SPACING_MM, _MIN_SIZE)
    mask_f = body_mask(fixed_f)
    fixed_m, mask_m = _level(fixed_f, mask_f, ALIGN_SPACING_MM)
    fixed_s, mask_s = _level(fixed_f, mask_f, SEARCH_SPACING_MM)
    moving_m = block_average(moving_f, ALIGN_SPACING_MM, _MIN_SIZE)
    moving_s = block_average(moving_f, SEARCH_SPACING_MM, _MIN_SIZE)
    fine = _pair(fixed_f, mask_f, moving_f, bins=64, samples=40_000)
    mid = _pair(fixed_m, mask_m, moving_m, bins=32, samples=30_000)
    search = _pair(fixed_s, mask_s, moving_s, bins=32, samples=20_000)
    fixed_centre = _mask_centre(mid.fixed_mask)
    user_start = initial is not None
    if initial is None:
        moving_body = Image(body_mask(moving_m).astype(np.uint8), moving_m.geometry).to_sitk()
        initial = Alignment(np.eye(3), _mask_centre(moving_body) - fixed_centre)
    metric_start = _metric(mid, initial.to_sitk())
    # 1. a search over start rotations and shifts along the body's long axis (for cut fields of view)
    extent_z = float(np.ptp(fixed_m.geometry.corners_lps()[:, 2]))
    candidates = [initial] if user_start else _start_candidates(fixed_centre, initial, extent_z)
    values = _in_threads(lambda c: _metric(search, c.to_sitk(), threads=1), candidates)
    order = sorted(range(len(candidates)), key=lambda i: values[i])
    # 2. rigid from the best few starts on the search grid; the best of them again on the middle grid
    starts = [_rigid(fixed_centre, candidates[i]) for i in order[:N_REFINED_STARTS]]
    refined = _in_threads(lambda rigid: _optimise(search, rigid, ITERATIONS, 4.0, threads=1), starts)
    rigid = starts[min(range(len(starts)), key=lambda k: refined[k])]
    _optimise(mid, rigid, ITERATIONS, 2.0)
    # 3. the chosen model (rigid or affine) on the fine grid, kept when it improves the metric there
    result, metric_final = Alignment.from_sitk(rigid), _metric(fine, rigid)
    final = sitk.AffineTransform(3) if mode == "affine" else sitk.Euler3DTransform()
    final.SetCenter(fixed_centre.tolist())
    final.SetMatrix(rigid.GetMatrix())
    final.SetTranslation(rigid.GetTranslation())
    metric_fine = _optimise(fine, final, FINE_ITERATIONS, 1.0)
    if metric_fine <= metric_final:
        result, metric_final = Alignment.from_sitk(final), metric_fine
    report = {
        "mode": mode,
        "initial": "user" if user_start else "body centres",
        "mattes_mi_start_6mm": round(metric_start, 4),
        "mattes_mi_final_3mm": round(metric_final, 4),
        "align_s": round(time.perf_counter() - start_time, 3),
        **_summary(result, fixed),
    }
    return AlignmentResult(result, report)


def _summary(alignment: Alignment, fixed: Image) -> dict:
    """The alignment's matrix and summary about the fixed image's centre, for the report."""
    centre = fixed.geometry.centre_lps()
    return {**alignment.to_dict(), **alignment.summary(centre)}
