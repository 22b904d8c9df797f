"""Clinical-like evaluation cases built on the independent generator (bench/eval_generator.py).

A pre/post-treatment pair as a radiologist has it: on top of the generator's deformation exp(v),
the patient lies differently (a rigid motion R: a rotation of `rotation_deg` about a seeded axis
through the body's centre and a translation of `translation_mm` in a seeded direction), the moving
scan has its own grid (identity direction, `moving_spacing_mm`, covering the repositioned body; its
field of view cut along z to `fov_fraction` of the fixed extent), the contrast differs (soft
tissue enhanced by 30-60 HU, fat, air and bone unchanged) and an ablation-like region is new (an
ellipsoid of semi-axes 10-18 mm around a soft-tissue point, 45-70 HU hypodense with a 1.5 mm
soft edge). The gamma/bias/noise model of the generator applies too.

The true field (fixed grid, LPS mm, fixed -> moving) is T(x) - x with T(x) = R(x + d(x)): the
rigid part is included. The moving image is the CT sampled (B-spline, after a Gaussian
anti-aliasing to the moving spacing) at T^-1(y) = exp(-v)(R^-1(y)). Landmarks (DoG extrema as in
the generator) keep only pairs whose moving point lies inside the moving image (6 mm from its
faces) and 5 mm or more outside the ablation region.

The same CT, kind and seed give the same exp(v) as the generator's case (`eval_generator`), so an
aligned case and its repositioned copies share the deformation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from eval_generator import (
    AIR_HU,
    anatomy,
    displacement_transform,
    draw_deformation,
    fixed_image,
    inside_grid,
    intensity_model,
    noisy,
    pick_landmarks,
    plain,
    soft_tissue_point,
    to_int16,
)
from scipy.spatial.transform import Rotation

from ImplicitKernelRegistrationLib.core.fields import field_from_transform
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask
from ImplicitKernelRegistrationLib.synthetic.synth import SynthCase

LANDMARK_MARGIN_MM = 6.0
ABLATION_CLEARANCE_MM = 5.0


@dataclass(frozen=True)
class Clinical:
    """What makes a case clinical: repositioning, moving grid, field-of-view cut, contrast, ablation."""

    rotation_deg: float = 0.0
    translation_mm: float = 0.0
    moving_spacing_mm: tuple[float, float, float] | None = None  # None: the fixed grid
    fov_fraction: float = 1.0
    contrast: bool = False
    ablation: bool = False

    def label(self) -> str:
        """A short file-name-safe description, e.g. 'r12-t40-fov60-2x2x5-contrast-ablation'."""
        parts = [f"r{self.rotation_deg:g}-t{self.translation_mm:g}"]
        if self.fov_fraction < 1.0:
            parts.append(f"fov{round(100 * self.fov_fraction)}")
        if self.moving_spacing_mm is not None:
            parts.append("x".join(f"{s:g}" for s in self.moving_spacing_mm))
        parts += [w for w, on in (("contrast", self.contrast), ("ablation", self.ablation)) if on]
        return "-".join(parts).replace(".", "p")


def rigid_motion(centre: np.ndarray, clinical: Clinical, rng: np.random.Generator) -> sitk.AffineTransform:
    """x -> A (x - c) + c + t: rotation by rotation_deg about a random axis, translation of translation_mm."""
    axis = rng.standard_normal(3)
    direction = rng.standard_normal(3)
    rotation = Rotation.from_rotvec(np.radians(clinical.rotation_deg) * axis / np.linalg.norm(axis))
    transform = sitk.AffineTransform(3)
    transform.SetCenter([float(c) for c in centre])
    transform.SetMatrix([float(v) for v in rotation.as_matrix().ravel()])
    transform.SetTranslation([float(v) for v in clinical.translation_mm * direction / np.linalg.norm(direction)])
    return transform


def _map(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Points (N, 3) through a SimpleITK transform."""
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points])


def moving_geometry(ct: Image, rigid: sitk.Transform, clinical: Clinical, rng: np.random.Generator) -> Geometry:
    """The moving scan's grid: identity direction, its spacing, the repositioned body's box, z cut to fov_fraction."""
    body = np.argwhere(body_mask(ct))
    lo, hi = body.min(axis=0)[::-1], body.max(axis=0)[::-1]  # x, y, z indices
    box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], dtype=float)
    corners = _map(rigid, ct.geometry.index_to_lps(box))
    start, stop = corners.min(axis=0) - 10.0, corners.max(axis=0) + 10.0
    if clinical.fov_fraction < 1.0:
        extent = stop[2] - start[2]
        length = clinical.fov_fraction * extent
        centre = 0.5 * (start[2] + stop[2]) + rng.uniform(-0.2, 0.2) * (extent - length)
        start[2], stop[2] = centre - 0.5 * length, centre + 0.5 * length
    spacing = np.asarray(clinical.moving_spacing_mm or ct.geometry.spacing_mm, dtype=np.float64)
    size = tuple(int(np.floor((stop[k] - start[k]) / spacing[k])) + 1 for k in range(3))
    return Geometry(size, tuple(float(s) for s in spacing), tuple(float(v) for v in start))


def _antialiased(ct: Image, spacing_mm: tuple[float, ...]) -> sitk.Image:
    """The CT (float32), Gaussian-smoothed along the axes where the target spacing is coarser."""
    image = sitk.Cast(ct.to_sitk(), sitk.sitkFloat32)
    sigma = [0.5 * np.sqrt(max(t**2 - s**2, 0.0)) for t, s in zip(spacing_mm, ct.geometry.spacing_mm, strict=True)]
    if max(sigma) <= 0.1:
        return image
    return sitk.DiscreteGaussian(image, [float(v) ** 2 for v in sigma], 32, 0.01, True)


