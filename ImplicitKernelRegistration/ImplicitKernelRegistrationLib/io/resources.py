"""Where the shipped weights live: Resources/weights/ at the top of a checkout, or beside the Slicer module."""

from __future__ import annotations

from pathlib import Path

_LIB = Path(__file__).resolve().parents[1]  # ImplicitKernelRegistrationLib/
# A checkout (or an editable install): <root>/Resources/weights; an installed Slicer extension copies
# them beside the module: <qt-scripted-modules>/Resources/weights (see ImplicitKernelRegistration/CMakeLists.txt).
WEIGHT_FOLDERS = (_LIB.parents[1] / "Resources" / "weights", _LIB.parent / "Resources" / "weights")

# The shipped files (each with a model card of the same stem, .md); ImplicitKernelRegistration/CMakeLists.txt
# copies the same names beside the Slicer module.
KERNEL_WEIGHTS = "kernel_v2.pt"
ENCODER_WEIGHTS = "encoder_v1.pt"
UNCERTAINTY_PARAMS = "uncertainty_v1.json"


def weights_file(name: str) -> Path:
    """The shipped file `name` from the first weights folder that has it (else the checkout's path)."""
    for folder in WEIGHT_FOLDERS:
        if (folder / name).is_file():
            return folder / name
    return WEIGHT_FOLDERS[0] / name
