"""elastix B-spline (itk-elastix): the default 'bspline' parameter map, 4 resolutions, 10 mm final grid.

With `"affine": true`, as elastix's users run it: the default 'affine' map (MI, ASGD, 4 resolutions,
256 iterations) first, then the B-spline map started from it; transformix composes both.

elastix's transform maps fixed points to moving points, and transformix's deformation field on the
fixed grid is that transform minus the identity, in physical (LPS) mm: already our convention.
"""

from __future__ import annotations

import tempfile

import itk
from _common import Stopwatch, field_image, finish, options, parse_args, read_float, version

BSPLINE_NOTE = "default bspline (MI + bending energy, ASGD)"
DEFAULTS = {"resolutions": 4, "final_grid_mm": 10.0, "iterations": 256, "samples": 2048, "affine": False}


def parameter_object(settings: dict) -> itk.ParameterObject:
    """elastix's default B-spline map (resolutions, grid spacing, iterations), the default affine map first if asked."""
    parameters = itk.ParameterObject.New()
    if settings["affine"]:
        affine = parameters.GetDefaultParameterMap("affine", settings["resolutions"])
        affine["WriteResultImage"] = ["false"]
        parameters.AddParameterMap(affine)
    bspline = parameters.GetDefaultParameterMap("bspline", settings["resolutions"], settings["final_grid_mm"])
    bspline["MaximumNumberOfIterations"] = [str(settings["iterations"])]
    bspline["NumberOfSpatialSamples"] = [str(settings["samples"])]
    bspline["WriteResultImage"] = ["false"]
    parameters.AddParameterMap(bspline)
    return parameters


def main() -> None:
    """Register, write the deformation field and the record."""
    # Threads come from ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (set by run.py): passing
    # number_of_threads to elastix_registration_method crashes itk-elastix 0.25.4 here.
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    fixed_sitk = read_float(args.fixed)
    fixed, moving = itk.imread(args.fixed, itk.F), itk.imread(args.moving, itk.F)
    with Stopwatch() as clock:
        _, transform = itk.elastix_registration_method(
            fixed,
            moving,
            parameter_object=parameter_object(settings),
            log_to_console=False,
        )
        with tempfile.TemporaryDirectory(prefix="transformix-") as tmp:  # it writes deformationField.nii
            deformation = itk.transformix_deformation_field(moving, transform, output_directory=tmp)
        field = field_image(itk.array_from_image(deformation), fixed_sitk)
    record = {
        "method": "elastix-affine" if settings["affine"] else "elastix",
        "package": "itk-elastix",
        "version": version("itk-elastix"),
        "settings": {**settings, "map": ("default affine, then " if settings["affine"] else "") + BSPLINE_NOTE},
        "device": "cpu",
        "registration_s": clock.seconds,
    }
    finish(args, field, fixed_sitk, record)


if __name__ == "__main__":
    main()
