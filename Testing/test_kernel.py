"""The sparse -> dense kernels: exactness, interpolation quality, dense evaluation, weights files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Geometry
from ImplicitKernelRegistrationLib.registration.dense import DenseModel
from ImplicitKernelRegistrationLib.registration.kernel import (
    GaussianKernel,
    KernelConfig,
    LearnedKernel,
    TPSKernel,
    count_parameters,
    load_weights,
    make_kernel,
    save_weights,
)


def _keys(n: int = 400, box: float = 40.0, seed: int = 0, feat_dim: int = 12) -> tuple[torch.Tensor, ...]:
    """Random key positions (1,N,3) in a box, features (1,N,C) and confidences (1,N)."""
    gen = torch.Generator().manual_seed(seed)
    xyz = torch.rand(1, n, 3, generator=gen) * box
    feat = torch.rand(1, n, feat_dim, generator=gen)
    conf = 0.2 + 0.8 * torch.rand(1, n, generator=gen)
    return xyz, feat, conf


def _smooth_field(xyz: torch.Tensor) -> torch.Tensor:
    """A smooth displacement (voxels) of amplitude ~2 and wavelength ~50 voxels."""
    x, y, z = xyz.unbind(-1)
    return torch.stack([2.0 * torch.sin(x / 8.0), 1.5 * torch.cos(y / 9.0) + 0.5, 1.0 * torch.sin((x + z) / 10.0)], -1)


def _randomised(kernel: LearnedKernel, seed: int = 1) -> LearnedKernel:
    """The kernel with every parameter redrawn (stands in for arbitrary trained weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in kernel.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return kernel


ALL_KERNELS = [
    ("learned", lambda: LearnedKernel()),
    ("learned-random", lambda: _randomised(LearnedKernel())),
    ("spatial", lambda: _randomised(LearnedKernel(KernelConfig(heads="spatial")))),
    ("semantic", lambda: _randomised(LearnedKernel(KernelConfig(heads="semantic")))),
    ("gaussian", lambda: GaussianKernel(sigma=3.0)),
    ("tps", lambda: TPSKernel()),
    ("learned-local-linear", lambda: _randomised(LearnedKernel(KernelConfig(local_linear=True)))),
]


@pytest.mark.parametrize(("name", "factory"), ALL_KERNELS, ids=[n for n, _ in ALL_KERNELS])
def test_every_kernel_reproduces_a_constant_field_exactly(name: str, factory: object) -> None:
    """Weights sum to one (or the spline has a constant part): a constant field comes back unchanged."""
    kernel = factory().eval()
    xyz, feat, conf = _keys(300)
    disp = torch.tensor([1.25, -3.5, 0.75]).expand(1, 300, 3)
    q, qf, _ = _keys(500, seed=7)
    with torch.no_grad():
        out = kernel(q, qf, xyz, disp, feat, conf)
    assert out.shape == (1, 500, 3)
    assert torch.allclose(out, disp[:, :1].expand_as(out), atol=1e-4)


def test_local_linear_read_out_follows_a_linear_trend_that_the_mean_flattens() -> None:
    """An affine field is reproduced by the local-linear fit (up to its ridge), and biased by the weighted mean."""
    xyz, feat, conf = _keys(400)
    matrix = torch.tensor([[0.10, 0.02, 0.0], [0.0, -0.05, 0.03], [0.01, 0.0, 0.08]])
    disp = xyz @ matrix.T + torch.tensor([1.0, 2.0, 3.0])
    q = torch.rand(1, 200, 3, generator=torch.Generator().manual_seed(5)) * 44.0 - 2.0  # reaches past the keys
    qf = torch.rand(1, 200, 12)
    truth = q @ matrix.T + torch.tensor([1.0, 2.0, 3.0])
    errors = {}
    for local_linear in (False, True):
        kernel = LearnedKernel(KernelConfig(local_linear=local_linear)).eval()
        if local_linear:
            kernel.log_ridge.data.fill_(-7.0)  # a negligible ridge: the plain weighted least-squares fit
        with torch.no_grad():
            errors[local_linear] = (kernel(q, qf, xyz, disp, feat, conf) - truth).norm(dim=-1).mean().item()
    assert errors[True] < 0.05 * errors[False], errors


def test_untrained_learned_kernel_is_inverse_distance_weighting_times_confidence() -> None:
    """Zero-initialised heads: weights are exactly proportional to 1/(1+r^2/s^2) * conf over the K nearest."""
    config = KernelConfig(k=8, bias_scale=2.0)
    kernel = LearnedKernel(config).eval()
    xyz, feat, conf = _keys(50)
    disp = torch.randn(1, 50, 3, generator=torch.Generator().manual_seed(3))
    q, qf, _ = _keys(20, seed=9)
    with torch.no_grad():
        out = kernel(q, qf, xyz, disp, feat, conf)[0]
    dist = torch.cdist(q[0], xyz[0])
    near = dist.topk(8, largest=False).indices
    for i in range(20):
        j = near[i]
        w = (conf[0, j] + config.conf_eps) / (1.0 + dist[i, j] ** 2 / 4.0)
        expected = (w[:, None] * disp[0, j]).sum(0) / w.sum()
        assert torch.allclose(out[i], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel", "tolerance"),
    [(LearnedKernel(), 0.25), (GaussianKernel(sigma=3.0), 0.25), (TPSKernel(smoothing=0.0), 0.05)],
    ids=["learned-untrained", "gaussian", "tps"],
)
def test_kernels_interpolate_a_smooth_field_with_small_error(kernel: torch.nn.Module, tolerance: float) -> None:
    """From 600 exact keys in a 40-voxel box, the mean error inside is a small fraction of the ~2 voxel field."""
    xyz, feat, _ = _keys(600)
    disp = _smooth_field(xyz)
    q = 5.0 + torch.rand(1, 2000, 3, generator=torch.Generator().manual_seed(5)) * 30.0
    qf = torch.rand(1, 2000, 12)
    with torch.no_grad():
        out = kernel.eval()(q, qf, xyz, disp, feat, None)
    err = (out - _smooth_field(q)).norm(dim=-1).mean().item()
    assert err < tolerance, err
    assert _smooth_field(q).norm(dim=-1).mean().item() > 1.5  # the field is not trivially small


def test_tps_reproduces_an_affine_field_exactly_even_with_smoothing() -> None:
    """An affine field lies in the spline's null space: it is recovered exactly, with or without smoothing."""
    xyz, _, conf = _keys(200)
    a = torch.tensor([[0.02, -0.01, 0.03], [0.00, 0.05, -0.02], [0.01, 0.01, -0.04]])
    t = torch.tensor([1.0, -2.0, 0.5])
    disp = xyz @ a.T + t
    q = torch.rand(1, 300, 3, generator=torch.Generator().manual_seed(2)) * 60.0 - 10.0  # also outside
    for smoothing in (0.0, 1.0):
        out = TPSKernel(smoothing=smoothing)(q, None, xyz, disp, None, conf)
        assert torch.allclose(out, q @ a.T + t, atol=1e-4)


def test_gaussian_kernel_matches_nadaraya_watson_by_hand() -> None:
    """Weights conf * exp(-r^2 / 2 sigma^2) over the K nearest, normalised."""
    xyz, _, conf = _keys(40)
    disp = torch.randn(1, 40, 3, generator=torch.Generator().manual_seed(4))
    q = torch.rand(1, 10, 3, generator=torch.Generator().manual_seed(6)) * 40.0
    out = GaussianKernel(sigma=4.0, k=10)(q, None, xyz, disp, None, conf)[0]
    dist = torch.cdist(q[0], xyz[0])
    near = dist.topk(10, largest=False).indices
    for i in range(10):
        j = near[i]
        w = (conf[0, j] + 1e-3) * torch.exp(-(dist[i, j] ** 2) / 32.0)
        assert torch.allclose(out[i], (w[:, None] * disp[0, j]).sum(0) / w.sum(), atol=1e-5)


def test_low_confidence_outlier_is_damped() -> None:
    """A wrong key with low confidence moves the field far less than the same key fully trusted."""
    xyz, feat, _ = _keys(300)
    disp = torch.zeros(1, 300, 3)
    disp[0, 0] = torch.tensor([20.0, 0.0, 0.0])
    q = xyz[:, :1] + 0.5
    kernel = LearnedKernel().eval()
    with torch.no_grad():
        trusted = kernel(q, feat[:, :1], xyz, disp, feat, torch.ones(1, 300))
        conf = torch.ones(1, 300)
        conf[0, 0] = 0.01
        damped = kernel(q, feat[:, :1], xyz, disp, feat, conf)
    assert damped.norm() < 0.1 * trusted.norm()


def test_default_learned_kernel_has_about_150k_parameters() -> None:
    """The default configuration is in the paper's size class (about 150K); variants are smaller."""
    n = count_parameters(LearnedKernel())
    assert 130_000 <= n <= 170_000, n
    assert count_parameters(LearnedKernel(KernelConfig(heads="spatial"))) < n
    assert count_parameters(LearnedKernel(KernelConfig(heads="semantic"))) < n


def test_semantic_kernels_need_features_and_spatial_does_not() -> None:
    """heads=spatial runs without features; heads=both refuses clearly when features are missing."""
    xyz, _, _ = _keys(100)
    disp = _smooth_field(xyz)
    q = torch.rand(1, 50, 3) * 40
    out = LearnedKernel(KernelConfig(heads="spatial"))(q, None, xyz, disp, None, None)
    assert out.shape == (1, 50, 3) and torch.isfinite(out).all()
    with pytest.raises(IkrError, match="features"):
        LearnedKernel()(q, None, xyz, disp, None, None)
    with pytest.raises(IkrError, match="heads"):
        KernelConfig(heads="neither")


def test_gradients_reach_the_attention_heads() -> None:
    """In training mode the loss back-propagates into the (zero-initialised) head mixers."""
    kernel = LearnedKernel().train()
    xyz, feat, conf = _keys(200)
    q, qf, _ = _keys(100, seed=3)
    loss = (kernel(q, qf, xyz, _smooth_field(xyz), feat, conf) - _smooth_field(q)).norm(dim=-1).mean()
    loss.backward()
    assert kernel.spatial_out.weight.grad.abs().sum() > 0
    assert kernel.semantic_out.weight.grad.abs().sum() > 0
    assert kernel.bias_gain.grad is not None and kernel.conf_gain.grad is not None


# ----------------------------------------------------------------------------------------- dense


@pytest.fixture(scope="module")
def liver_features() -> tuple[torch.Tensor, torch.Tensor]:
    """MIND-SSC of a crop of the real liver slab CT and Förstner keypoints in it."""
    from ImplicitKernelRegistrationLib.registration.features import mind_ssc
    from ImplicitKernelRegistrationLib.registration.keypoints import forstner_keypoints
    from ImplicitKernelRegistrationLib.registration.preprocess import normalise_ct

    path = shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[:21, 30:63, 40:81]  # (21, 33, 41)
    image = torch.from_numpy(normalise_ct(arr))[None, None]
    keys = forstner_keypoints(image, None, max_points=300)
    return mind_ssc(image), keys


def _dense(kernel, feats, shape, keys, disp, conf, step: int, chunk: int = 16384):
    """The DenseModel field (1, 3, D, H, W) in voxels on a unit-spacing working grid of `shape` (z, y, x)."""
    geometry = Geometry((shape[2], shape[1], shape[0]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    model = DenseModel(kernel, feats, geometry, control_step_vox=step, chunk=chunk)
    model.set_keys(keys, disp, torch.ones(len(keys)) if conf is None else conf)
    field = model.field_on(geometry).displacement_mm
    return model, torch.from_numpy(field).permute(3, 0, 1, 2)[None]


def test_dense_model_equals_direct_evaluation_at_control_points(liver_features: tuple) -> None:
    """With (n-1) divisible by the step, control points are voxels: the dense field equals the kernel there."""
    feats, keys = liver_features
    shape = tuple(feats.shape[2:])  # (21, 33, 41): every (n - 1) is even
    kernel = _randomised(LearnedKernel()).eval()
    disp = _smooth_field(keys)
    conf = torch.linspace(0.3, 1.0, len(keys))
    model, dense = _dense(kernel, feats, shape, keys, disp, conf, step=2)
    assert dense.shape == (1, 3, *shape)
    assert model.control_shape == (11, 17, 21)
    from ImplicitKernelRegistrationLib.registration.features import sample_features

    pts = model.points
    with torch.no_grad():
        direct = kernel(
            pts[None],
            sample_features(feats, pts)[None],
            keys[None],
            disp[None],
            sample_features(feats, keys)[None],
            conf[None],
        )[0]
    at_ctrl = dense[0, :, ::2, ::2, ::2].permute(1, 2, 3, 0).reshape(-1, 3)
    assert torch.allclose(at_ctrl, direct, atol=1e-5)
    # between control points the field is the trilinear blend of its neighbours
    mid = dense[0, :, 0, 0, 1]
    assert torch.allclose(mid, 0.5 * (dense[0, :, 0, 0, 0] + dense[0, :, 0, 0, 2]), atol=1e-5)


def test_dense_model_is_chunk_size_independent_and_covers_odd_sizes(liver_features: tuple) -> None:
    """Chunking only bounds memory; an odd step leaves the last voxel on the control grid."""
    feats, keys = liver_features
    shape = (20, 33, 40)
    feats = feats[..., :20, :, :40]
    keys = keys[(keys[:, 0] < 40) & (keys[:, 2] < 20)]
    kernel = _randomised(LearnedKernel()).eval()
    disp = _smooth_field(keys)
    _, big = _dense(kernel, feats, shape, keys, disp, None, step=3, chunk=32768)
    _, small = _dense(kernel, feats, shape, keys, disp, None, step=3, chunk=97)
    assert torch.allclose(big, small, atol=1e-5)
    corner = torch.tensor([[39.0, 32.0, 19.0]])
    with torch.no_grad():
        from ImplicitKernelRegistrationLib.registration.features import sample_features

        direct = kernel(
            corner[None],
            sample_features(feats, corner)[None],
            keys[None],
            disp[None],
            sample_features(feats, keys)[None],
            None,
        )[0, 0]
    assert torch.allclose(big[0, :, 19, 32, 39], direct, atol=1e-5)


def test_separable_resampling_equals_grid_sample_on_an_offset_grid(liver_features: tuple) -> None:
    """The fast axis-aligned path of field_on agrees with trilinear grid_sample, on a sub-box too."""
    feats, keys = liver_features
    shape = tuple(feats.shape[2:])
    working = Geometry((shape[2], shape[1], shape[0]), (2.0, 2.0, 2.0), (-5.0, 3.0, 10.0))
    model = DenseModel(_randomised(LearnedKernel()).eval(), feats, working, control_step_vox=3)
    model.set_keys(keys, _smooth_field(keys), torch.ones(len(keys)))
    # a finer target grid, shifted by a fraction of a voxel and reaching past the working grid's edge
    target = Geometry((90, 70, 45), (0.9, 1.1, 1.3), (-6.3, 2.2, 9.1))
    to_working = np.linalg.inv(working.index_to_lps_matrix()) @ target.index_to_lps_matrix()
    to_mm = working.voxel_to_mm_matrix()
    box = ((3, 40), (0, 70), (10, 77))
    fast = model.field_on(target, box)
    slow = model.field_on(target)  # reference filled below by the general path
    slow.displacement_mm[:] = 0.0
    model._sampled_into(slow, box, to_working, to_mm)
    assert np.abs(fast.displacement_mm).max() > 0.1
    np.testing.assert_allclose(fast.displacement_mm, slow.displacement_mm, atol=1e-4)
    assert not fast.displacement_mm[:3].any() and not fast.displacement_mm[:, :, :10].any()


def test_dense_model_with_the_tps_and_gaussian_peers() -> None:
    """The peers run through the same dense path without features; a constant stays constant."""
    keys = torch.rand(80, 3) * torch.tensor([15.0, 12.0, 9.0])
    disp = torch.tensor([0.5, 1.0, -2.0]).expand(80, 3).contiguous()
    for kernel in (TPSKernel(), GaussianKernel()):
        _, dense = _dense(kernel, None, (10, 13, 16), keys, disp, None, step=2)
        assert torch.allclose(dense, disp[0].view(1, 3, 1, 1, 1).expand_as(dense), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_follows_the_input_device_to_cuda() -> None:
    """On CUDA inputs the kernel runs on CUDA and agrees with the CPU result."""
    kernel = _randomised(LearnedKernel()).eval()
    xyz, feat, conf = _keys(300)
    q, qf, _ = _keys(200, seed=4)
    disp = _smooth_field(xyz)
    with torch.no_grad():
        cpu = kernel(q, qf, xyz, disp, feat, conf)
        gpu = kernel.cuda()(q.cuda(), qf.cuda(), xyz.cuda(), disp.cuda(), feat.cuda(), conf.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)


# --------------------------------------------------------------------------------------- weights


def test_weights_round_trip_is_exact(tmp_path: object) -> None:
    """Saved and loaded kernels give bit-identical outputs; config and metadata come back."""
    config = KernelConfig(heads="both", k=20)
    kernel = _randomised(LearnedKernel(config)).eval()
    path = save_weights(kernel, config, tmp_path / "k.pt", {"seed": 3, "note": "test"})
    loaded, meta = load_weights(path)
    assert meta == {"seed": 3, "note": "test"}
    assert loaded.config == config and not loaded.training
    xyz, feat, conf = _keys(200)
    q, qf, _ = _keys(100, seed=5)
    with torch.no_grad():
        assert torch.equal(
            kernel(q, qf, xyz, _smooth_field(xyz), feat, conf), loaded(q, qf, xyz, _smooth_field(xyz), feat, conf)
        )
    assert [p.name for p in tmp_path.iterdir()] == ["k.pt"]  # no temporary left behind


def test_make_kernel_builds_each_kind_and_checks_the_weights_heads(tmp_path: object) -> None:
    """--kernel learned|tps|gaussian; weights trained for other heads are refused by name."""
    assert isinstance(make_kernel("tps"), TPSKernel)
    assert isinstance(make_kernel("gaussian", KernelConfig(gaussian_sigma=2.0)), GaussianKernel)
    assert isinstance(make_kernel("learned"), LearnedKernel)
    config = KernelConfig(heads="spatial")
    path = save_weights(LearnedKernel(config), config, tmp_path / "s.pt", {})
    assert make_kernel("learned", KernelConfig(heads="spatial"), path).config.heads == "spatial"
    with pytest.raises(IkrError, match="s.pt.*heads"):
        make_kernel("learned", KernelConfig(heads="both"), path)
    with pytest.raises(IkrError, match="unknown kernel"):
        make_kernel("bspline")


def test_corrupt_foreign_and_mismatched_weights_are_refused(tmp_path: object) -> None:
    """Truncated/garbage files, another format, and state dicts that do not fit the config: IkrError."""
    config = KernelConfig()
    good = save_weights(LearnedKernel(config), config, tmp_path / "good.pt", {})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    for path in (truncated, garbage):
        with pytest.raises(IkrError, match=f"{path.name}.*corrupt"):
            load_weights(path)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "state_dict": {}}, other)
    with pytest.raises(IkrError, match="other.pt.*format"):
        load_weights(other)
    mismatched = tmp_path / "mismatched.pt"
    spatial = LearnedKernel(KernelConfig(heads="spatial"))
    save_weights(spatial, KernelConfig(heads="both"), mismatched, {})
    with pytest.raises(IkrError, match="mismatched.pt.*architecture mismatch.*missing"):
        load_weights(mismatched)
    wider = tmp_path / "wider.pt"
    save_weights(LearnedKernel(KernelConfig(hidden=64)), config, wider, {})
    with pytest.raises(IkrError, match="wider.pt.*shape"):
        load_weights(wider)
    with pytest.raises(IkrError, match="not found"):
        load_weights(tmp_path / "absent.pt")


def test_region_aware_neighbourhoods_keep_each_region_to_its_own_keys() -> None:
    """Two regions whose keys move differently: every voxel of a region gets its region's motion exactly (the
    weights sum to one) but for a narrow blend across the boundary, where one region for all would blend the two
    over the kernel's whole reach."""
    from ImplicitKernelRegistrationLib.registration.dense import REGION_BLEND_RADIUS_VOX, split_by_region
    from ImplicitKernelRegistrationLib.registration.kernel import GaussianKernel
    from ImplicitKernelRegistrationLib.registration.pipeline import kernel_at_points

    shape = (12, 20, 24)  # z, y, x
    geometry = Geometry((shape[2], shape[1], shape[0]), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    regions = torch.zeros(shape, dtype=torch.long)
    regions[:, :, 11:] = 1  # a plane boundary between x = 10 and x = 11
    gen = torch.Generator().manual_seed(0)
    keys = torch.rand(300, 3, generator=gen) * torch.tensor([23.0, 19.0, 11.0])
    inside = torch.round(keys[:, 0]) >= 11
    disp = torch.where(inside[:, None], torch.tensor([0.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, -1.0]))
    kernel = GaussianKernel(sigma=4.0)
    model = DenseModel(kernel, None, geometry, control_step_vox=4, regions=regions)
    model.set_keys(keys, disp, torch.ones(len(keys)))
    assert model.points.shape[0] > math.prod(model.control_shape)  # ghosts on both sides of the boundary
    field = model.field_on(geometry).displacement_mm[..., 2]  # mm = 2 * voxels along z
    r = REGION_BLEND_RADIUS_VOX
    np.testing.assert_allclose(field[:, :, 11 + r :], 4.0, atol=1e-4)
    np.testing.assert_allclose(field[:, :, : 11 - r], -2.0, atol=1e-4)
    across = field[0, 0, 11 - r : 11 + r]
    assert np.all(np.diff(across) > 0) and -2.0 < across.min() and across.max() < 4.0  # a monotone blend
    # a finer, shifted target reaching past the working grid: each voxel its regions' blend, the edge beyond it
    target = Geometry((40, 30, 20), (1.3, 1.3, 1.2), (0.7, 0.4, 0.2))
    fine = model.field_on(target).displacement_mm[..., 2]
    weights = model.target_weights(target)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(fine, 4.0 * weights[1] - 2.0 * weights[0], atol=1e-4)
    # without regions the two motions blend near the boundary
    plain = DenseModel(kernel, None, geometry, control_step_vox=4)
    plain.set_keys(keys, disp, torch.ones(len(keys)))
    assert np.abs(plain.field_on(geometry).displacement_mm[:, :, 11, 2] - 4.0).max() > 1.0
    # the pipeline's prior at the keys follows the same rule
    region = model.region_at(keys)
    prior = kernel_at_points(kernel, keys, keys, disp, torch.ones(len(keys)), None, region, region, 2)
    torch.testing.assert_close(prior, disp)
    # a region without keys takes every key
    groups = split_by_region(torch.tensor([0, 1, 1]), torch.tensor([1, 1]), 2)
    assert [(q.tolist(), k.tolist()) for q, k in groups] == [([0], [0, 1]), ([1, 2], [0, 1])]
