"""`ikr batch` (issue 20): a cohort on a real dask LocalCluster, resumable, one bad case failing alone, a summary.

The cases are small real registrations: breathing-like `synth` deformations of a coarse procedural
phantom (5 mm voxels), registered on a 5 mm working grid, one with a tumour and an ablation zone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ImplicitKernelRegistrationLib.batch.case import CaseOptions, finished_before
from ImplicitKernelRegistrationLib.batch.manifest import read_manifest
from ImplicitKernelRegistrationLib.cli import main
from ImplicitKernelRegistrationLib.io.images import write_image
from ImplicitKernelRegistrationLib.io.outputs import OUTPUT_FILES
from ImplicitKernelRegistrationLib.registration.config import REGISTRATION_FLAGS, RegistrationConfig

FLAGS = ("--spacing", "5", "--quiet")
SETTINGS = {name: getattr(RegistrationConfig(), name) for name in REGISTRATION_FLAGS}  # the defaults


def _run(capsys, *args: object) -> tuple[int, str, str]:
    """Run `ikr ARGS` in this process; return the exit code, stdout and stderr."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two good cases (one with a tumour and an ablation zone) and a manifest row whose moving image is missing."""
    from ImplicitKernelRegistrationLib.synthetic.phantom import make_phantom
    from ImplicitKernelRegistrationLib.synthetic.synth import make_case, write_case
    from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

    root = tmp_path_factory.mktemp("cohort")
    ct, labels, names = make_phantom(seed=0, size=(64, 56, 48), spacing_mm=(5.0, 5.0, 5.0))
    liver = labels.with_array(np.isin(labels.array, [k for k, v in names.items() if "liver" in v]).astype(np.uint8))
    cases = {seed: make_case(ct, "breathing", seed, labels=labels, magnitude_mm=6.0) for seed in (1, 2)}
    for seed, case in cases.items():
        write_case(case, root / "data" / f"case{seed}")
    tumour, zone, _ = demo_tumour_and_zone(cases[1].fixed, cases[1].true_field, liver, seed=1)
    write_image(tumour, root / "data" / "case1" / "tumour.nii.gz")
    write_image(zone, root / "data" / "case1" / "ablation.nii.gz")
    lm = "data/{0}/landmarks_fixed.csv,data/{0}/landmarks_moving.csv"
    (root / "manifest.csv").write_text(
        "case,fixed,moving,fixed_landmarks,moving_landmarks,tumour,ablation\n"
        f"one,data/case1/fixed.nii.gz,data/case1/moving.nii.gz,{lm.format('case1')},"
        "data/case1/tumour.nii.gz,data/case1/ablation.nii.gz\n"
        f"two,data/case2/fixed.nii.gz,data/case2/moving.nii.gz,{lm.format('case2')},,\n"
        "three,data/case2/fixed.nii.gz,data/case2/missing.nii.gz,,,,\n"
    )
    return root