def contrast_change(hu: np.ndarray, gain_hu: float) -> np.ndarray:
    """Soft tissue enhanced: HU + gain exp(-((HU - 80) / 90)^2) (monotonic for gains under 100 HU)."""
    return (hu + gain_hu * np.exp(-(((hu - 80.0) / 90.0) ** 2))).astype(np.float32)


@dataclass(frozen=True)
class Ablation:
    """An ellipsoid in moving space: centre (LPS mm), semi-axes (mm) along the columns of `axes`."""

    centre: np.ndarray
    semi_axes: np.ndarray
    axes: np.ndarray

    def scaled_distance(self, points: np.ndarray, clearance_mm: float = 0.0) -> np.ndarray:
        """sqrt(sum (q_i / (a_i + clearance))^2) of points in the ellipsoid's frame (< 1 inside)."""
        local = (np.asarray(points) - self.centre) @ self.axes
        return np.sqrt(((local / (self.semi_axes + clearance_mm)) ** 2).sum(axis=-1))


def draw_ablation(ct: Image, rigid_total: sitk.Transform, rng: np.random.Generator) -> Ablation:
    """An ablation region around the moving position of a deep soft-tissue point of the CT."""
    point = soft_tissue_point(anatomy(ct), rng)
    centre = _map(rigid_total, point[None])[0]
    semi_axes = rng.uniform(10.0, 18.0, 3)
    return Ablation(centre, semi_axes, Rotation.random(random_state=rng).as_matrix())


def paint_ablation(hu: np.ndarray, geometry: Geometry, ablation: Ablation, drop_hu: float) -> np.ndarray:
    """The moving image with the region drop_hu darker inside (soft edge of about 1.5 mm)."""
    points = geometry.grid_points_lps()
    distance = ablation.scaled_distance(points.reshape(-1, 3)).reshape(hu.shape)
    edge_mm = (distance - 1.0) * float(ablation.semi_axes.mean())
    weight = 1.0 / (1.0 + np.exp(np.clip(edge_mm / 0.75, -50, 50)))
    return (hu - drop_hu * weight * (hu > -200.0)).astype(np.float32)


def make_clinical_case(ct: Image, kind: str, seed: int, clinical: Clinical) -> SynthCase:
    """A clinical-like case: the generator's deformation, then repositioning, own grid, cut, contrast, ablation."""
    deformation = draw_deformation(ct, kind, seed)
    rng = np.random.default_rng([int(seed), 31, round(10 * clinical.rotation_deg), round(clinical.translation_mm)])
    centre = ct.geometry.index_to_lps(np.argwhere(body_mask(ct)).mean(axis=0)[None, ::-1])[0]
    rigid = rigid_motion(centre, clinical, rng)
    total = sitk.CompositeTransform([rigid, displacement_transform(deformation.forward)])  # x -> R(x + d(x))
    true_field = field_from_transform(total, ct.geometry)
    geometry = moving_geometry(ct, rigid, clinical, rng)
    backward = sitk.CompositeTransform([displacement_transform(deformation.inverse), rigid.GetInverse()])
    source = _antialiased(ct, geometry.spacing_mm)
    moved = sitk.Resample(source, geometry.reference_image(), backward, sitk.sitkBSpline, AIR_HU, sitk.sitkFloat32)
    moving_hu, intensity = intensity_model(sitk.GetArrayFromImage(moved), geometry, rng)
    if clinical.contrast:
        intensity["contrast_gain_hu"] = float(rng.uniform(30.0, 60.0))
        moving_hu = contrast_change(moving_hu, intensity["contrast_gain_hu"])
    valid = inside_grid(geometry, LANDMARK_MARGIN_MM)
    ablation = draw_ablation(ct, total, rng) if clinical.ablation else None
    if ablation is not None:
        intensity["ablation"] = {
            "centre_lps": ablation.centre,
            "semi_axes_mm": ablation.semi_axes,
            "drop_hu": float(rng.uniform(45.0, 70.0)),
        }
        moving_hu = paint_ablation(moving_hu, geometry, ablation, intensity["ablation"]["drop_hu"])
        in_grid = valid
        valid = lambda p: in_grid(p) & (ablation.scaled_distance(p, ABLATION_CLEARANCE_MM) >= 1.0)  # noqa: E731
    sigma_fixed, sigma_moving = rng.uniform(6.0, 14.0, 2)
    intensity.update(noise_sigma_fixed_hu=sigma_fixed, noise_sigma_moving_hu=sigma_moving)
    lm_fixed, lm_moving = pick_landmarks(ct, true_field, valid)
    params = {
        "source": "bench clinical_cases (evaluation only)",
        **deformation.params,
        "clinical": {
            **clinical.__dict__,
            "rigid_matrix": rigid.GetMatrix(),
            "rigid_translation_mm": rigid.GetTranslation(),
            "rigid_centre_lps": rigid.GetCenter(),
            "moving_geometry": geometry.to_dict(),
        },
        "intensity_params": intensity,
        "landmarks_found": int(len(lm_fixed)),
        "ct_size": [int(v) for v in ct.geometry.size],
        "ct_spacing_mm": [float(v) for v in ct.geometry.spacing_mm],
    }
    return SynthCase(
        fixed=fixed_image(ct, sigma_fixed, rng),
        moving=Image(to_int16(noisy(moving_hu, sigma_moving, rng)), geometry, {"role": "moving"}),
        true_field=true_field,
        landmarks_fixed_lps=lm_fixed,
        landmarks_moving_lps=lm_moving,
        fixed_labels=None,
        moving_labels=None,
        family=f"clinical-{kind}",
        seed=int(seed),
        params=plain(params),
    )
