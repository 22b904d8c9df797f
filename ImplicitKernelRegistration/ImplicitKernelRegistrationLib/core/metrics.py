"""Registration metrics: TRE, Jacobian statistics (SDlogJ, folding), Dice, HD95, endpoint error.

All distances are in mm; points are LPS mm (N, 3); masks and label maps are (z, y, x) arrays
(or `Image`s) on one grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from .errors import IkrError
from .fields import Field, jacobian_determinant, resample_field, transform_points
from .geometry import Geometry, Image


def _as_array(a: np.ndarray | Image) -> np.ndarray:
    """The voxel array of an Image, or the array itself."""
    return a.array if isinstance(a, Image) else np.asarray(a)


def _mask_on(field: Field, mask: np.ndarray | Image | None) -> np.ndarray:
    """A boolean (z, y, x) mask on the field's grid (all voxels when `mask` is None)."""
    if mask is None:
        return np.ones(field.geometry.shape_zyx, dtype=bool)
    m = _as_array(mask).astype(bool)
    if m.shape != field.geometry.shape_zyx:
        raise IkrError(f"mask of shape {m.shape} does not match the field grid {field.geometry.shape_zyx}")
    return m


def tre_summary(distances: np.ndarray) -> dict:
    """mean, sd, p50, p90, max and n of a set of distances (mm); NaN statistics when empty."""
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if d.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "p50": float("nan"), "p90": float("nan"),
                "max": float("nan"), "n": 0}  # fmt: skip
    return {
        "mean": float(np.mean(d)),
        "sd": float(np.std(d)),
        "p50": float(np.percentile(d, 50)),
        "p90": float(np.percentile(d, 90)),
        "max": float(np.max(d)),
        "n": int(d.size),
    }


def tre(fixed_pts_lps: np.ndarray, moving_pts_lps: np.ndarray, field: Field) -> dict:
    """Target registration error |p + d(p) - q| of landmark pairs (p fixed, q moving), summarised."""
    p = np.asarray(fixed_pts_lps, dtype=np.float64).reshape(-1, 3)
    q = np.asarray(moving_pts_lps, dtype=np.float64).reshape(-1, 3)
    if p.shape != q.shape:
        raise IkrError(f"{len(p)} fixed landmarks but {len(q)} moving landmarks")
    if len(p) == 0:
        return tre_summary(np.empty(0))
    return tre_summary(np.linalg.norm(transform_points(field, p) - q, axis=-1))


def sdlogj(field: Field, mask: np.ndarray | Image | None = None) -> dict:
    """Jacobian statistics of x -> x + d(x) over `mask` (default: the whole grid).

    - `sdlogj`: std(log J) over the voxels with J > 0; voxels with J <= 0 (folds, where log J is
      undefined) are left out of it and counted in `folding_percent` instead;
    - `sdlogj_l2r`: Learn2Reg's std(log(clip(J + 3, 1e-9, 1e9))), which keeps every voxel;
    - `folding_percent`: the share of voxels with J <= 0, in percent;
    - `jacobian_min`, `jacobian_max`, `n_voxels`, `n_folding`.
    """
    j = jacobian_determinant(field)
    j = j.reshape(-1) if mask is None else j[_mask_on(field, mask)]  # float32, no float64 copy of the grid
    if j.size == 0:
        raise IkrError("the mask selects no voxels")
    chunks = [j[i : i + _CHUNK] for i in range(0, j.size, _CHUNK)]
    n_folding = sum(int(np.count_nonzero(c <= 0)) for c in chunks)
    log_j = _ChunkedStd(lambda c: np.log(c[c > 0] if n_folding else c), chunks, j.size - n_folding)
    shifted = _ChunkedStd(lambda c: np.log(np.clip(c + 3.0, 1e-9, 1e9)), chunks, j.size)  # Learn2Reg's variant
    return {
        "sdlogj": log_j.std() if log_j.n else float("nan"),
        "sdlogj_l2r": shifted.std(),
        "folding_percent": 100.0 * n_folding / j.size,
        "jacobian_min": float(np.min(j)),
        "jacobian_max": float(np.max(j)),
        "n_voxels": int(j.size),
        "n_folding": n_folding,
    }


_CHUNK = 1 << 22  # voxels per chunk of the Jacobian statistics (32 MB of float64 temporaries)


