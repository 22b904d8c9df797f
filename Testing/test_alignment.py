"""The automatic rigid/affine start: known transforms recovered, user starts honoured, outputs include it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from ImplicitKernelRegistrationLib.cli import main
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import transform_points
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.images import read_image, write_image
from ImplicitKernelRegistrationLib.io.transforms import read_field
from ImplicitKernelRegistrationLib.registration.alignment import Alignment, align, read_initial_transform
from ImplicitKernelRegistrationLib.registration.preprocess import body_mask


def _centre(image: Image) -> np.ndarray:
    """The LPS centre of an image's grid."""
    return image.geometry.centre_lps()


def _moved(image: Image, truth: sitk.Transform, cut_z: float = 1.0) -> Image:
    """The image seen through `truth` (fixed -> moving): moving(y) = image(truth^-1(y)), optionally cut in z."""
    src = image.to_sitk()
    reference = src
    if cut_z < 1.0:
        nz = src.GetSize()[2]
        keep = int(nz * cut_z)
        reference = src[:, :, (nz - keep) // 2 : (nz - keep) // 2 + keep]
    out = sitk.Resample(src, reference, truth.GetInverse(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    return Image.from_sitk(out)


def _body_points(image: Image, every: int = 211) -> np.ndarray:
    """A regular subset of the body's voxel centres, LPS mm."""
    idx = np.argwhere(body_mask(image))[::every][:, ::-1].astype(float)
    return image.geometry.index_to_lps(idx)


def _errors(found: Alignment, truth: Alignment, fixed: Image, moving: Image) -> np.ndarray:
    """Distances (mm) between found and true images of the fixed body points that land in the moving image."""
    points = _body_points(fixed)
    inside = moving.geometry.contains_lps(truth.apply(points), margin_voxels=-2)
    return np.linalg.norm(found.apply(points[inside]) - truth.apply(points[inside]), axis=1)


def _rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (degrees) of the rotation between two rotation matrices."""
    r = a @ b.T
    return math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1, 1))))


@pytest.fixture(scope="module")
def abdomen(request) -> Image:
    """The shared abdomen CT (3 mm)."""
    from conftest import shared_path

    return read_image(shared_path("ct", "abdomen_ts_example_ct_3mm.nii.gz"))


def _rigid(centre: np.ndarray, angles_deg: tuple, shift_mm: tuple) -> sitk.Euler3DTransform:
    """A rigid map about `centre`."""
    t = sitk.Euler3DTransform()
    t.SetCenter(centre.tolist())
    t.SetRotation(*[math.radians(a) for a in angles_deg])
    t.SetTranslation(list(shift_mm))
    return t


def test_a_known_rigid_transform_is_recovered(abdomen):
    truth_sitk = _rigid(_centre(abdomen), (5.0, -4.0, 18.0), (20.0, -25.0, 40.0))
    moving = _moved(abdomen, truth_sitk)
    found = align(abdomen, moving, mode="rigid")
    truth = Alignment.from_sitk(truth_sitk)
    errors = _errors(found.alignment, truth, abdomen, moving)
    assert errors.mean() < 0.5, errors.mean()
    assert _rotation_deg(found.alignment.matrix, truth.matrix) < 0.5
    assert found.report["rotation_deg"] == pytest.approx(truth.summary(_centre(abdomen))["rotation_deg"], abs=0.5)


def test_a_known_affine_transform_is_recovered(abdomen):
    affine = sitk.AffineTransform(3)
    affine.SetCenter(_centre(abdomen).tolist())
    rotation = np.asarray(_rigid(_centre(abdomen), (0.0, 3.0, -12.0), (0, 0, 0)).GetMatrix()).reshape(3, 3)
    affine.SetMatrix((rotation @ np.diag([1.06, 0.96, 1.03])).reshape(-1).tolist())
    affine.SetTranslation([-15.0, 10.0, 30.0])
    moving = _moved(abdomen, affine)
    found = align(abdomen, moving, mode="affine")
    errors = _errors(found.alignment, Alignment.from_sitk(affine), abdomen, moving)
    assert errors.mean() < 0.5, errors.mean()


def test_a_cut_field_of_view_is_aligned(abdomen):
    truth_sitk = _rigid(_centre(abdomen), (0.0, 0.0, -15.0), (10.0, 20.0, -45.0))
    moving = _moved(abdomen, truth_sitk, cut_z=0.6)
    found = align(abdomen, moving, mode="rigid")
    errors = _errors(found.alignment, Alignment.from_sitk(truth_sitk), abdomen, moving)
    assert errors.mean() < 0.5, errors.mean()


def test_alignment_round_trips_through_sitk_and_json():
    a = Alignment(np.array([[1.02, 0.1, 0.0], [-0.1, 0.99, 0.05], [0.0, -0.05, 1.0]]), np.array([3.0, -4.0, 5.0]))
    b = Alignment.from_sitk(a.to_sitk())
    assert np.allclose(a.matrix, b.matrix) and np.allclose(a.translation, b.translation)
    c = Alignment.from_dict(json.loads(json.dumps(a.to_dict())))
    points = np.random.default_rng(1).normal(size=(10, 3)) * 100
    assert np.allclose(c.apply(points), a.apply(points))
    assert np.allclose(a.inverse_apply(a.apply(points)), points)
    composite = sitk.CompositeTransform([a.to_sitk(), Alignment(np.eye(3), np.ones(3)).to_sitk()])
    assert np.allclose(Alignment.from_sitk(composite).apply(points), a.apply(points + 1.0))


def test_a_non_linear_start_transform_is_refused(tmp_path):
    field = sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3)
    arr = np.random.default_rng(0).normal(size=(8, 8, 8, 3)) * 3
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.SetSpacing((20.0, 20.0, 20.0))
    field.SetOrigin((-70.0, -70.0, -70.0))
    path = tmp_path / "warp.h5"
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(path))
    with pytest.raises(IkrError, match="warp.h5.*not linear"):
        read_initial_transform(str(path))


@pytest.mark.parametrize("suffix", [".tfm", ".h5", ".txt"])
def test_initial_transform_files_are_read(tmp_path, suffix):
    truth = _rigid(np.array([1.0, 2.0, 3.0]), (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    path = tmp_path / f"start{suffix}"
    sitk.WriteTransform(truth, str(path))
    read = read_initial_transform(str(path))
    points = np.random.default_rng(2).normal(size=(5, 3)) * 50
    expected = np.array([truth.TransformPoint(p.tolist()) for p in points])
    assert np.allclose(read.apply(points), expected, atol=1e-6)


def test_an_unreadable_start_transform_is_named(tmp_path):
    path = tmp_path / "broken.tfm"
    path.write_text("not a transform\n")
    with pytest.raises(IkrError, match="broken.tfm"):
        read_initial_transform(str(path))


@pytest.fixture(scope="module")
def repositioned(tmp_path_factory, abdomen):
    """The abdomen CT and a copy repositioned by 12 degrees and 30 mm, written as files with the truth."""
    truth = _rigid(_centre(abdomen), (0.0, 4.0, 12.0), (10.0, -20.0, 20.0))
    folder = tmp_path_factory.mktemp("repositioned")
    write_image(abdomen, folder / "fixed.nii.gz")
    write_image(_moved(abdomen, truth), folder / "moving.nii.gz")
    sitk.WriteTransform(truth, str(folder / "truth.tfm"))
    return folder, abdomen, Alignment.from_sitk(truth)


def test_the_written_transform_includes_the_alignment(repositioned):
    folder, ct, truth = repositioned
    out = folder / "out"
    args = ["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), "-o", str(out)]
    assert main([*args, "--spacing", "3", "--quiet"]) == 0
    points = _body_points(ct, every=997)
    field = read_field(out / "displacement.nii.gz")
    ours = transform_points(field, points)
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    theirs = np.array([transform.TransformPoint(p.tolist()) for p in points])
    assert np.abs(ours - theirs).max() < 0.05
    seen = ct.geometry.contains_lps(truth.apply(points), margin_voxels=-4)  # the moving image has data there
    assert np.linalg.norm(ours - truth.apply(points), axis=1)[seen].mean() < 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["alignment"]["mode"] == "rigid"
    assert report["quality"]["verdict"] == "ok", report["quality"]
    assert report["alignment"]["rotation_deg"] == pytest.approx(truth.summary(_centre(ct))["rotation_deg"], abs=1.0)
    session = json.loads((out / "session.json").read_text())
    assert np.allclose(Alignment.from_dict(session["alignment"]).matrix, report["alignment"]["matrix"])


def test_a_user_start_is_honoured(repositioned):
    folder, ct, truth = repositioned
    out = folder / "out_initial"
    args = ["register", str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), "-o", str(out)]
    start = ["--initial", str(folder / "truth.tfm"), "--align", "none"]
    assert main([*args, *start, "--spacing", "3", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert np.allclose(report["alignment"]["matrix"], truth.matrix)
    assert np.allclose(report["alignment"]["translation_mm"], truth.translation)
    field = read_field(out / "displacement.nii.gz")
    points = _body_points(ct, every=997)
    points = points[ct.geometry.contains_lps(truth.apply(points), margin_voxels=-4)]
    assert np.linalg.norm(transform_points(field, points) - truth.apply(points), axis=1).mean() < 1.0


def test_a_click_stays_exact_after_an_alignment(repositioned):
    from ImplicitKernelRegistrationLib.core.fields import sample_field
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
    from ImplicitKernelRegistrationLib.registration.refine import session_from_result

    folder, ct, truth = repositioned
    moving = read_image(folder / "moving.nii.gz")
    result = register(ct, moving, RegistrationConfig(spacing_mm=3.0))
    session = session_from_result(result, ct)
    p = _body_points(ct, every=5003)[3]
    q = truth.apply(p) + np.array([2.0, -1.5, 1.0])
    session.add_correspondences(p[None], q[None])
    assert np.linalg.norm(p + sample_field(session.field, p[None])[0] - q) < 0.05
    session.undo()
    assert np.allclose(session.field.displacement_mm, result.field.displacement_mm, atol=1e-4)


def test_images_far_apart_are_aligned_by_default(phantom_case):
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig, register
    from ImplicitKernelRegistrationLib.review.report import landmark_errors

    g = phantom_case.moving.geometry
    far = Geometry(g.size, g.spacing_mm, tuple(o + 500.0 for o in g.origin_lps), g.direction)
    moving = Image(phantom_case.moving.array, far, {"path": "far.nii.gz"})
    result = register(phantom_case.fixed, moving, RegistrationConfig(kernel="gaussian", spacing_mm=3.0))
    shifted = phantom_case.landmarks_moving_lps + 500.0
    tre = landmark_errors(result.field, phantom_case.landmarks_fixed_lps, shifted)["tre_mm"]["mean"]
    assert tre < 1.5
