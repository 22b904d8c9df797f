"""One configuration mechanism: every settings class reads and writes dicts alike; the CLI options come from it."""

from __future__ import annotations

import sys

import pytest

from ImplicitKernelRegistrationLib.cli import build_parser
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.registration.config import (
    ALIGN_MODES,
    REGISTRATION_FLAGS,
    RegistrationConfig,
    ScaleSettings,
)
from ImplicitKernelRegistrationLib.registration.encoder import EncoderConfig
from ImplicitKernelRegistrationLib.registration.kernel import KernelConfig
from ImplicitKernelRegistrationLib.training.config import TrainConfig
from ImplicitKernelRegistrationLib.training.train_encoder import EncoderTrainConfig

CONFIGS = [
    RegistrationConfig(spacing_mm=3.0, alignment="none", weights="w.pt", scales=(ScaleSettings(2, 3, 0.5),)),
    KernelConfig(k=12, local_linear=True),
    EncoderConfig(hidden=8),
    TrainConfig(kernel=KernelConfig(heads="spatial"), sources=("a.nii.gz",), noise_vox=(0.5, 1.0)),
    EncoderTrainConfig(EncoderConfig(), sources=("a.nii.gz", "phantom:0")),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_to_dict_and_from_dict_are_inverse(config) -> None:
    plain = config.to_dict()
    assert not any(isinstance(v, tuple) for v in plain.values())  # JSON-ready: lists, not tuples
    assert type(config).from_dict(plain) == config


@pytest.mark.parametrize("cls", [type(c) for c in CONFIGS], ids=lambda c: c.__name__)
def test_unknown_key_is_one_line_naming_key_and_source(cls) -> None:
    plain = CONFIGS[[type(c) for c in CONFIGS].index(cls)].to_dict()
    with pytest.raises(IkrError) as err:
        cls.from_dict({**plain, "spacnig": 1}, "session.json")
    message = str(err.value)
    assert "'spacnig'" in message and "session.json" in message and "\n" not in message


def test_types_and_choices_are_checked() -> None:
    with pytest.raises(IkrError, match="'max_keypoints' must be int"):
        RegistrationConfig.from_dict({"max_keypoints": "many"})
    with pytest.raises(IkrError, match="'alignment' is 'similarity'; choose one of rigid, affine, none"):
        RegistrationConfig.from_dict({"alignment": "similarity"})
    with pytest.raises(IkrError, match="'step_vox' must be float"):
        RegistrationConfig.from_dict({"scales": [{"downsample": 1, "search_radius_vox": 2, "step_vox": "x"}]})
    assert RegistrationConfig.from_dict({"spacing_mm": 3}).spacing_mm == 3.0  # an int where a float is wanted
    assert RegistrationConfig.from_dict({}) == RegistrationConfig()  # missing keys take the defaults


def test_register_options_come_from_the_config() -> None:
    args = build_parser().parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out"])
    default = RegistrationConfig()
    for name, flag in REGISTRATION_FLAGS.items():
        assert getattr(args, flag.lstrip("-").replace("-", "_")) == getattr(default, name)
    align = next(a for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions if a.dest == "align")
    assert tuple(align.choices) == ALIGN_MODES


def test_building_the_parser_imports_no_torch() -> None:
    """`ikr info` stays fast: the options are built from the torch-free settings module."""
    import subprocess

    code = (
        "import sys; from ImplicitKernelRegistrationLib.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dense_model_takes_k_from_its_kernel() -> None:
    import torch

    from ImplicitKernelRegistrationLib.core.geometry import Geometry
    from ImplicitKernelRegistrationLib.registration.dense import DenseModel
    from ImplicitKernelRegistrationLib.registration.kernel import make_kernel

    working = Geometry((9, 9, 9), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    for name, k in (("gaussian", 7), ("learned", 11)):
        kernel = make_kernel(name, KernelConfig(k=k, heads="spatial"))
        model = DenseModel(kernel, None, working, RegistrationConfig().control_step_vox)
        assert model.k == k
        model.set_keys(torch.rand(20, 3) * 8, torch.zeros(20, 3), torch.ones(20))
        assert model.neighbours.shape[1] == k
