"""elastix B-spline (itk-elastix): the default 'bspline' parameter map, 4 resolutions, 10 mm final grid.

elastix's transform maps fixed points to moving points, and transformix's deformation field on the
fixed grid is that transform minus the identity, in physical (LPS) mm: already our convention.
"""

from __future__ import annotations

import itk
import numpy as np
import SimpleITK as sitk
from _common import Stopwatch, field_image, finish, options, parse_args, read_float, version

DEFAULTS = {"resolutions": 4, "final_grid_mm": 10.0, "iterations": 256, "samples": 2048}


def parameter_object(settings: dict) -> itk.ParameterObject:
    """elastix's default B-spline map with the stated resolutions, grid spacing and iterations."""
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline", settings["resolutions"], settings["final_grid_mm"])
    bspline["MaximumNumberOfIterations"] = [str(settings["iterations"])]
    bspline["NumberOfSpatialSamples"] = [str(settings["samples"])]
    bspline["WriteResultImage"] = ["false"]
    parameters.AddParameterMap(bspline)
    return parameters


def to_itk(image: sitk.Image) -> itk.Image:
    """A float32 SimpleITK image as an ITK image with the same geometry."""
    out = itk.image_from_array(sitk.GetArrayFromImage(image).astype(np.float32))
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection()).reshape(3, 3)))
    return out


def main() -> None:
    """Register, write the deformation field and the record."""
    args = parse_args(__doc__)
    settings = options(args, DEFAULTS)
    fixed_sitk, moving_sitk = read_float(args.fixed), read_float(args.moving)
    fixed, moving = to_itk(fixed_sitk), to_itk(moving_sitk)
    with Stopwatch() as clock:
        _, transform = itk.elastix_registration_method(
            fixed,
            moving,
            parameter_object=parameter_object(settings),
            log_to_console=False,
            number_of_threads=args.threads,
        )
        deformation = itk.transformix_deformation_field(moving, transform)
        field = field_image(itk.array_from_image(deformation), fixed_sitk)
    record = {
        "method": "elastix",
        "package": "itk-elastix",
        "version": version("itk-elastix"),
        "settings": {**settings, "map": "default bspline (MI + bending energy, ASGD)"},
        "device": "cpu",
        "registration_s": clock.seconds,
    }
    finish(args, field, fixed_sitk, record)


if __name__ == "__main__":
    main()
