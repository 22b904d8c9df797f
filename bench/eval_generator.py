"""An independent evaluation generator: diffeomorphic deformations of a CT for measuring, never for training.

Different in kind from the project's `synth` (which draws displacement fields directly, inverts them
by fixed-point iteration, and uses Harris corners): here a **stationary velocity field** v is drawn
on a working grid of 3 mm (or the CT's spacing, if coarser) and integrated by scaling and squaring
(8 steps), so the deformation exp(v) is diffeomorphic and its inverse is exp(-v), integrated the
same way (they agree to about 0.02 mm on average inside the body, `inverse_residual_*` in case.json).

Kinds (LPS: +z superior, -y anterior; mean |v| inside the body is drawn, then v is scaled to it):

- breathing: a global breathing-like SVF: inferior motion (-z) with a raised-cosine profile along z
  (peak near the upper third of the body, half-width 45-65 % of the body's z extent), anterior
  (-y) and lateral expansion proportional to the distance from the body's axis (8-20 % and
  3-8 % of the inferior amplitude), all multiplied by the body mask smoothed by 12 mm so that the
  velocity fades in air; mean |v| in the body 2.5-7 mm.
- random: multi-scale random smooth SVF: white noise smoothed at 10, 20 and 40 mm, each scale
  normalised to unit RMS in the body and weighted by Dirichlet-drawn weights; mean |v| 1.5-4 mm.
- local: local shrinkage (2 in 3) or expansion around a soft-tissue point at least 30 mm inside
  the body: v(x) = s (x - c) exp(-|x - c|^2 / 2 r^2), r 12-25 mm, volume change at the centre
  exp(3 s) in 0.55-0.85 (shrinkage) or 1.2-1.5 (expansion); plus a random SVF of mean 0.5-1 mm.
- mixed: breathing (scaled by 0.6) + random (0.5) + local.
- sliding: breathing-like motion of the lungs and their contents that slides along the chest wall
  and the mediastinum. Lungs: this generator's own mask (< -550 HU in the body, components of 100 ml
  or more, closed by 6 mm, holes filled slice by slice; not the engine's lung mask). Inside them
  inferior motion growing from the apex (0) to the base (1) as ((z_apex - z) / (z_apex - z_base))^1.5,
  with an anterior share of 10-25 %. Outside only the normal component of that motion continues
  (the lung pushes the diaphragm and the liver below it, and lifts the anterior chest wall), fading
  with the distance to the lungs (e-folding 15-25 mm), so the field is continuous across the
  boundary in the normal direction and discontinuous in the tangential one: the lung slides along
  the ribs and the mediastinum while these stay nearly still. Plus a weak random SVF everywhere
  (mean 0.2-0.4 mm). Mean |v| inside the lungs 4-8 mm. Needs lungs in view (300 ml or more).

The true field d = exp(v) - id (fixed grid, LPS mm, fixed -> moving: anatomy at p lies at p + d(p)
in the moving image, ITK DisplacementFieldTransform) is linear interpolation of the working-grid
field onto the CT's grid. The moving image is the CT sampled (B-spline) at exp(-v)(y) through a
SimpleITK DisplacementFieldTransform of the working-grid inverse.

Intensity model (unlike synth's smooth multiplicative/offset change and Gaussian noise): the moving
image gets a gamma change of (HU + 1024) / 3000 (gamma 0.975-1.025) and a low-order polynomial bias
field (multiplicative on HU + 1024, within +-3 %); both images get fresh heteroscedastic noise
(standard deviation 6-14 HU scaled by sqrt((HU + 1024) / 1024), smoothed by 0.7 voxel).

Landmarks (up to 100): extrema of a difference of Gaussians (2 mm minus 4 mm, HU clipped to
[-1000, 400]) on a 2 mm grid, inside the body at least 8 mm from its surface, in the top 15 % of
the response; those whose moving point lies inside the moving data (an extra `valid` test, e.g. a
cut field of view) are spread by farthest-point sampling, seeded by the strongest. For `sliding`:
up to 30 of them 2-12 mm inside the lungs' boundary, 30 2-12 mm outside it (near the pleura, both
sides) and the rest elsewhere; case.json lists which are near the pleura (`pleura_landmarks`, with
their side) so that the bench reports their TRE apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import (
    Field,
    compose,
    field_from_transform,
    jacobian_determinant,
    sample_field,
    transform_points,
)
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.synthetic.synth import SynthCase, write_case

KINDS = ("breathing", "random", "local", "mixed", "sliding")
WORKING_SPACING_MM = 3.0
SQUARING_STEPS = 8
LANDMARK_GRID_MM = 2.0
LANDMARK_DEPTH_MM = 8.0
MAX_LANDMARKS = 100
AIR_HU = -1024.0
GAMMA_SPAN_HU = 3000.0
LUNG_HU = -550.0
LUNG_MIN_ML = 100.0
LUNGS_NEEDED_ML = 300.0
PLEURA_BAND_MM = (2.0, 12.0)  # landmarks this far from the lungs' boundary count as near the pleura
PLEURA_LANDMARKS_PER_SIDE = 30


# ----------------------------------------------------------------------------- grids and fields


def working_geometry(geometry: Geometry) -> Geometry:
    """A grid of WORKING_SPACING_MM (or the CT's, if coarser) covering `geometry`, one voxel beyond."""
    spacing_mm = max(WORKING_SPACING_MM, min(geometry.spacing_mm))
    extent = (np.asarray(geometry.size) - 1) * np.asarray(geometry.spacing_mm)
    size = tuple(int(math.ceil(e / spacing_mm)) + 2 for e in extent)
    return Geometry(size, (spacing_mm,) * 3, geometry.origin_lps, geometry.direction)


def resample_image(image: Image, geometry: Geometry, smooth: bool = True) -> Image:
    """The image on another grid (linear; Gaussian-smoothed first to the target spacing when coarser)."""
    source = sitk.Cast(image.to_sitk(), sitk.sitkFloat32)
    if smooth and min(geometry.spacing_mm) > 1.5 * min(image.geometry.spacing_mm):
        sigma = [0.5 * s for s in geometry.spacing_mm]
        source = sitk.SmoothingRecursiveGaussian(source, sigma)
    out = sitk.Resample(source, geometry.reference_image(), sitk.Transform(), sitk.sitkLinear, AIR_HU)
    return Image(sitk.GetArrayFromImage(out), geometry)


def exponentiate(velocity: Field, steps: int = SQUARING_STEPS) -> Field:
    """exp(v) - id by scaling and squaring: u = v / 2^steps, then u <- u o u, `steps` times."""
    u = Field((velocity.displacement_mm / 2.0**steps).astype(np.float32), velocity.geometry)
    for _ in range(steps):
        u = compose(u, u)
    return u


def displacement_transform(field: Field) -> sitk.DisplacementFieldTransform:
    """A SimpleITK displacement transform of a field (linear interpolation, zero beyond its grid)."""
    return field.to_sitk_transform()


# ----------------------------------------------------------------------------- velocity fields


@dataclass
class Anatomy:
    """What the velocity builders see on the working grid: points, HU, body mask and its smoothed weight."""

    geometry: Geometry
    points: np.ndarray
    hu: np.ndarray
    body: np.ndarray
    weight: np.ndarray


def anatomy(ct: Image) -> Anatomy:
    """The CT on the working grid, its body mask and a smooth weight that fades in air."""
    grid = working_geometry(ct.geometry)
    coarse = resample_image(ct, grid)
    body = body_mask(coarse)
    if not body.any():
        raise IkrError("no body found in the CT (nothing above -500 HU)")
    weight = ndimage.gaussian_filter(body.astype(np.float32), 12.0 / grid.spacing_mm[0], mode="nearest")
    weight /= max(float(weight[body].max()), 1e-6)
    return Anatomy(grid, grid.grid_points_lps(), coarse.array, body, np.clip(weight, 0.0, 1.0))


def _scaled(v: np.ndarray, body: np.ndarray, mean_mm: float) -> np.ndarray:
    """v scaled so that its mean length inside the body is `mean_mm`."""
    norm = float(np.linalg.norm(v, axis=-1)[body].mean())
    return (v * (mean_mm / max(norm, 1e-9))).astype(np.float32)


def _breathing(a: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Inferior motion with a raised-cosine z profile, anterior and lateral expansion, fading in air."""
    z = a.points[..., 2]
    zb = z[a.body]
    z_lo, z_hi = float(zb.min()), float(zb.max())
    peak = z_lo + rng.uniform(0.55, 0.8) * (z_hi - z_lo)
    half = rng.uniform(0.45, 0.65) * (z_hi - z_lo)
    profile = np.where(np.abs(z - peak) < half, 0.5 * (1.0 + np.cos(np.pi * (z - peak) / half)), 0.0)
    centre = a.points[a.body].mean(axis=0)
    radius = float(np.percentile(np.linalg.norm((a.points[a.body] - centre)[:, :2], axis=-1), 90))
    ap, lateral = rng.uniform(0.08, 0.2), rng.uniform(0.03, 0.08)
    v = np.zeros_like(a.points, dtype=np.float32)
    v[..., 2] = -profile
    v[..., 1] = -ap * profile * np.clip((centre[1] - a.points[..., 1]) / radius, -1.0, 1.0)
    v[..., 0] = lateral * profile * np.clip((a.points[..., 0] - centre[0]) / radius, -1.0, 1.0)
    v *= a.weight[..., None]
    mean = rng.uniform(2.5, 7.0)
    params = {"peak_z_mm": peak, "half_width_mm": half, "ap_fraction": ap, "lateral_fraction": lateral}
    return _scaled(v, a.body, mean), {**params, "mean_velocity_mm": mean}


def _random(a: Anatomy, rng: np.random.Generator, mean: float | None = None) -> tuple[np.ndarray, dict]:
    """White noise smoothed at 10, 20 and 40 mm, per-scale unit RMS in the body, Dirichlet weights."""
    scales = (10.0, 20.0, 40.0)
    weights = rng.dirichlet((2.0, 2.0, 2.0))
    v = np.zeros((*a.geometry.shape_zyx, 3), dtype=np.float32)
    for scale, w in zip(scales, weights, strict=True):
        noise = rng.standard_normal(v.shape).astype(np.float32)
        for c in range(3):
            noise[..., c] = ndimage.gaussian_filter(noise[..., c], scale / a.geometry.spacing_mm[0], mode="reflect")
        rms = float(np.sqrt((noise[a.body] ** 2).sum(axis=-1).mean()))
        v += w * noise / max(rms, 1e-9)
    v *= a.weight[..., None]
    mean = rng.uniform(1.5, 4.0) if mean is None else mean
    params = {"scales_mm": list(scales), "weights": [float(w) for w in weights], "mean_velocity_mm": mean}
    return _scaled(v, a.body, mean), params


def soft_tissue_point(a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A soft-tissue point (0-120 HU) at least 30 mm inside the body (deepest soft tissue if none is)."""
    depth = ndimage.distance_transform_edt(a.body, sampling=a.geometry.spacing_mm[::-1])
    soft = (a.hu > 0.0) & (a.hu < 120.0) & a.body
    chosen = soft & (depth >= 30.0)
    if not chosen.any():
        chosen = soft & (depth >= 0.5 * depth[soft].max()) if soft.any() else depth >= 0.5 * depth.max()
    candidates = np.argwhere(chosen)
    zyx = candidates[rng.integers(len(candidates))]
    return a.points[tuple(zyx)]


def _local(a: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Gaussian radial velocity s (x - c) exp(-|x - c|^2 / 2 r^2) around a soft-tissue point, plus a weak random SVF."""
    centre = soft_tissue_point(a, rng)
    radius = rng.uniform(12.0, 25.0)
    shrink = rng.random() < 2.0 / 3.0
    volume = rng.uniform(0.55, 0.85) if shrink else rng.uniform(1.2, 1.5)
    rate = math.log(volume) / 3.0
    offset = a.points - centre
    v = rate * offset * np.exp(-(offset**2).sum(axis=-1) / (2.0 * radius**2))[..., None]
    background, background_params = _random(a, rng, mean=rng.uniform(0.5, 1.0))
    params = {
        "centre_lps": [float(c) for c in centre],
        "radius_mm": radius,
        "volume_change_at_centre": volume,
        "background": background_params,
    }
    return (v + background).astype(np.float32), params


def _mixed(a: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Breathing (x 0.6) + random (x 0.5) + local."""
    breathing, p_breathing = _breathing(a, rng)
    random, p_random = _random(a, rng)
    local, p_local = _local(a, rng)
    v = 0.6 * breathing + 0.5 * random + local
    return v.astype(np.float32), {"breathing": p_breathing, "random": p_random, "local": p_local}


def generator_lungs(a: Anatomy) -> np.ndarray:
    """This generator's lung mask on its working grid: < -550 HU in the body, components of 100 ml or more,
    closed by 6 mm, holes filled slice by slice (scipy; independent of the engine's lung mask)."""
    dark = (a.hu < LUNG_HU) & a.body
    labels, n = ndimage.label(dark)
    if n == 0:
        return np.zeros_like(dark)
    voxel_ml = float(np.prod(a.geometry.spacing_mm)) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1) * voxel_ml
    lungs = np.isin(labels, [i for i in range(1, n + 1) if sizes[i] >= LUNG_MIN_ML])
    radius = max(1, round(6.0 / a.geometry.spacing_mm[0]))
    lungs = ndimage.binary_closing(lungs, ndimage.generate_binary_structure(3, 1), iterations=radius)
    lungs = np.stack([ndimage.binary_fill_holes(plane) for plane in lungs]) & a.body
    return lungs


def signed_distance_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Distance (mm) to the mask's boundary: positive inside, negative outside."""
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return np.where(mask, inside, -outside).astype(np.float32)


def _sliding(a: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Lungs move inferiorly (and anteriorly), sliding along the chest wall; outside only the normal part continues."""
    lungs = generator_lungs(a)
    volume_ml = float(lungs.sum()) * float(np.prod(a.geometry.spacing_mm)) / 1000.0
    if volume_ml < LUNGS_NEEDED_ML:
        raise IkrError(f"the sliding kind needs lungs in view ({volume_ml:.0f} ml found, {LUNGS_NEEDED_ML:g} needed)")
    z = a.points[..., 2]
    z_apex, z_base = float(z[lungs].max()), float(np.percentile(z[lungs], 2.0))
    profile = np.clip((z_apex - z) / max(z_apex - z_base, 1e-6), 0.0, 1.0) ** 1.5
    ap = rng.uniform(0.1, 0.25)
    inner = np.zeros_like(a.points, dtype=np.float32)
    inner[..., 2] = -profile
    inner[..., 1] = -ap * profile
    spacing = a.geometry.spacing_mm[0]
    signed = signed_distance_mm(lungs, spacing)
    gradient = np.stack(np.gradient(ndimage.gaussian_filter(signed, 1.0), spacing)[::-1], axis=-1)  # x, y, z
    normal = gradient / np.maximum(np.linalg.norm(gradient, axis=-1, keepdims=True), 1e-6)
    decay = rng.uniform(15.0, 25.0)
    normal_part = (normal * inner).sum(axis=-1, keepdims=True) * normal
    outer = normal_part * np.exp(np.minimum(signed, 0.0) / decay)[..., None]
    v = np.where(lungs[..., None], inner, outer) * a.weight[..., None]
    mean = rng.uniform(4.0, 8.0)
    scale = mean / max(float(np.linalg.norm(v, axis=-1)[lungs].mean()), 1e-9)
    background, background_params = _random(a, rng, mean=rng.uniform(0.2, 0.4))
    params = {
        "lung_volume_ml": volume_ml,
        "apex_z_mm": z_apex,
        "base_z_mm": z_base,
        "ap_fraction": ap,
        "normal_decay_mm": decay,
        "mean_velocity_in_lungs_mm": mean,
        "background": background_params,
    }
    return (v * scale + background).astype(np.float32), params


_BUILDERS: dict[str, Callable[[Anatomy, np.random.Generator], tuple[np.ndarray, dict]]] = {
    "breathing": _breathing,
    "random": _random,
    "local": _local,
    "mixed": _mixed,
    "sliding": _sliding,
}


def draw_velocity(ct: Image, kind: str, rng: np.random.Generator) -> tuple[Field, dict]:
    """A stationary velocity field of the given kind on the CT's working grid, and its parameters."""
    if kind not in KINDS:
        raise IkrError(f"unknown evaluation kind {kind!r}; choose one of {', '.join(KINDS)}")
    grid_anatomy = anatomy(ct)
    v, params = _BUILDERS[kind](grid_anatomy, rng)
    return Field(v, grid_anatomy.geometry), params


# ----------------------------------------------------------------------------- intensities


def _gamma(hu: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma change of (HU + 1024) / 3000 (values above 1 shift with the top of the curve)."""
    t = np.clip((hu + 1024.0) / GAMMA_SPAN_HU, 0.0, None)
    return np.where(t <= 1.0, AIR_HU + GAMMA_SPAN_HU * t**gamma, hu).astype(np.float32)


def _bias(geometry: Geometry, coefficients: np.ndarray) -> np.ndarray:
    """1 + a low-order polynomial (linear and quadratic in normalised x, y, z) on the grid."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in geometry.shape_zyx]
    z, y, x = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = (x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, y * z, x * z)
    out = np.ones(geometry.shape_zyx, dtype=np.float32)
    for c, term in zip(coefficients, terms, strict=True):
        out += np.float32(c) * term
    return out


def noisy(hu: np.ndarray, sigma_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Heteroscedastic noise: sigma_hu * sqrt((HU + 1024) / 1024), smoothed by 0.7 voxel (std kept)."""
    white = rng.standard_normal(hu.shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(white, 0.7)
    smooth /= max(float(smooth.std()), 1e-6)
    scale = sigma_hu * np.sqrt(np.clip((hu + 1024.0) / 1024.0, 0.05, 4.0))
    return (hu + scale * smooth).astype(np.float32)


def intensity_model(hu: np.ndarray, geometry: Geometry, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The moving image's gamma change and bias field (no noise); the values and their parameters."""
    gamma = rng.uniform(0.975, 1.025)
    coefficients = rng.uniform(-1.0, 1.0, 9)
    coefficients *= 0.03 / max(np.abs(coefficients).sum(), 1e-9)  # |bias - 1| <= 3 % everywhere
    out = AIR_HU + (_gamma(hu, gamma) - AIR_HU) * _bias(geometry, coefficients)
    return out.astype(np.float32), {"gamma": gamma, "bias_coefficients": [float(c) for c in coefficients]}


def to_int16(values: np.ndarray) -> np.ndarray:
    """Rounded and clipped to int16, as CTs are stored."""
    return np.clip(np.rint(values), -32768, 32767).astype(np.int16)


# ----------------------------------------------------------------------------- landmarks


def landmark_candidates(ct: Image) -> np.ndarray:
    """LPS points of strong difference-of-Gaussians extrema inside the body, strongest first."""
    extent = (np.asarray(ct.geometry.size) - 1) * np.asarray(ct.geometry.spacing_mm)
    size = tuple(int(math.ceil(e / LANDMARK_GRID_MM)) + 1 for e in extent)
    grid = Geometry(size, (LANDMARK_GRID_MM,) * 3, ct.geometry.origin_lps, ct.geometry.direction)
    image = resample_image(ct, grid, smooth=False)
    clipped = sitk.GetImageFromArray(np.clip(image.array, -1000.0, 400.0))
    grid.apply_to_sitk(clipped)
    fine = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(clipped, 2.0))
    coarse = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(clipped, 4.0))
    response = np.abs(fine - coarse)
    depth = ndimage.distance_transform_edt(body_mask(image), sampling=grid.spacing_mm[::-1])
    inside = depth >= LANDMARK_DEPTH_MM
    if not inside.any():
        return np.zeros((0, 3))
    peaks = (response == ndimage.maximum_filter(response, size=5)) & inside
    peaks &= response >= np.percentile(response[inside], 85.0)
    zyx = np.argwhere(peaks)
    order = np.argsort(-response[peaks], kind="stable")
    return grid.index_to_lps(zyx[order][:, ::-1].astype(np.float64))


def farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    """`count` points spread by farthest-point sampling, starting from the first."""
    if len(points) <= count:
        return points
    chosen = [0]
    distance = np.linalg.norm(points - points[0], axis=1)
    for _ in range(count - 1):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(points - points[nxt], axis=1))
    return points[chosen]


def pick_landmarks(
    ct: Image, true_field: Field, valid: Callable[[np.ndarray], np.ndarray], count: int = MAX_LANDMARKS
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark pairs (fixed, moving = p + d(p)) whose moving point passes `valid`, spread out."""
    candidates = landmark_candidates(ct)
    if len(candidates) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    moved = transform_points(true_field, candidates)
    fixed = farthest_points(candidates[valid(moved)], count)
    return fixed, transform_points(true_field, fixed)


def pick_pleura_landmarks(
    ct: Image, true_field: Field, valid: Callable[[np.ndarray], np.ndarray], count: int = MAX_LANDMARKS
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Landmarks near the pleura on both sides (PLEURA_BAND_MM from the generator's lung boundary, up to
    PLEURA_LANDMARKS_PER_SIDE each), the rest elsewhere; and which are near it (indices, side)."""
    a = anatomy(ct)
    signed = signed_distance_mm(generator_lungs(a), a.geometry.spacing_mm[0])
    candidates = landmark_candidates(ct)
    candidates = candidates[valid(transform_points(true_field, candidates))]
    index = np.rint(a.geometry.lps_to_index(candidates)).astype(int)
    index = np.clip(index, 0, np.asarray(a.geometry.size) - 1)
    depth = signed[index[:, 2], index[:, 1], index[:, 0]]
    lo, hi = PLEURA_BAND_MM
    inside = (depth >= lo) & (depth <= hi)
    outside = (depth <= -lo) & (depth >= -hi)
    chosen_in = farthest_points(candidates[inside], PLEURA_LANDMARKS_PER_SIDE)
    chosen_out = farthest_points(candidates[outside], PLEURA_LANDMARKS_PER_SIDE)
    rest = farthest_points(candidates[~inside & ~outside], max(0, count - len(chosen_in) - len(chosen_out)))
    fixed = np.concatenate([chosen_in, chosen_out, rest]).reshape(-1, 3)
    near = {
        "pleura_landmarks": list(range(len(chosen_in) + len(chosen_out))),
        "pleura_side": ["lung"] * len(chosen_in) + ["wall"] * len(chosen_out),
        "pleura_band_mm": list(PLEURA_BAND_MM),
    }
    return fixed, transform_points(true_field, fixed), near


def inside_grid(geometry: Geometry, margin_mm: float) -> Callable[[np.ndarray], np.ndarray]:
    """A test: which LPS points lie inside `geometry`, at least `margin_mm` from its outer voxel centres."""
    margin = margin_mm / min(geometry.spacing_mm)
    return lambda points: geometry.contains_lps(points, margin_voxels=-margin)


# ----------------------------------------------------------------------------- checks and cases


def inverse_residual(forward: Field, inverse: Field, points: np.ndarray) -> np.ndarray:
    """|q + u(q) + d(q + u(q)) - q| (mm) at LPS points q whose preimage q + u(q) lies in d's grid."""
    pre = points + sample_field(inverse, points)
    inside = forward.geometry.contains_lps(pre, margin_voxels=0.0)
    return np.linalg.norm(pre + sample_field(forward, pre) - points, axis=-1)[inside]


def min_jacobian(field: Field) -> float:
    """The smallest Jacobian determinant of x -> x + d(x)."""
    return float(jacobian_determinant(field).min())


def body_samples(ct: Image, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` random LPS voxel centres inside the CT's body mask."""
    zyx = np.argwhere(body_mask(ct))
    chosen = zyx[rng.choice(len(zyx), min(count, len(zyx)), replace=False)]
    return ct.geometry.index_to_lps(chosen[:, ::-1].astype(np.float64))


@dataclass
class Deformation:
    """A drawn deformation: exp(v) and exp(-v) - id on the working grid, the seeded generator, its parameters."""

    forward: Field
    inverse: Field
    rng: np.random.Generator
    params: dict


def draw_deformation(ct: Image, kind: str, seed: int) -> Deformation:
    """Draw a velocity of the given kind (seeded by kind and seed), integrate it both ways, and check the pair."""
    rng = np.random.default_rng([int(seed), KINDS.index(kind) if kind in KINDS else 99, 20261202])
    velocity, kind_params = draw_velocity(ct, kind, rng)
    forward, inverse = exponentiate(velocity), exponentiate(Field(-velocity.displacement_mm, velocity.geometry))
    residual = inverse_residual(forward, inverse, body_samples(ct, 20_000, rng))
    params = {
        "kind": kind,
        "seed": int(seed),
        "kind_params": kind_params,
        "working_spacing_mm": velocity.geometry.spacing_mm[0],
        "squaring_steps": SQUARING_STEPS,
        "inverse_residual_max_mm": float(residual.max()),
        "inverse_residual_mean_mm": float(residual.mean()),
        "min_jacobian_working": min_jacobian(forward),
    }
    return Deformation(forward, inverse, rng, params)


def fixed_image(ct: Image, sigma_hu: float, rng: np.random.Generator) -> Image:
    """The fixed image: the CT with fresh noise (int16)."""
    return Image(to_int16(noisy(ct.array.astype(np.float32), sigma_hu, rng)), ct.geometry, {"role": "fixed"})


def make_eval_case(ct: Image, kind: str, seed: int, intensity: bool = True) -> SynthCase:
    """A case: fixed = CT + noise, moving = CT deformed by exp(v) (+ gamma, bias, noise), true field, landmarks.

    `intensity=False` leaves out the gamma change, the bias field and the noise (for checks).
    """
    deformation = draw_deformation(ct, kind, seed)
    rng = deformation.rng
    true_field = field_from_transform(displacement_transform(deformation.forward), ct.geometry)
    clean = sitk.Cast(ct.to_sitk(), sitk.sitkFloat32)
    inverse = displacement_transform(deformation.inverse)
    moving_hu = sitk.GetArrayFromImage(sitk.Resample(clean, clean, inverse, sitk.sitkBSpline, AIR_HU, sitk.sitkFloat32))
    fixed = Image(to_int16(ct.array.astype(np.float32)), ct.geometry, {"role": "fixed"})
    intensity_params: dict = {}
    if intensity:
        moving_hu, intensity_params = intensity_model(moving_hu, ct.geometry, rng)
        sigma_fixed, sigma_moving = rng.uniform(6.0, 14.0, 2)
        fixed, moving_hu = fixed_image(ct, sigma_fixed, rng), noisy(moving_hu, sigma_moving, rng)
        intensity_params.update(noise_sigma_fixed_hu=sigma_fixed, noise_sigma_moving_hu=sigma_moving)
    pleura: dict = {}
    if kind == "sliding":
        lm_fixed, lm_moving, pleura = pick_pleura_landmarks(ct, true_field, inside_grid(ct.geometry, 6.0))
    else:
        lm_fixed, lm_moving = pick_landmarks(ct, true_field, inside_grid(ct.geometry, 6.0))
    params = {
        "source": "bench eval_generator (evaluation only)",
        **deformation.params,
        "intensity_params": intensity_params,
        "max_displacement_mm": float(np.linalg.norm(true_field.displacement_mm, axis=-1).max()),
        "landmarks_found": int(len(lm_fixed)),
        **pleura,
        "ct_size": [int(v) for v in ct.geometry.size],
        "ct_spacing_mm": [float(v) for v in ct.geometry.spacing_mm],
    }
    return SynthCase(
        fixed=fixed,
        moving=Image(to_int16(moving_hu), ct.geometry, {"role": "moving"}),
        true_field=true_field,
        landmarks_fixed_lps=lm_fixed,
        landmarks_moving_lps=lm_moving,
        fixed_labels=None,
        moving_labels=None,
        family=f"eval-{kind}",
        seed=int(seed),
        params=plain(params),
    )


def plain(value: object) -> object:
    """A JSON-ready copy of nested dicts and lists of numpy scalars."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_eval_case(case: SynthCase, folder: Path) -> Path:
    """Write a case in synth's layout (fixed, moving, true_displacement, landmark CSVs, case.json), atomically."""
    write_case(case, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Write one evaluation case: `python bench/eval_generator.py CT -o FOLDER --kind mixed --seed 0`."""
    import argparse

    from ImplicitKernelRegistrationLib.io.images import read_image

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("ct", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--kind", default="mixed", choices=KINDS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    case = make_eval_case(read_image(args.ct), args.kind, args.seed)
    write_eval_case(case, args.output)
    print(f"{args.output}: {len(case.landmarks_fixed_lps)} landmark pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
