"""The benchmark's cases: seeded synthetic deformations of the real CTs, and the translation check case.

Cases are written once under bench/work/cases/<name>/ (synth.write_case) and read back afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ImplicitKernelRegistrationLib.geometry import Image
from ImplicitKernelRegistrationLib.io.images import read_image, write_image
from ImplicitKernelRegistrationLib.synth import SynthCase, make_case, read_case, write_case

THORAX = "thorax_popi_T00_1p5mm.nii.gz"
ABDOMEN = "abdomen_ts_example_ct_3mm.nii.gz"
LIVER = "liver_ts_example_ct_sm_3mm.nii.gz"
LIVER_LABELS = "liver_ts_example_ct_sm_labels117.nii.gz"

# What training never saw (train.default_config): the family "sliding" and the CT "liver slab".
UNSEEN_FAMILIES = ("sliding",)
UNSEEN_CTS = (LIVER,)

TRANSLATION_MM = (3.0, -2.0, 4.0)  # LPS; distinct components so a swapped or flipped axis shows


@dataclass(frozen=True)
class CaseSpec:
    """One seeded synthetic case: which CT, which deformation family, seed and magnitude."""

    ct: str
    family: str
    seed: int = 0
    magnitude_mm: float | None = None

    @property
    def name(self) -> str:
        """A short file-name-safe name, e.g. 'thorax-breathing-6mm-s0'."""
        magnitude = "" if self.magnitude_mm is None else f"-{self.magnitude_mm:g}mm"
        return f"{self.ct.split('_')[0]}-{self.family}{magnitude}-s{self.seed}"

    @property
    def unseen(self) -> str:
        """What about this case training never saw ('' when it saw both the CT and the family)."""
        parts = [w for w, hit in (("family", self.family in UNSEEN_FAMILIES), ("CT", self.ct in UNSEEN_CTS)) if hit]
        return " + ".join(parts)


QUICK_CASES = (
    CaseSpec(LIVER, "bspline", 0),
    CaseSpec(LIVER, "sliding", 0),
)
FULL_CASES = (
    CaseSpec(THORAX, "breathing", 0, 6.0),
    CaseSpec(THORAX, "sliding", 0),
    CaseSpec(ABDOMEN, "bspline", 0),
    CaseSpec(ABDOMEN, "local", 0, 4.0),
    CaseSpec(LIVER, "breathing", 1),
    CaseSpec(LIVER, "sliding", 0),
)


def _labels_for(spec: CaseSpec, data_dir: Path) -> Image | None:
    """The organ label map of the liver slab (names lungs and liver for the generator), else None."""
    path = data_dir / "ct" / LIVER_LABELS
    if spec.ct != LIVER or not path.exists():
        return None
    labels = read_image(path)
    classes = json.loads(path.with_name(path.name.replace(".nii.gz", "_classes.json")).read_text(encoding="utf-8"))
    labels.meta["label_names"] = classes if isinstance(classes, dict) else dict(enumerate(classes))
    return labels


def build_case(spec: CaseSpec, data_dir: Path, work_dir: Path) -> Path:
    """The case's folder under work_dir/cases, generated (and written atomically) if absent."""
    folder = work_dir / "cases" / spec.name
    if not (folder / "case.json").exists():
        ct = read_image(data_dir / "ct" / spec.ct)
        case = make_case(ct, spec.family, spec.seed, labels=_labels_for(spec, data_dir), magnitude_mm=spec.magnitude_mm)
        write_case(case, folder)
    return folder


def load_case(folder: Path) -> SynthCase:
    """Read a case written by build_case."""
    return read_case(folder)


def body_mask(image: Image) -> np.ndarray:
    """Body of a CT: > -500 HU, the largest component, holes filled (z, y, x booleans)."""
    mask = ndimage.binary_opening(image.array > -500, iterations=1)
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def build_translation_case(data_dir: Path, work_dir: Path) -> Path:
    """The liver slab and a copy moved by TRANSLATION_MM (anatomy at p sits at p + t in the copy)."""
    folder = work_dir / "cases" / "translation"
    fixed_path, moving_path = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    if not moving_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        ct = read_image(data_dir / "ct" / LIVER)
        # Resample samples the input at T(y) = y - t, so moving(p + t) = fixed(p).
        shift = sitk.TranslationTransform(3, [-v for v in TRANSLATION_MM])
        moving = sitk.Resample(ct.to_sitk(), ct.to_sitk(), shift, sitk.sitkBSpline, -1000.0)
        write_image(ct, fixed_path)
        write_image(Image.from_sitk(moving), moving_path)
    return folder