class _ChunkedStd:
    """The standard deviation of the n values f(chunk) over chunks of float32 values, in float64: f is evaluated once
    per chunk, each chunk's mean and squared deviations computed in two passes as np.std does, and the chunks
    combined by Chan et al.'s pairwise update (the same figures as np.std over all values but for rounding)."""

    def __init__(self, f: Callable[[np.ndarray], np.ndarray], chunks: list[np.ndarray], n: int) -> None:
        self.f, self.chunks, self.n = f, chunks, n

    def _values(self, chunk: np.ndarray) -> np.ndarray:
        """f of one chunk, in float64."""
        return self.f(chunk.astype(np.float64))

    def std(self) -> float:
        """std of the values: per chunk its mean and the sum of squared deviations from it, then combined."""
        count, mean, squares = 0, 0.0, 0.0
        for chunk in self.chunks:
            values = self._values(chunk)
            if values.size == 0:
                continue
            chunk_mean = float(np.mean(values))
            chunk_squares = float(np.sum(np.square(values - chunk_mean)))
            total = count + values.size
            delta = chunk_mean - mean
            mean += delta * values.size / total
            squares += chunk_squares + delta * delta * count * values.size / total
            count = total
        return float(np.sqrt(squares / count)) if count else float("nan")


def dice(a: np.ndarray | Image, b: np.ndarray | Image, labels: list[int] | None = None) -> dict[int, float]:
    """Dice overlap per label of two label maps on one grid (labels default: all non-zero in either).

    A label present in neither map gets NaN.
    """
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise IkrError(f"label maps of different shapes {x.shape} and {y.shape}")
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(x), np.unique(y)) if v != 0)
    out: dict[int, float] = {}
    for label in labels:
        in_x, in_y = x == label, y == label
        total = int(np.count_nonzero(in_x)) + int(np.count_nonzero(in_y))
        out[int(label)] = 2.0 * np.count_nonzero(in_x & in_y) / total if total else float("nan")
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """The boundary voxels of a mask (voxels with a face neighbour outside it)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_surface_distances(src: np.ndarray, dst: np.ndarray, sampling_zyx: tuple) -> np.ndarray:
    """Distances (mm) from each surface voxel of `src` to the nearest surface voxel of `dst`."""
    to_dst = ndimage.distance_transform_edt(~dst, sampling=sampling_zyx)
    return to_dst[src]


def hd95(
    a: np.ndarray | Image, b: np.ndarray | Image, spacing: tuple[float, float, float] | Geometry | None = None
) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between the surfaces of two binary masks.

    Surfaces are the boundary voxels; distances use the physical spacing (x, y, z) given directly,
    by a Geometry, or by `a` when it is an Image. The result is the larger of the two directed 95th
    percentiles (DeepMind surface-distance convention). 0 when both masks are empty, inf when
    exactly one is.
    """
    if spacing is None:
        if not isinstance(a, Image):
            raise IkrError("hd95 needs the voxel spacing: pass spacing or Image masks")
        spacing = a.geometry
    spacing_xyz = spacing.spacing_mm if isinstance(spacing, Geometry) else tuple(spacing)
    x, y = _as_array(a).astype(bool), _as_array(b).astype(bool)
    if x.shape != y.shape:
        raise IkrError(f"masks of different shapes {x.shape} and {y.shape}")
    if not x.any() and not y.any():
        return 0.0
    if not x.any() or not y.any():
        return float("inf")
    sx, sy = _surface(x), _surface(y)
    sampling = tuple(float(s) for s in spacing_xyz[::-1])
    d_xy = _directed_surface_distances(sx, sy, sampling)
    d_yx = _directed_surface_distances(sy, sx, sampling)
    return float(max(np.percentile(d_xy, 95), np.percentile(d_yx, 95)))


def endpoint_error(field: Field, true_field: Field, mask: np.ndarray | Image | None = None) -> dict:
    """|d - d_true| (mm) over `mask`: mean, p90, max, n; `true_field` is resampled onto field's grid."""
    if true_field.geometry != field.geometry:
        true_field = resample_field(true_field, field.geometry)
    m = _mask_on(field, mask)
    if not m.any():
        raise IkrError("the mask selects no voxels")
    err = np.linalg.norm(
        field.displacement_mm[m].astype(np.float64) - true_field.displacement_mm[m].astype(np.float64),
        axis=-1,
    )
    return {
        "mean": float(np.mean(err)),
        "p90": float(np.percentile(err, 90)),
        "max": float(np.max(err)),
        "n": int(err.size),
    }
