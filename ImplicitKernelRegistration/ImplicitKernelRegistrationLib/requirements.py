"""The Python packages the Slicer module needs, with versions; checked against pyproject.toml by a test.

Inside 3D Slicer 5.10, numpy, scipy, SimpleITK and vtk come with Slicer itself (they are checked, never
installed over Slicer's own); torch comes from the PyTorch extension (PyTorchUtils) when it is there, else
pip; matplotlib (the margin report's pictures) from pip. highdicom, slicerio and pydicom >= 3 are not needed
in Slicer: the module reads no DICOM itself and saves .seg.nrrd with Slicer (installing pydicom 3 would
replace the pydicom 2.4 that Slicer's DICOM module uses).
Slicer 5.10.0's SuperBuild pins numpy 2.0.2, scipy 1.13.1 and packaging 25.0 (used here to compare versions),
all within the bounds below.
Testing/test_slicer_workflow.py checks that every string here agrees with pyproject.toml's dependencies
(the development pin of torch must lie in the range given here).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable

# import name -> pip requirement
SLICER_REQUIREMENTS = {
    "torch": "torch>=2.4,<3",
    "numpy": "numpy>=1.26",
    "scipy": "scipy>=1.11",
    "SimpleITK": "SimpleITK>=2.3",
    "vtk": "vtk>=9.3",
    "matplotlib": "matplotlib>=3.8",
}
BUNDLED_WITH_SLICER = ("numpy", "scipy", "SimpleITK", "vtk")  # never pip-installed into Slicer
TORCH_VERSION_RANGE = SLICER_REQUIREMENTS["torch"][len("torch") :]  # for PyTorchUtils.installTorch


def _requirement_class():
    """packaging's Requirement (pip's vendored copy when packaging itself is not installed, as in some Slicers)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - depends on the Python it runs in
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def installed_version(import_name: str) -> str | None:
    """The installed version of a package ('' when importable but without metadata; None when absent)."""
    if importlib.util.find_spec(import_name) is None:
        return None
    try:
        return importlib.metadata.version(import_name)
    except importlib.metadata.PackageNotFoundError:
        return ""  # built into Slicer without pip metadata: present, version unknown


def unmet_requirements(
    requirements: dict[str, str], version_of: Callable[[str], str | None] = installed_version
) -> dict[str, str]:
    """import name -> why its requirement is not met ('missing' or 'version X, needs SPEC'); {} when all are met.

    A package present without a known version counts as met (Slicer's own builds may lack pip metadata).
    """
    requirement_class = _requirement_class()
    out = {}
    for name, text in requirements.items():
        version = version_of(name)
        if version is None:
            out[name] = "missing"
        elif version and not requirement_class(text).specifier.contains(version, prereleases=True):
            out[name] = f"version {version}, needs {requirement_class(text).specifier}"
    return out
