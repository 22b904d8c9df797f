"""The settings of a kernel training run (TrainConfig), the full and the quick recipe (see train.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import Config
from ..registration.kernel import KernelConfig
from ..synthetic.synth import FAMILIES  # noqa: F401 (the families trained on: every synthetic one)

Progress = Callable[[float, str], None]
DEFAULT_CTS = (
    "thorax_popi_T00_1p5mm.nii.gz",
    "abdomen_ts_example_ct_3mm.nii.gz",
    "liver_ts_example_ct_sm_3mm.nii.gz",
)


@dataclass
class TrainConfig(Config):
    """Everything that decides a training run (recorded in the weights file and the model card)."""

    kernel: KernelConfig = field(default_factory=KernelConfig)
    sources: tuple[str, ...] = ("phantom:0",)  # CT paths (NIfTI, HU) or "phantom:SEED"
    val_sources: tuple[str, ...] = ()  # names (file name or phantom:SEED) held out for validation
    families: tuple[str, ...] = FAMILIES
    val_family: str = "sliding"
    seeds_per_family: int = 2
    working_spacings_mm: tuple[float, ...] = (2.5, 3.5)
    phantom_size: tuple[int, int, int] = (128, 112, 96)
    phantom_spacing_mm: float = 2.5
    n_landmarks: int = 100
    max_keypoints: int = 2048
    min_keypoints: int = 128
    query_pool: int = 4096
    n_patches: int = 8
    patches_per_case: int = 2
    queries_per_case: int = 256
    cases_per_step: int = 2
    steps: int = 3500
    lr: float = 2e-3
    weight_decay: float = 1e-4
    noise_vox: tuple[float, float] = (0.25, 1.0)
    outlier_fraction: tuple[float, float] = (0.0, 0.2)
    magnitude_scale: tuple[float, float] = (0.15, 1.5)
    smooth_weight: float = 0.05
    match_fraction: float = 0.0
    match_radius_vox: int = 6
    seed: int = 0
    threads: int = 1
    output: str | None = None
    checkpoint_every: int = 500


def default_config(data_dir: Path, output: Path | None = None, seed: int = 0) -> TrainConfig:
    """The full recipe: the three shared CTs (liver slab held out) and two phantoms, about 30 min on 1 core.

    Keys like the pipeline's: working grids of 2 and 3 mm (the pipeline's default is 2 mm), real
    matches for every case (used for half of the draws), few outliers (the pipeline's
    forward/backward check removes most), and the local-linear read-out.
    """
    ct_dir = Path(data_dir) / "ct"
    sources = tuple(str(ct_dir / name) for name in DEFAULT_CTS if (ct_dir / name).exists())
    return TrainConfig(
        kernel=KernelConfig(local_linear=True),
        sources=(*sources, "phantom:0", "phantom:1"),
        val_sources=("liver_ts_example_ct_sm_3mm.nii.gz",),
        working_spacings_mm=(2.0, 3.0),
        outlier_fraction=(0.0, 0.05),
        match_fraction=1.0,
        steps=2500,
        output=None if output is None else str(output),
        seed=seed,
    )


def quick_config(output: Path | None = None, seed: int = 0) -> TrainConfig:
    """A tiny run for tests: one coarse phantom, two training families, seconds on one core."""
    return TrainConfig(
        sources=("phantom:0",),
        families=("bspline", "local", "sliding"),
        val_family="sliding",
        seeds_per_family=1,
        working_spacings_mm=(6.0,),
        phantom_size=(56, 48, 40),
        phantom_spacing_mm=6.0,
        n_landmarks=30,
        max_keypoints=300,
        query_pool=512,
        n_patches=2,
        patches_per_case=1,
        min_keypoints=100,
        queries_per_case=128,
        cases_per_step=2,
        steps=80,
        lr=3e-3,
        output=None if output is None else str(output),
        checkpoint_every=0,
        seed=seed,
    )