def _summary(out: Path) -> dict[str, dict]:
    """summary.csv's rows by case name."""
    with open(out / "summary.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _report(folder: Path) -> dict:
    """A registration folder's report.json."""
    return json.loads((folder / OUTPUT_FILES["report"]).read_text())


@pytest.mark.bad_input(
    "`ikr batch`: one case of the manifest names a missing image",
    "that case is recorded as failed with its one-line error (summary.csv, batch.json); the others run; exit 1",
)
def test_batch_on_a_local_cluster_registers_resumes_and_forces(capsys, tmp_path, cohort):
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "batch", cohort / "manifest.csv", "-o", out, "--workers", "2", *FLAGS)
    assert code == 1, stdout + err
    rows = _summary(out)
    assert list(rows) == ["one", "two", "three"]
    assert [rows[c]["status"] for c in rows] == ["ok", "ok", "failed"]
    assert "missing.nii.gz" in rows["three"]["error"] and "\n" not in rows["three"]["error"]
    assert "case three failed" in err and "missing.nii.gz" in err
    assert rows["one"]["min_margin_mm"] and rows["one"]["min_margin_p5_mm"] and rows["two"]["min_margin_mm"] == ""
    assert float(rows["one"]["tre_after_mm"]) < float(rows["one"]["tre_before_mm"]) / 2
    assert rows["one"]["quality_verdict"] == "ok" and float(rows["one"]["peak_memory_mb"]) > 0
    page = (out / "summary.html").read_text()
    assert 'href="one/margin/report.html"' in page and 'href="two/report.json"' in page
    assert (out / "summary.png").stat().st_size > 10_000
    record = json.loads((out / "batch.json").read_text())
    assert record["engine"] == "dask.distributed" and record["cluster"] == "LocalCluster"
    assert record["n_workers"] == 2 and record["scheduler_address"].startswith("tcp://")
    assert {"ikr", "torch", "dask", "distributed"} <= set(record["versions"])
    assert record["cases"]["one"]["runtime_s"] > 0 and record["cases"]["three"]["status"] == "failed"
    assert len(record["torch_threads"]) == 2 and all(n >= 1 for n in record["torch_threads"].values())
    assert {record["cases"][c]["worker"] for c in ("one", "two")} <= set(record["torch_threads"])

    # the same files and figures as the single commands
    single = tmp_path / "single"
    data = cohort / "data" / "case1"
    code, _, err = _run(
        capsys, "register", data / "fixed.nii.gz", data / "moving.nii.gz", "-o", single, *FLAGS,
        "--fixed-landmarks", data / "landmarks_fixed.csv", "--moving-landmarks", data / "landmarks_moving.csv",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = _run(
        capsys, "margin", "--tumour", data / "tumour.nii.gz", "--ablation", data / "ablation.nii.gz",
        "--transform", single / "displacement.nii.gz", "--uncertainty", single / "uncertainty.nii.gz",
        "--pre-image", data / "moving.nii.gz", "--post-image", data / "fixed.nii.gz", "-o", single / "margin",
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (out / "one").rglob("*")) == sorted(p.name for p in single.rglob("*"))
    batch, alone = _report(out / "one"), _report(single)
    assert batch["n_keypoints"] == alone["n_keypoints"]
    for key in ("sdlogj", "folding_percent"):
        assert batch[key] == pytest.approx(alone[key], rel=1e-3, abs=1e-6)
    assert batch["tre_mm"]["mean"] == pytest.approx(alone["tre_mm"]["mean"], rel=1e-3)
    margin_batch = json.loads((out / "one" / "margin" / "margin.json").read_text())
    margin_alone = json.loads((single / "margin" / "margin.json").read_text())
    assert margin_batch["min_margin_mm"] == pytest.approx(margin_alone["min_margin_mm"], abs=0.05)

    # a second run skips the finished cases and leaves their outputs alone; the failed one is tried again
    ids = {c: _report(out / c)["registration_id"] for c in ("one", "two")}
    code, _, err = _run(capsys, "batch", cohort / "manifest.csv", "-o", out, "--workers", "2", *FLAGS)
    assert code == 1, err
    rows = _summary(out)
    assert [rows[c]["status"] for c in rows] == ["skipped", "skipped", "failed"]
    assert rows["one"]["min_margin_mm"] and rows["one"]["tre_after_mm"]  # a skipped case keeps its figures
    assert {c: _report(out / c)["registration_id"] for c in ids} == ids
    record = json.loads((out / "batch.json").read_text())
    assert record["cases"]["one"]["status"] == "skipped"  # and a skipped case is skipped again next time:
    one = read_manifest(cohort / "manifest.csv")[0]
    assert finished_before(one, out / "one", CaseOptions({**SETTINGS, "spacing_mm": 5.0}), record["cases"]["one"])
    assert not finished_before(one, out / "one", CaseOptions({**SETTINGS, "spacing_mm": 4.0}), record["cases"]["one"])

    # --force redoes them
    code, _, err = _run(capsys, "batch", cohort / "manifest.csv", "-o", out, "--workers", "2", "--force", *FLAGS)
    assert code == 1, err
    rows = _summary(out)
    assert [rows[c]["status"] for c in rows] == ["ok", "ok", "failed"]
    assert all(_report(out / c)["registration_id"] != ids[c] for c in ids)
    assert _report(out / "one")["tre_mm"]["mean"] == pytest.approx(alone["tre_mm"]["mean"], rel=1e-3)


@pytest.mark.bad_input(
    "`ikr batch`: a manifest without the case/fixed/moving columns, with an unknown column, a repeated or"
    " unusable case name, or half a pair (tumour without ablation)",
    "exit 2 before any case runs: `MANIFEST: row N: ...`",
)
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name,fixed,moving\na,f.nii.gz,m.nii.gz\n", ["row 1", "case"]),
        ("case,fixed,moving,colour\na,f.nii.gz,m.nii.gz,red\n", ["row 1", "colour"]),
        ("case,fixed,moving\na,f.nii.gz,m.nii.gz\nA,f.nii.gz,m.nii.gz\n", ["row 3", "twice"]),
        ("case,fixed,moving\n../up,f.nii.gz,m.nii.gz\n", ["row 2", "../up"]),
        ("case,fixed,moving,tumour\na,f.nii.gz,m.nii.gz,t.nii.gz\n", ["row 2", "tumour without ablation"]),
        ("case,fixed,moving\na,,m.nii.gz\n", ["row 2", "no fixed image"]),
        ("case,fixed,moving\n", ["no case"]),
    ],
)
def test_a_bad_manifest_is_refused_in_one_line(capsys, tmp_path, text, words):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(text)
    code, _, err = _run(capsys, "batch", manifest, "-o", tmp_path / "out", "--workers", "1", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cohort.csv" in lines[0], err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "out" / "batch.json").exists()


@pytest.mark.bad_input(
    "`ikr batch --workers N` where N workers leave too little memory each for the largest case",
    "exit 2 before any worker starts: `case X needs about G GB but N workers leave M GB each`",
)
def test_batch_refuses_workers_that_leave_too_little_memory(capsys, tmp_path, cohort):
    code, _, err = _run(
        capsys, "batch", cohort / "manifest.csv", "-o", tmp_path / "out", "--workers", "2", "--spacing", "0.2"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "needs about" in lines[0] and "2 workers leave" in lines[0], err
    assert not (tmp_path / "out" / "one").exists()


def test_batch_runs_on_an_existing_scheduler(capsys, tmp_path, cohort):
    from distributed import LocalCluster

    manifest = tmp_path / "cohort.csv"
    data = cohort / "data" / "case2"
    manifest.write_text(f"case,fixed,moving\nlost,{data / 'fixed.nii.gz'},{data / 'gone.nii.gz'}\n")
    code, _, err = _run(capsys, "batch", manifest, "-o", tmp_path / "o", "--scheduler", "tcp://x:1", "--workers", "2")
    assert code == 2 and "--workers" in err
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        code, _, err = _run(capsys, "batch", manifest, "-o", tmp_path / "out", "--scheduler", cluster.scheduler_address)
    assert code == 1, err
    record = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert record["cluster"] == "existing scheduler" and record["scheduler_address"] == cluster.scheduler_address
    assert record["n_workers"] == 1 and "gone.nii.gz" in record["cases"]["lost"]["error"]
    assert _summary(tmp_path / "out")["lost"]["status"] == "failed"
