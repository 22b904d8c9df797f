"""Made-up data with a known answer: the phantom, the deformation generator and the demo tumour."""

from .phantom import make_phantom, write_phantom
from .synth import SynthCase, case_from_files, make_case, write_case
from .tumour import demo_tumour_and_zone

__all__ = [
    "SynthCase",
    "case_from_files",
    "demo_tumour_and_zone",
    "make_case",
    "make_phantom",
    "write_case",
    "write_phantom",
]
