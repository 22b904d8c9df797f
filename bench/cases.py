"""The benchmark's cases: seeded deformations of the real CTs by two generators, and the translation check case.

Five sets: `synth` (the project's own generator, `synth.make_case`), `independent` (bench's
evaluation generator, `eval_generator.make_eval_case`: stationary velocity fields, never used in
training) and `clinical` (`clinical_cases.make_clinical_case`: the independent generator's
deformation plus repositioning, own moving grid, field-of-view cut, contrast change, ablation) and
`sliding` (the evaluation generator's kind "sliding" on the thorax: lungs sliding along the chest wall), and
`clean` (the independent generator on other seeds without its intensity model: no noise, gamma or bias).
Cases are written once under bench/work/cases/<name>/ (synth.write_case layout) and read back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
from clinical_cases import Clinical, make_clinical_case
from eval_generator import make_eval_case, write_eval_case

from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.io.images import read_image, write_image
from ImplicitKernelRegistrationLib.synthetic.synth import SynthCase, make_case, read_case, write_case

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

    @property
    def set(self) -> str:
        """The case set: 'synth'."""
        return "synth"

    def build(self, data_dir: Path, work_dir: Path) -> Path:
        """The case's folder, generated if absent."""
        return build_case(self, data_dir, work_dir)


@dataclass(frozen=True)
class EvalSpec:
    """One case of the independent generator: CT, kind, seed, and (for the clinical set) what makes it clinical."""

    ct: str
    kind: str
    seed: int = 0
    clinical: Clinical | None = None
    clean: bool = False  # no intensity model: no gamma change, bias field or noise (the 'clean' set)

    @property
    def name(self) -> str:
        """'ev-abdomen-random-s0', 'ev-abdomen-random-s1-clean' (the clean set), or
        'cl-abdomen-breathing-s0-r20-t60-fov60-2x2x5-contrast' for a clinical case."""
        base = f"{self.ct.split('_')[0]}-{self.kind}-s{self.seed}"
        if self.clinical is not None:
            return f"cl-{base}-{self.clinical.label()}"
        return f"ev-{base}-clean" if self.clean else f"ev-{base}"

    @property
    def unseen(self) -> str:
        """The generator is never used in training; the liver slab CT is held out too."""
        return "generator" + (" + CT" if self.ct in UNSEEN_CTS else "")

    @property
    def set(self) -> str:
        """The case set: 'independent', 'sliding' (the independent generator's sliding kind), 'clean' or 'clinical'."""
        if self.clinical is not None:
            return "clinical"
        if self.clean:
            return "clean"
        return "sliding" if self.kind == "sliding" else "independent"

    def build(self, data_dir: Path, work_dir: Path) -> Path:
        """The case's folder under work_dir/cases, generated (and written atomically) if absent."""
        folder = work_dir / "cases" / self.name
        if not (folder / "case.json").exists():
            ct = read_image(data_dir / "ct" / self.ct)
            if self.clinical is None:
                case = make_eval_case(ct, self.kind, self.seed, intensity=not self.clean)
            else:
                case = make_clinical_case(ct, self.kind, self.seed, self.clinical)
            write_eval_case(case, folder)
        return folder


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


INDEPENDENT_CASES = (
    EvalSpec(ABDOMEN, "breathing"),
    EvalSpec(ABDOMEN, "random"),
    EvalSpec(ABDOMEN, "local"),
    EvalSpec(THORAX, "breathing"),
    EvalSpec(LIVER, "mixed"),
    EvalSpec(LIVER, "local"),
)
QUICK_INDEPENDENT_CASES = (EvalSpec(LIVER, "mixed"), EvalSpec(LIVER, "local"))

CLINICAL_CASES = (
    EvalSpec(ABDOMEN, "breathing", 0, Clinical()),  # aligned, same grid: the reference of the two below
    EvalSpec(ABDOMEN, "breathing", 0, Clinical(8.0, 25.0)),
    EvalSpec(ABDOMEN, "breathing", 0, Clinical(20.0, 60.0, (2.0, 2.0, 5.0), 0.6, contrast=True)),
    EvalSpec(LIVER, "mixed", 0, Clinical(contrast=True, ablation=True)),
    EvalSpec(LIVER, "mixed", 0, Clinical(12.0, 40.0, (0.8, 0.8, 2.5), contrast=True, ablation=True)),
    EvalSpec(THORAX, "breathing", 0, Clinical(15.0, 50.0, (0.8, 0.8, 2.5), 0.6, contrast=True)),
)
QUICK_CLINICAL_CASES = CLINICAL_CASES[3:5]

# The independent generator's kinds on other seeds with identical intensities and no noise: a registration's
# floor where the images differ by the deformation alone (what the noise of the 'independent' set hides).
CLEAN_CASES = tuple(
    EvalSpec(ct, kind, 1, clean=True)
    for ct, kind in (
        (ABDOMEN, "breathing"),
        (ABDOMEN, "random"),
        (ABDOMEN, "local"),
        (THORAX, "breathing"),
        (LIVER, "mixed"),
        (LIVER, "local"),
    )
)
QUICK_CLEAN_CASES = CLEAN_CASES[4:]

# Lungs sliding along the chest wall (eval_generator kind "sliding"; needs lungs in view: the thorax).
SLIDING_CASES = (EvalSpec(THORAX, "sliding", 0), EvalSpec(THORAX, "sliding", 1))
QUICK_SLIDING_CASES = SLIDING_CASES[:1]

CASE_SETS = {
    "synth": FULL_CASES,
    "independent": INDEPENDENT_CASES,
    "clinical": CLINICAL_CASES,
    "sliding": SLIDING_CASES,
    "clean": CLEAN_CASES,
}
QUICK_SETS = {
    "synth": QUICK_CASES,
    "independent": QUICK_INDEPENDENT_CASES,
    "clinical": QUICK_CLINICAL_CASES,
    "sliding": QUICK_SLIDING_CASES,
    "clean": QUICK_CLEAN_CASES,
}


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
