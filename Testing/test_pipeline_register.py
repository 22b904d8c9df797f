"""The registration hierarchy end to end: TRE drops, every kernel variant runs, the report is complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import mm_to_voxels, voxels_to_mm
from ImplicitKernelRegistrationLib.io.images import read_image
from ImplicitKernelRegistrationLib.registration.pipeline import (
    DEFAULT_WEIGHTS,
    RegistrationConfig,
    register,
    resolve_device,
)
from ImplicitKernelRegistrationLib.review.report import field_quality, landmark_errors
from ImplicitKernelRegistrationLib.synthetic.synth import make_case


@pytest.fixture(scope="module")
def abdomen_case():
    """A breathing-like case of the real abdominal CT (3 mm)."""
    ct = read_image(shared_path("ct", "abdomen_ts_example_ct_3mm.nii.gz"))
    return make_case(ct, "breathing", seed=3, magnitude_mm=8.0)


def _tre(result, case) -> tuple[float, float]:
    """Mean TRE before and after."""
    e = landmark_errors(result.field, case.landmarks_fixed_lps, case.landmarks_moving_lps)
    return e["tre_before_mm"]["mean"], e["tre_mm"]["mean"]


def test_phantom_registration_lowers_tre_fourfold(phantom_case, phantom_registration):
    before, after = _tre(phantom_registration, phantom_case)
    assert before > 4.0
    assert after < before / 4
    report = phantom_registration.report
    for key in ("runtime_s", "peak_memory_mb", "device", "n_keypoints"):
        assert key in report
    assert report["peak_memory_mb"] > 0
    assert phantom_registration.field.geometry == phantom_case.fixed.geometry


def test_learned_kernel_lowers_tre_fourfold_on_real_ct(abdomen_case):
    assert DEFAULT_WEIGHTS.is_file(), "the shipped kernel weights are missing"
    result = register(abdomen_case.fixed, abdomen_case.moving, RegistrationConfig(spacing_mm=3.0))
    before, after = _tre(result, abdomen_case)
    assert after < before / 4, (before, after)
    quality = field_quality(result.field)
    assert quality["folding_percent"] < 0.5
    assert quality["sdlogj"] < 0.2


@pytest.mark.parametrize("kernel", ["tps", "gaussian"])
def test_peer_kernels_run_and_register(abdomen_case, kernel):
    config = RegistrationConfig(kernel=kernel, spacing_mm=3.0)
    result = register(abdomen_case.fixed, abdomen_case.moving, config)
    before, after = _tre(result, abdomen_case)
    assert after < before / 3, (kernel, before, after)


def test_correspondences_describe_the_field(phantom_registration):
    corr = phantom_registration.correspondences
    assert len(corr) == phantom_registration.report["n_keypoints"]
    kept = corr.confidence > 0
    # the field at a kept keypoint is close to that keypoint's own match (the kernel interpolates)
    from ImplicitKernelRegistrationLib.core.fields import sample_field

    at_keys = sample_field(phantom_registration.field, corr.fixed_lps[kept])
    assert np.median(np.linalg.norm(at_keys - corr.displacement_mm[kept], axis=1)) < 1.5


def test_voxel_mm_conversion_round_trips_on_a_rotated_grid():
    from ImplicitKernelRegistrationLib.core.geometry import Geometry

    c, s = np.cos(0.3), np.sin(0.3)
    geom = Geometry((10, 10, 10), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (c, -s, 0, s, c, 0, 0, 0, -1))
    v = np.array([[1.0, 2.0, 3.0]])
    mm = voxels_to_mm(v, geom)
    assert np.allclose(np.linalg.norm(mm), 2.0 * np.linalg.norm(v))
    assert np.allclose(mm_to_voxels(mm, geom), v)
    # the same as moving a point through the grid's index -> LPS map
    assert np.allclose(geom.index_to_lps(v) - geom.index_to_lps(np.zeros((1, 3))), mm)


def test_cuda_requested_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(IkrError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_missing_weights_are_named(phantom_case, tmp_path):
    config = RegistrationConfig(kernel="learned", weights=str(tmp_path / "none.pt"))
    with pytest.raises(IkrError, match="none.pt"):
        register(phantom_case.fixed, phantom_case.moving, config)


def test_images_that_do_not_overlap_are_refused_without_alignment(phantom_case):
    from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image

    g = phantom_case.moving.geometry
    far = Geometry(g.size, g.spacing_mm, tuple(o + 5000.0 for o in g.origin_lps), g.direction)
    moving = Image(phantom_case.moving.array, far, {"path": "far.nii.gz"})
    with pytest.raises(IkrError, match="overlap"):
        register(phantom_case.fixed, moving, RegistrationConfig(kernel="gaussian", spacing_mm=3.0, alignment="none"))
