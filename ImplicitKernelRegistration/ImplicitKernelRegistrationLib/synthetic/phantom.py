"""A seeded procedural thorax / upper-abdomen CT phantom (HU, int16) with its label map.

Coordinates are LPS mm with the volume centred at 0 and an identity direction: +x is the
patient's left, +y posterior, +z superior. The anatomy is drawn in millimetres, so the default
field of view (320 x 280 x 240 mm) holds all of it; a smaller `size` crops it.

Labels and their intensities before noise (HU; the seed jitters sizes and positions a little):

| label | name | HU |
|---|---|---|
| 0 | background | air -1000 |
| 1 | body | skin +20, fat layer -100, soft tissue +40, discs +80, spinal canal +10 |
| 2 | lung_left | parenchyma -850 |
| 3 | lung_right | parenchyma -850 |
| 4 | liver | +60 (under the right diaphragm dome) |
| 5 | lesion | +20 (a sphere of radius 8-12 mm inside the liver) |
| 6 | heart | myocardium +40, blood pool +150 |
| 7 | bone | ribs +700, vertebral bodies +400 with a +900 cortex, arches +700, sternum +500 |
| 8 | vessels | +50 (a random branching tree in each lung; partial volume blends thin ones with lung) |
| 9 | stomach | air -1000 above a fluid level, contents +15 |
| 10 | kidney | +35 |

The image is smoothed slightly (partial volume, Gaussian sigma 0.5 voxel) and carries
correlated Gaussian noise of 15 HU standard deviation (white noise smoothed by 0.6 voxel).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..core.geometry import Geometry, Image

LABEL_NAMES: dict[int, str] = {
    1: "body",
    2: "lung_left",
    3: "lung_right",
    4: "liver",
    5: "lesion",
    6: "heart",
    7: "bone",
    8: "vessels",
    9: "stomach",
    10: "kidney",
}

NOISE_HU = 15.0


class _Grid:
    """Broadcastable LPS coordinate axes of a centred grid: x (1,1,nx), y (1,ny,1), z (nz,1,1)."""

    def __init__(self, geometry: Geometry) -> None:
        nx, ny, nz = geometry.size
        sx, sy, sz = geometry.spacing_mm
        ox, oy, oz = geometry.origin_lps
        self.geometry = geometry
        self.x = (ox + sx * np.arange(nx, dtype=np.float32)).reshape(1, 1, nx)
        self.y = (oy + sy * np.arange(ny, dtype=np.float32)).reshape(1, ny, 1)
        self.z = (oz + sz * np.arange(nz, dtype=np.float32)).reshape(nz, 1, 1)
        self.shape = geometry.shape_zyx


def _centred_geometry(size: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> Geometry:
    """An identity-direction grid whose centre is the LPS origin."""
    origin = tuple(-0.5 * (n - 1) * s for n, s in zip(size, spacing_mm, strict=True))
    return Geometry(tuple(int(n) for n in size), tuple(float(s) for s in spacing_mm), origin)


def _ellipsoid(g: _Grid, centre: tuple[float, float, float], axes: tuple[float, float, float]) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid (mm)."""
    q = ((g.x - centre[0]) / axes[0]) ** 2 + ((g.y - centre[1]) / axes[1]) ** 2
    return (q + ((g.z - centre[2]) / axes[2]) ** 2) <= 1.0


