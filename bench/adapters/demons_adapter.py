"""SimpleITK diffeomorphic demons, multi-resolution (after SimpleITK's multiscale demons example).

Demons needs both images on one grid: the moving image is first resampled onto the fixed grid, by
the identity, or with `"affine": true` through a SimpleITK affine registration as its users run it
(CenteredTransformInitializer on the geometry, then an AffineTransform with Mattes MI, 50 bins,
5 % random sampling, regular-step gradient descent, shrink 4/2/1, smoothing 2/1/0 mm). The result
maps x -> A(x + d(x)), evaluated on the fixed grid.

Levels shrink the images by 4, 2 and 1 (Gaussian smoothing of 2, 1 and 0 voxels first); at each
level the filter refines the upsampled field of the level before. The demons field is used to
sample the moving image at p + d(p) (LPS mm on the fixed grid): fixed -> moving, our convention.
"""

from __future__ import annotations

import SimpleITK as sitk
from _common import Stopwatch, finish, options, parse_args, read_float, version

DEFAULTS = {
    "affine": False,
    "shrink_factors": [4, 2, 1],
    "smoothing_vox": [2.0, 1.0, 0.0],
    "iterations": [50, 30, 20],
    "field_sigma_vox": 1.5,
}


def pyramid_level(image: sitk.Image, shrink: int, sigma_vox: float) -> sitk.Image:
    """The image smoothed (sigma in voxels of the input) and shrunk by an integer factor."""
    if sigma_vox > 0:
        sigma_mm = [sigma_vox * s for s in image.GetSpacing()]
        image = sitk.SmoothingRecursiveGaussian(image, sigma_mm)
    return sitk.Shrink(image, [shrink] * 3) if shrink > 1 else image


def zero_field(reference: sitk.Image) -> sitk.Image:
    """A zero displacement field (float64 vectors) on the reference grid."""
    field = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(reference)
    return field


def multiscale_demons(fixed: sitk.Image, moving: sitk.Image, settings: dict) -> sitk.Image:
    """Coarse-to-fine diffeomorphic demons; the field on the fixed grid (float64 vectors, LPS mm)."""
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(settings["field_sigma_vox"])
    field = None
    levels = zip(settings["shrink_factors"], settings["smoothing_vox"], settings["iterations"], strict=True)
    for shrink, sigma, iterations in levels:
        fixed_level = pyramid_level(fixed, shrink, sigma)
        moving_level = pyramid_level(moving, shrink, sigma)
        start = zero_field(fixed_level) if field is None else sitk.Resample(field, fixed_level)
        demons.SetNumberOfIterations(iterations)
        field = demons.Execute(fixed_level, moving_level, start)
    return sitk.Resample(field, fixed) if field.GetSize() != fixed.GetSize() else field


def affine_registration(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """SimpleITK's affine registration: geometric centring, then Mattes MI with a multi-resolution pyramid."""
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=0)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-8
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def register(fixed: sitk.Image, moving: sitk.Image, settings: dict) -> sitk.Image:
    """The moving image brought onto the fixed grid (identity or affine), demons, and the composed field."""
    start = affine_registration(fixed, moving) if settings["affine"] else sitk.Transform(3, sitk.sitkIdentity)
    on_fixed = sitk.Resample(moving, fixed, start, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    field = multiscale_demons(fixed, on_fixed, settings)
    if not settings["affine"]:
        return field
    total = sitk.CompositeTransform([start, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))])
    return sitk.TransformToDisplacementField(
        total, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
    )


def main() -> None:
    """Register, write the field and the record."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    fixed, moving = read_float(args.fixed), read_float(args.moving)
    with Stopwatch() as clock:
        field = register(fixed, moving, settings)
    record = {
        "method": "demons-affine" if settings["affine"] else "demons",
        "package": "SimpleITK",
        "version": version("SimpleITK"),
        "settings": {**settings, "filter": "DiffeomorphicDemonsRegistrationFilter"},
        "device": "cpu",
        "registration_s": clock.seconds,
    }
    finish(args, field, fixed, record)


if __name__ == "__main__":
    main()
