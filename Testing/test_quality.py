"""The quality verdict: ok for a good registration, failed for different anatomy, --strict exits 3."""

from __future__ import annotations

import json

import numpy as np

from ImplicitKernelRegistrationLib.cli import EXIT_QUALITY, main
from ImplicitKernelRegistrationLib.core.correspondences import Correspondences
from ImplicitKernelRegistrationLib.review.quality import QUALITY_THRESHOLDS, coherent_fraction, verdict


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