def _body_masks(g: _Grid, ax: float, ay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body, inside-skin and inside-fat masks of an elliptic body narrowing slightly at the top."""
    taper = 1.0 - 0.06 * np.clip(g.z / 120.0, 0.0, None) ** 2

    def inside(shrink_mm: float) -> np.ndarray:
        return ((g.x / (ax * taper - shrink_mm)) ** 2 + (g.y / (ay - shrink_mm)) ** 2) <= 1.0

    return inside(0.0), inside(2.0), inside(15.0)


def _dome(g: _Grid, cx: float, cy: float, top: float) -> np.ndarray:
    """Height (z, mm) of a paraboloid diaphragm dome over (x, y), shape (1, ny, nx)."""
    return top - 0.018 * ((g.x - cx) ** 2 + (g.y - cy) ** 2)


def _lung(g: _Grid, side: int, dome: np.ndarray) -> np.ndarray:
    """One lung: an elliptic column capped by a half-ellipsoid apex, above its diaphragm dome."""
    cx, cy, ax, ay = side * 68.0, 5.0, 48.0, 68.0
    apex = np.maximum(g.z - 40.0, 0.0) / 70.0
    q = ((g.x - cx) / ax) ** 2 + ((g.y - cy) / ay) ** 2 + apex**2
    return (q <= 1.0) & (g.z >= dome)


def _ribs(g: _Grid, ax: float, ay: float, rng: np.random.Generator) -> np.ndarray:
    """Rib ring segments: tubes along an ellipse inside the body, sloping down anteriorly, gap at the front."""
    rx, ry = ax - 20.0, ay - 20.0
    x2, y2 = g.x[0], g.y[0]  # (1, nx), (ny, 1)
    theta = np.arctan2(y2 / ry, x2 / rx)
    rho = np.sqrt((x2 / rx) ** 2 + (y2 / ry) ** 2)
    radial_mm = (rho - 1.0) * np.sqrt((rx * np.cos(theta)) ** 2 + (ry * np.sin(theta)) ** 2)
    sternal_gap = np.abs(theta + np.pi / 2) < np.deg2rad(35.0)
    drop = 25.0 * (1.0 - np.sin(theta)) / 2.0  # posterior (sin = 1) highest
    mask = np.zeros(g.shape, dtype=bool)
    for level in np.arange(-60.0, 91.0, 24.0) + rng.uniform(-3.0, 3.0):
        dist2 = radial_mm**2 + (g.z - (level - drop)) ** 2
        mask |= (dist2 <= 5.0**2) & ~sternal_gap
    return mask


def _spine(g: _Grid, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Vertebral bodies (cortex, cancellous), discs, canal and posterior arches stacked along z."""
    period, height = 28.0, 22.0
    phase = rng.uniform(0.0, period)
    in_level = np.mod(g.z - phase, period) < height
    r_body = np.sqrt((g.x / 20.0) ** 2 + ((g.y - 55.0) / 15.0) ** 2)
    column = r_body <= 1.0
    cortex = column & (r_body > 0.85) & in_level
    cancellous = column & (r_body <= 0.85) & in_level
    disc = column & ~in_level
    r_canal = np.sqrt(g.x**2 + (g.y - 80.0) ** 2)
    canal = (r_canal <= 8.0) & np.ones_like(g.z, dtype=bool)
    arch = (r_canal > 8.0) & (r_canal <= 14.0) & (g.y > 68.0) & in_level
    spinous = (np.abs(g.x) <= 4.0) & (g.y > 90.0) & (g.y <= 100.0) & in_level
    return {"cortex": cortex, "cancellous": cancellous, "disc": disc, "canal": canal, "arch": arch | spinous}


def _rotate_towards(direction: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Tilt a unit vector by `angle` radians about a random perpendicular axis."""
    helper = rng.normal(size=3)
    axis = np.cross(direction, helper)
    axis /= np.linalg.norm(axis) + 1e-12
    out = direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle)
    return out / np.linalg.norm(out)


def _vessel_segments(
    root: np.ndarray, lung_contains: Callable[[np.ndarray], bool], rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start, end, radius mm) of a random branching tree kept inside a lung."""
    segments: list[tuple[np.ndarray, np.ndarray, float]] = []
    lateral = float(np.sign(root[0]))
    trunks = ([0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [lateral, 0.0, 0.0], [lateral, -1.0, 0.3], [lateral, 1.0, -0.5])
    stack = []
    for d in trunks:
        d = np.asarray(d) / np.linalg.norm(d)
        stack.append((root, _rotate_towards(d, rng.uniform(0.0, 0.35), rng), 28.0, 4.0, 0))
    while stack:
        start, direction, length, radius, depth = stack.pop()
        end = None
        for _ in range(5):
            candidate = start + direction * length
            if lung_contains(candidate):
                end = candidate
                break
            direction = _rotate_towards(direction, rng.uniform(0.4, 1.0), rng)
            length *= 0.8
        if end is None:
            continue
        segments.append((start, end, radius))
        if depth >= 7 or radius < 0.8:
            continue
        for sign in (-1.0, 1.0):
            child = _rotate_towards(direction, sign * rng.uniform(0.35, 0.8), rng)
            stack.append((end, child, length * rng.uniform(0.7, 0.9), radius * 0.8, depth + 1))
    return segments


def _draw_segments(g: _Grid, segments: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Partial-volume occupancy (0..1) of capsules, rasterised in each one's bounding box."""
    geo = g.geometry
    occ = np.zeros(g.shape, dtype=np.float32)
    h = float(min(geo.spacing_mm))
    size = np.asarray(geo.size)
    for start, end, radius in segments:
        lo = np.floor(geo.lps_to_index((np.minimum(start, end) - radius - h)[None])[0]).astype(int)
        hi = np.ceil(geo.lps_to_index((np.maximum(start, end) + radius + h)[None])[0]).astype(int) + 1
        lo, hi = np.clip(lo, 0, size), np.clip(hi, 0, size)
        if np.any(hi <= lo):
            continue
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        px, py, pz = g.x[..., sl[2]], g.y[:, sl[1], :], g.z[sl[0]]
        axis = end - start
        t = ((px - start[0]) * axis[0] + (py - start[1]) * axis[1] + (pz - start[2]) * axis[2]) / max(
            float(axis @ axis), 1e-9
        )
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt(
            (px - start[0] - t * axis[0]) ** 2 + (py - start[1] - t * axis[1]) ** 2 + (pz - start[2] - t * axis[2]) ** 2
        )
        frac = np.clip((radius + 0.5 * h - dist) / h, 0.0, 1.0)
        occ[sl] = np.maximum(occ[sl], frac)
    return occ


def _lesion_centre(liver: np.ndarray, geometry: Geometry, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A seeded LPS point deep enough inside the liver to hold a ball of `radius` mm."""
    depth = ndimage.distance_transform_edt(liver, sampling=geometry.spacing_mm[::-1])
    candidates = np.argwhere(depth >= radius + 4.0)
    if candidates.size == 0:
        candidates = np.argwhere(depth >= depth.max() * 0.8)
    z, y, x = candidates[rng.integers(len(candidates))]
    return geometry.index_to_lps(np.array([[x, y, z]], dtype=float))[0]


def _noise(shape: tuple[int, int, int], sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Slightly correlated Gaussian noise with standard deviation `sigma_hu`."""
    white = rng.standard_normal(shape, dtype=np.float32)
    smooth = ndimage.gaussian_filter(white, 0.6)
    return smooth * (sigma_hu / max(float(smooth.std()), 1e-6))


def make_phantom(
    seed: int = 0,
    size: tuple[int, int, int] = (128, 112, 96),
    spacing_mm: tuple[float, float, float] = (2.5, 2.5, 2.5),
) -> tuple[Image, Image, dict[int, str]]:
    """A seeded thorax/upper-abdomen CT (int16 HU), its label map (uint8) and the label names."""
    rng = np.random.default_rng(seed)
    geometry = _centred_geometry(size, spacing_mm)
    g = _Grid(geometry)
    jit = lambda v, f=0.05: float(v * (1.0 + rng.uniform(-f, f)))  # noqa: E731

    ax, ay = jit(140.0), jit(105.0)
    body, in_skin, in_fat = _body_masks(g, ax, ay)
    dome_right = _dome(g, -68.0, 5.0, jit(-10.0, 0.5))
    dome_left = _dome(g, 68.0, 5.0, jit(-25.0, 0.3))
    heart = _ellipsoid(g, (jit(20.0), -30.0, jit(-10.0, 0.5)), (jit(50.0), jit(40.0), jit(45.0)))
    heart_margin = _ellipsoid(g, (20.0, -30.0, -10.0), (58.0, 48.0, 53.0))
    lung_l = _lung(g, 1, dome_left) & ~heart_margin & in_fat
    lung_r = _lung(g, -1, dome_right) & ~heart_margin & in_fat
    liver = _ellipsoid(g, (jit(-45.0), -5.0, jit(-45.0, 0.2)), (jit(80.0), jit(75.0), jit(65.0)))
    liver &= (g.z <= dome_right - 4.0) & in_fat & ~heart_margin
    stomach = _ellipsoid(g, (55.0, -25.0, -55.0), (jit(40.0), jit(35.0), jit(40.0)))
    stomach &= (g.z <= dome_left - 4.0) & in_fat & ~liver
    stomach_air = stomach & (g.z > -55.0 + jit(15.0, 0.3))
    kidneys = _ellipsoid(g, (70.0, 50.0, -95.0), (25.0, 22.0, 45.0)) | _ellipsoid(
        g, (-70.0, 50.0, -100.0), (25.0, 22.0, 45.0)
    )
    ribs = _ribs(g, ax, ay, rng) & body
    spine = _spine(g, rng)
    sternum = (np.abs(g.x) <= 15.0) & (np.abs(g.y + ay - 20.0) <= 5.0) & (g.z >= -40.0) & (g.z <= 80.0)

    lesion_radius = rng.uniform(8.0, 12.0)
    lesion_centre = _lesion_centre(liver, geometry, lesion_radius, rng)
    lesion = _ellipsoid(g, tuple(lesion_centre), (lesion_radius,) * 3) & liver

    vessel_occ = np.zeros(g.shape, dtype=np.float32)
    for side, lung in ((1, lung_l), (-1, lung_r)):
        root = np.array([side * 40.0, 8.0, 20.0])
        contains = _point_tester(lung, geometry)
        vessel_occ = np.maximum(vessel_occ, _draw_segments(g, _vessel_segments(root, contains, rng)))
    lungs = lung_l | lung_r
    vessel_occ *= lungs

    hu = np.full(g.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(g.shape, dtype=np.uint8)

    def paint(mask: np.ndarray, value: float, label: int | None) -> None:
        mask = np.broadcast_to(mask, g.shape)
        hu[mask] = value
        if label is not None:
            labels[mask] = label

    paint(body, 20.0, 1)
    paint(in_skin, -100.0, None)
    paint(in_fat, 40.0, None)
    paint(spine["disc"], 80.0, None)
    paint(spine["canal"] & body, 10.0, None)
    paint(kidneys & in_fat, 35.0, 10)
    paint(stomach, 15.0, 9)
    paint(stomach_air, -1000.0, None)
    paint(liver, 60.0, 4)
    paint(lesion, 20.0, 5)
    paint(heart & in_fat, 40.0, 6)
    paint(_ellipsoid(g, (20.0, -30.0, -10.0), (30.0, 24.0, 27.0)) & heart, 150.0, None)
    paint(lung_l, -850.0, 2)
    paint(lung_r, -850.0, 3)
    hu = hu * (1.0 - vessel_occ) + 50.0 * vessel_occ
    labels[(vessel_occ >= 0.5) & lungs] = 8
    paint(ribs, 700.0, 7)
    paint(sternum & body, 500.0, 7)
    paint(spine["cancellous"], 400.0, 7)
    paint(spine["cortex"], 900.0, 7)
    paint(spine["arch"] & body, 700.0, 7)

    hu = ndimage.gaussian_filter(hu, 0.5) + _noise(g.shape, NOISE_HU, rng)
    ct_array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    meta = {"source": "ikr phantom", "seed": int(seed)}
    ct = Image(ct_array, geometry, dict(meta))
    label_image = Image(labels, geometry, {**meta, "label_names": dict(LABEL_NAMES)})
    return ct, label_image, dict(LABEL_NAMES)


def _point_tester(mask: np.ndarray, geometry: Geometry) -> Callable[[np.ndarray], bool]:
    """A function telling whether an LPS point falls in `mask` (nearest voxel; False outside the grid)."""
    size = np.asarray(geometry.size)

    def contains(point: np.ndarray) -> bool:
        idx = np.rint(geometry.lps_to_index(point[None])[0]).astype(int)
        if np.any(idx < 0) or np.any(idx >= size):
            return False
        return bool(mask[idx[2], idx[1], idx[0]])

    return contains


def write_phantom(outdir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write the phantom CT (phantom_ct.nii.gz) and its labels (phantom_labels.seg.nrrd) into a new folder."""
    from ..io.atomic import atomic_directory
    from ..io.images import write_image
    from ..io.segmentations import write_labels

    ct, labels, names = make_phantom(seed=seed)
    outdir = Path(outdir)
    with atomic_directory(outdir) as tmp:
        write_image(ct, tmp / "phantom_ct.nii.gz")
        write_labels(labels, names, tmp / "phantom_labels.seg.nrrd")
    return outdir / "phantom_ct.nii.gz", outdir / "phantom_labels.seg.nrrd"
