"""The quality verdict: ok for a good registration, failed for different anatomy, --strict exits 3."""

from __future__ import annotations

import json

import numpy as np

from ImplicitKernelRegistrationLib.cli import EXIT_QUALITY, main
from ImplicitKernelRegistrationLib.core.correspondences import Correspondences
from ImplicitKernelRegistrationLib.core.fields import Field
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.registration.preprocess import block_average, block_factors
from ImplicitKernelRegistrationLib.review.quality import (
    QUALITY_THRESHOLDS,
    _block_average_field,
    coherent_fraction,
    verdict,
)


def test_verdict_follows_the_thresholds():
    good = {name: 1.0 for name in QUALITY_THRESHOLDS}
    assert verdict(good) == {"verdict": "ok", "reasons": []}
    for name, (doubtful_below, failed_below) in QUALITY_THRESHOLDS.items():
        middle = verdict({**good, name: (doubtful_below + failed_below) / 2})
        assert middle["verdict"] == "doubtful" and name in middle["reasons"][0]
        low = verdict({**good, name: failed_below - 0.01})
        assert low["verdict"] == "failed" and name in low["reasons"][0]
    first, second = list(QUALITY_THRESHOLDS)[:2]
    two = {name: (d + f) / 2 for name, (d, f) in QUALITY_THRESHOLDS.items() if name in (first, second)}
    assert verdict({**good, **two})["verdict"] == "failed"  # two doubtful signs at once


def test_block_averaged_field_is_the_mean_of_each_block_on_block_averages_grid():
    geometry = Geometry((23, 17, 11), (1.5, 1.0, 2.5), (4.0, -3.0, 9.0))  # sizes the blocks do not divide
    d = np.random.default_rng(1).normal(scale=5.0, size=(*geometry.shape_zyx, 3)).astype(np.float32)
    factors = block_factors(geometry, 4.0)
    grid = block_average(Image(d[..., 0], geometry), 4.0).geometry  # the grid the verdict compares on
    fx, fy, fz = factors
    nx, ny, nz = grid.size
    blocks = d[: nz * fz, : ny * fy, : nx * fx].reshape(nz, fz, ny, fy, nx, fx, 3)
    expected = blocks.mean(axis=(1, 3, 5), dtype=np.float64)
    got = _block_average_field(Field(d, geometry), factors)
    assert got.geometry == grid and got.displacement_mm.dtype == np.float32
    np.testing.assert_allclose(got.displacement_mm, expected, atol=1e-5)


def test_keys_that_move_unlike_their_neighbours_are_counted():
    rng = np.random.default_rng(0)
    fixed = rng.uniform(-100, 100, size=(400, 3))
    smooth = np.stack([np.sin(fixed[:, 0] / 40), np.cos(fixed[:, 1] / 50), fixed[:, 2] / 100], axis=1) * 5
    assert coherent_fraction(Correspondences(fixed, smooth, np.ones(400))) > 0.99
    wild = smooth.copy()
    wild[:100] += rng.normal(scale=30.0, size=(100, 3))
    assert 0.7 < coherent_fraction(Correspondences(fixed, wild, np.ones(400))) < 0.8


def test_abdomen_against_thorax_fails_and_strict_exits_3(shared, tmp_path, capsys):
    thorax = shared("ct", "thorax_popi_T00_1p5mm.nii.gz")
    abdomen = shared("ct", "abdomen_ts_example_ct_3mm.nii.gz")
    out = tmp_path / "out"
    code = main(["register", str(thorax), str(abdomen), "-o", str(out), "--spacing", "4", "--quiet", "--strict"])
    assert code == EXIT_QUALITY
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["verdict"] == "failed"
    assert report["quality"]["reasons"]
    err = capsys.readouterr().err
    assert "registration failed" in err
