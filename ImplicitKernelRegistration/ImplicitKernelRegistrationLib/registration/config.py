"""The settings of a registration, and the names its choices take (torch-free: the CLI builds its options here).

RegistrationConfig reads and writes dicts as every settings class does (core/config.py); the
command line's `register` and `demo` options are generated from its fields (cli.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from ..core.config import Config, add_flags, flag_values, setting

if TYPE_CHECKING:
    from .key_optimisation import KeyOptimisationSettings
    from .residual import ResidualSettings

ALIGN_MODES = ("rigid", "affine", "none")  # the initial alignment (alignment.py)
KERNEL_NAMES = ("learned", "tps", "gaussian")  # the sparse-to-dense kernels (kernel.py)
HEADS = ("both", "spatial", "semantic")  # the learned kernel's attention streams (kernel.py)
FEATURE_NAMES = ("mind", "learned")  # matching features: MIND-SSC or the learned encoder (encoder.py)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ScaleSettings(Config):
    """One level of the hierarchy: image pooling factor, search cube radius and step (pooled voxels).

    check: run the backward match and drop keypoints whose round trip fails (forward/backward
    consistency); without it every forward match is kept with its own confidence.
    """

    downsample: int
    search_radius_vox: int
    step_vox: float
    check: bool = True


# At a 2 mm working grid the five searches reach +-32, +-12, +-6, +-4 and +-2 mm around the
# current estimate, on images pooled to 8, 4, 2, 2 and 2 mm. The two coarse scales skip the backward
# match: the finer scales search around their result again and do check it (this saves a quarter of
# the runtime and left the TRE unchanged on the thorax and abdomen cases of bench/).
DEFAULT_SCALES: tuple[ScaleSettings, ...] = (
    ScaleSettings(4, 4, 1.0, check=False),
    ScaleSettings(2, 3, 1.0, check=False),
    ScaleSettings(1, 3, 1.0),
    ScaleSettings(1, 2, 1.0),
    ScaleSettings(1, 2, 0.5),
)


@dataclass
class RegistrationConfig(Config):
    """Settings of one registration; every field is recorded in the report (to_dict/from_dict: core/config.py)."""

    spacing_mm: float = setting(2.0, help="working grid spacing in mm")
    # Rigid by default: on an already aligned breathing-like case (bench clinical set, abdomen) an affine
    # start cost 0.23 mm of TRE (1.19 against 0.96 mm without alignment), a rigid one 0.01 mm; both recover
    # a repositioned patient (test_alignment).
    alignment: str = setting(
        "rigid",
        choices=ALIGN_MODES,
        help="automatic initial alignment before the deformable stage (affine: rigid, then affine)",
    )
    kernel: str = setting("learned", choices=KERNEL_NAMES, help="sparse-to-dense kernel")
    heads: str = setting("both", choices=HEADS, help="the learned kernel's attention streams")
    weights: str | None = setting(None, help="learned kernel weights (default: the shipped ones)")
    features: str = setting("mind", choices=FEATURE_NAMES, help="matching features: MIND-SSC or the encoder")
    encoder_weights: str | None = setting(None, help="learned encoder weights (default: the shipped ones)")
    max_keypoints: int = setting(2048, help="keypoints detected in the fixed image at most")
    # Denser keys (bench/results/accuracy_dev.md, session 4): a non-maximum suppression radius of 2 working
    # voxels (3: the detector's default) and about 1000 keys on a regular lattice inside the fixed mask
    # (keypoints.lattice_keypoints; 0: none) lowered the TRE on every independent case of bench/ (mean 0.77 ->
    # 0.65 mm) but folded the field on the two contrast-and-ablation liver cases (0.3-0.4 % of the body):
    # off by default until the lattice keys' matches are made safer there.
    keypoint_nms_vox: int = 3
    lattice_keys: int = 0
    device: str = setting("auto", choices=DEVICES, help="where to compute (auto: CUDA when available)")
    seed: int = setting(0, help="seed of the keypoint sampling and the residual's points")
    # The kernel is evaluated every `control_step_vox` working voxels and interpolated between. 6 (12 mm at 2 mm)
    # since session 8: on bench's six independent cases and two liver pairs each TRE within 0.006 mm of 5's
    # (bench/results/accuracy_dev.md, session 8), with 0.58x the control points (the kernel on the control grid
    # 1.15 -> 0.74 s on the 1.5 mm thorax). A saved session keeps the step it was registered with.
    control_step_vox: int = 6
    consistency_threshold_vox: float = 1.5
    # Instance optimisation of the key displacements through the kernel against the images, after the last
    # scale (key_optimisation.py); 0 iterations: none. The field stays kernel(keys), so clicks stay exact. On by
    # default, with the robust image term: in one set of runs on bench's independent cases (bench/results/inst_s5.md,
    # bench/results/accuracy_dev.md session 5) it lowered the TRE on every case (mean 0.77 -> 0.66 mm, thorax
    # breathing 0.38 -> 0.24, abdomen breathing 0.56 -> 0.45), no folding, and left the contrast-and-ablation liver
    # cases as they were (1.84 / 1.84 -> 1.84 / 1.86); the plain SSD (key_robust 0) made those 0.14-0.23 mm worse.
    # Cost: about 2.6-5.3 CPU seconds on the 1.5 mm thorax (one thread, busy machine). 25 iterations since session 7:
    # with the residual after it, 25 gave the TRE of 50 on bench's six independent cases (each within 0.01 mm, mean
    # 0.447 against 0.450) and the two contrast-and-ablation liver pairs (1.48 / 1.51 against 1.47 / 1.50); none
    # (0) lost 0.05 mm on abdomen breathing and 0.02 on thorax (bench/results/accuracy_dev.md, session 7).
    key_iterations: int = setting(25, help="iterations of the key optimisation against the images (0: off)")
    key_learning_rate: float = 0.05
    key_points: int = 16384
    key_smoothness: float = 0.01
    key_anchor: float = 0.001
    key_robust: float = 2.0
    # The residual fitted to the images after the last scale (residual.py); 0 iterations: none. On by default since
    # session 6, regularising the residual alone (not the whole field), on 131072 points, with the robust image term:
    # on bench's six independent cases it lowered the TRE on every case (abdomen breathing 0.45 -> 0.39, random
    # 1.27 -> 0.74, local 0.35 -> 0.29, thorax 0.24 -> 0.20, liver mixed 1.28 -> 0.85, local 0.39 -> 0.28 mm; Greedy
    # 0.41 / 0.81 / 0.36 / 0.21 / 0.89 / 0.35) and on the contrast-and-ablation liver pairs (1.84 -> 1.48 mm), no
    # folding; SDlogJ rises to 0.08-0.10 on the breathing-like cases, as rough as their true fields and Greedy's
    # (bench/results/accuracy_dev.md, session 6). Refinement leaves the residual in place, so clicks stay exact.
    # Session 7: 20 iterations at a learning rate of 0.045 (30 at 0.03 before) gave the same TRE on those cases
    # (mean 0.445 against 0.447 mm, each within 0.02 mm) in two thirds of the time.
    # Session 9: smoothness 0.2 (was 0.5). On bench's 'clean' set (the independent generator without noise) 0.5 left
    # the residual smoother than the true fields (SDlogJ 0.017 against 0.043 on liver local) and 0.08 mm behind
    # Greedy there; 0.2 over those six cases, the six noisy independent ones and the two contrast-and-ablation liver
    # pairs: mean 0.579 -> 0.550 mm, clean liver local 0.41 -> 0.34 (Greedy 0.33), the liver pairs 1.47 / 1.49 ->
    # 1.39 / 1.40, noisy abdomen breathing 0.37 -> 0.41 (Greedy 0.38) and thorax 0.21 -> 0.23 (0.22); no folding
    # (bench/results/accuracy_dev.md, session 9).
    residual_iterations: int = 20
    residual_step_vox: int = 3
    residual_learning_rate: float = 0.045
    residual_smoothness: float = 0.2
    residual_points: int = 131072
    residual_robust: float = 2.0
    # Region-aware key neighbourhoods: with an automatic lung mask of the fixed image (none in a scan
    # without lungs), a point inside the lungs attends only to keys inside them, a point outside only
    # to keys outside, so the field can slide at the pleura (dense.py). Off by default: on bench's sliding thorax
    # cases it lowers the TRE from 1.15 to 0.77 mm (near the pleura 1.5 to 1.0), but on the independent breathing
    # thorax, whose motion is smooth across the pleura, it raises it from 0.38 to 0.43 mm (bench/results/lung_s4.md).
    lung_regions: bool = setting(
        False,
        help="region-aware neighbourhoods in an automatic lung mask, so the lungs may slide along the chest wall "
        "(no effect without lungs in view)",
    )
    scales: tuple[ScaleSettings, ...] = field(default_factory=lambda: DEFAULT_SCALES)

    def key_optimisation_settings(self) -> KeyOptimisationSettings:
        """The key_* fields as the key optimisation's settings."""
        from .key_optimisation import KeyOptimisationSettings

        return self._prefixed(KeyOptimisationSettings, "key_")

    def residual_settings(self) -> ResidualSettings:
        """The residual_* fields as the residual stage's settings."""
        from .residual import ResidualSettings

        return self._prefixed(ResidualSettings, "residual_")

    def _prefixed(self, settings_class: type, prefix: str):  # noqa: ANN202  (an instance of settings_class)
        """An instance of a settings dataclass whose every field f is this config's field prefix + f."""
        return settings_class(**{f.name: getattr(self, prefix + f.name) for f in fields(settings_class)})


# RegistrationConfig field -> its `register`/`demo` option (type, default, choices and help come from the field)
REGISTRATION_FLAGS = {
    "spacing_mm": "--spacing",
    "alignment": "--align",
    "kernel": "--kernel",
    "heads": "--heads",
    "weights": "--weights",
    "features": "--features",
    "encoder_weights": "--encoder-weights",
    "max_keypoints": "--max-keypoints",
    "key_iterations": "--key-iterations",
    "lung_regions": "--lung-regions",
    "device": "--device",
    "seed": "--seed",
}


def add_registration_flags(parser: argparse.ArgumentParser) -> None:
    """The command-line options of the RegistrationConfig fields in REGISTRATION_FLAGS."""
    add_flags(parser, RegistrationConfig, REGISTRATION_FLAGS)


def registration_settings(args: argparse.Namespace) -> dict:
    """The RegistrationConfig fields named by parsed REGISTRATION_FLAGS options."""
    return flag_values(args, REGISTRATION_FLAGS)
