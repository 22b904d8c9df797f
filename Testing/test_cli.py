"""The `ikr` command line: every command end to end on real files, and one-line errors on bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, shared_path
from ImplicitKernelRegistrationLib.cli import main
from ImplicitKernelRegistrationLib.io.images import write_image
from ImplicitKernelRegistrationLib.io.outputs import OUTPUT_FILES
from ImplicitKernelRegistrationLib.io.transforms import read_field


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """Run `ikr ARGS`; return the exit code, stdout and stderr."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, *words: str) -> None:
    """The error is one line that names what it should."""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize(
    "name",
    [
        "abdomen_ts_example_ct_3mm.nii.gz",
        "liver_ts_example_ct_sm_3mm.nii.gz",
        "liver_ts_example_ct_sm_labels117.nii.gz",
        "liver_ts_example_ct_sm_livermask.nii.gz",
        "thorax_popi_T00_1p5mm.nii.gz",
    ],
)
def test_info_prints_the_geometry_of_every_shared_ct(capsys, name):
    path = shared_path("ct", name)
    code, out, _ = _run(capsys, "info", path, "--json")
    assert code == 0
    desc = json.loads(out)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert list(desc["size"]) == list(reader.GetSize())
    assert np.allclose(desc["spacing_mm"], reader.GetSpacing())
    assert np.allclose(desc["origin_lps"], reader.GetOrigin())


@pytest.mark.parametrize(
    "folder",
    [
        "ct_phantom_j2k_lossless",
        "ct_phantom_jpeg_lossless_sv1",
        "ct_tilt_uneven_ge",
        "mixed_series_pydicom/flat",
        "mr_compressed_with_nifti_gt_dicom2nifti/compressed_rle",
        "seg_dcmqi_liver/ct",
    ],
)
def test_info_describes_every_shared_dicom_folder(capsys, folder):
    code, out, _ = _run(capsys, "info", shared_path("dicom", *folder.split("/")))
    assert code == 0
    assert "series" in out.lower()


def test_info_of_a_missing_file_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _run(capsys, "info", tmp_path / "nothing.nii.gz")
    assert code == 2
    _one_line_error(err, "nothing.nii.gz")


def test_phantom_synth_register_refine_margin_end_to_end(capsys, tmp_path):
    code, _, _ = _run(capsys, "phantom", "-o", tmp_path / "ph")
    assert code == 0
    ct = tmp_path / "ph" / "phantom_ct.nii.gz"
    assert ct.is_file()
    code, _, _ = _run(capsys, "synth", ct, "-o", tmp_path / "case", "--family", "breathing", "--seed", "1")
    assert code == 0
    case = tmp_path / "case"
    out = tmp_path / "out"
    code, stdout, _ = _run(
        capsys, "register", case / "fixed.nii.gz", case / "moving.nii.gz", "-o", out,
        "--spacing", "3", "--quiet",
        "--fixed-landmarks", case / "landmarks_fixed.csv", "--moving-landmarks", case / "landmarks_moving.csv",
    )  # fmt: skip
    assert code == 0, stdout
    for name in OUTPUT_FILES.values():
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in ("runtime_s", "peak_memory_mb", "device", "n_keypoints", "sdlogj", "folding_percent", "tre_mm"):
        assert key in report
    assert report["tre_mm"]["mean"] < report["tre_before_mm"]["mean"] / 2
    assert read_field(out / "displacement.nii.gz").geometry.size == read_field(out / "transform.h5").geometry.size

    code, stdout, _ = _run(capsys, "suggest", out, "-n", "3")
    assert code == 0, stdout
    rows = list(csv.DictReader(open(out / "suggestions.csv")))
    assert 1 <= len(rows) <= 3
    assert all(float(r["expected_error_mm"]) > 0 for r in rows)

    # refine with three landmark pairs written as a pair CSV
    fixed = list(csv.DictReader(open(case / "landmarks_fixed.csv")))[:3]
    moving = list(csv.DictReader(open(case / "landmarks_moving.csv")))[:3]
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w") as f:
        f.write("fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\n")
        for a, b in zip(fixed, moving, strict=True):
            f.write(",".join([a["x"], a["y"], a["z"], b["x"], b["y"], b["z"]]) + "\n")
    code, stdout, _ = _run(capsys, "refine", out, "--add", pairs)
    assert code == 0, stdout
    report = json.loads((out / "report.json").read_text())
    assert "refine_s" in report
    assert report["quality"]["verdict"] == "ok"  # refine updates the verdict
    assert len(report["user_pairs"]) == 3
    assert all(p["residual_mm"] < 0.5 for p in report["user_pairs"])
    session = json.loads((out / "session.json").read_text())
    assert [p["id"] for p in session["user"]["pairs"]] == [1, 2, 3]
    code, _, _ = _run(capsys, "refine", out, "--remove", "2")
    assert code == 0
    session = json.loads((out / "session.json").read_text())
    assert [p["id"] for p in session["user"]["pairs"]] == [1, 3]
    code, _, err = _run(capsys, "refine", out, "--remove", "7")
    assert code == 2
    _one_line_error(err, "7")

    # margin of a tumour and a zone placed in the liver, through the registered field
    from ImplicitKernelRegistrationLib.synthetic.synth import read_case
    from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

    synth_case = read_case(case)
    tumour, zone, true_margin = demo_tumour_and_zone(synth_case.fixed, synth_case.true_field, None, 0)
    write_image(tumour, tmp_path / "tumour.nii.gz")
    write_image(zone, tmp_path / "zone.nii.gz")
    code, stdout, _ = _run(
        capsys, "margin", "--tumour", tmp_path / "tumour.nii.gz", "--ablation", tmp_path / "zone.nii.gz",
        "--transform", out / "displacement.nii.gz", "-o", tmp_path / "margin",
        "--uncertainty", out / "uncertainty.nii.gz",
    )  # fmt: skip
    assert code == 0, stdout
    figures = json.loads((tmp_path / "margin" / "margin.json").read_text())
    assert abs(figures["min_margin_mm"] - true_margin) < 2.0
    assert figures["min_margin_p5_mm"] <= figures["min_margin_mm"] <= figures["min_margin_p95_mm"]
    assert 0.0 <= figures["p_min_margin_below_0mm"] <= figures["p_min_margin_below_5mm"] <= 1.0
    assert (tmp_path / "margin" / "report.html").is_file()


def test_register_refuses_bad_input_and_leaves_no_output(capsys, tmp_path, phantom_case):
    fixed = tmp_path / "fixed.nii.gz"
    write_image(phantom_case.fixed, fixed)
    code, _, err = _run(capsys, "register", fixed, tmp_path / "missing.nii.gz", "-o", tmp_path / "out")
    assert code == 2
    _one_line_error(err, "missing.nii.gz")
    assert not (tmp_path / "out").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "register", fixed, fixed, "-o", busy, "--kernel", "gaussian")
    assert code == 2
    _one_line_error(err, "busy")
    assert (busy / "notes.txt").read_text() == "mine"

    code, _, err = _run(capsys, "register", fixed, fixed, "-o", tmp_path / "o2", "--fixed-landmarks", fixed)
    assert code == 2
    _one_line_error(err, "moving-landmarks")


def test_refine_refuses_an_incompatible_session_and_keeps_it(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    session = out / "session.json"
    session.write_text(json.dumps({"version": 99}))
    code, _, err = _run(capsys, "refine", out, "--remove", "1")
    assert code == 2
    _one_line_error(err, "session.json", "99")
    assert json.loads(session.read_text()) == {"version": 99}


def test_demo_runs_on_the_phantom(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("IKR_SHARED_DATA", str(tmp_path / "no-shared-data"))
    code, out, _ = _run(capsys, "demo", "-o", tmp_path / "demo", "--quiet", "--spacing", "3")
    assert code == 0
    assert "procedural phantom" in out
    assert "TRE after" in out and "true minimal margin" in out
    report = json.loads((tmp_path / "demo" / "registration" / "report.json").read_text())
    assert report["tre_mm"]["mean"] < report["tre_before_mm"]["mean"] / 4
    assert (tmp_path / "demo" / "margin" / "report.html").is_file()


def test_shared_data_location_is_the_one_the_tests_use():
    assert Path(SHARED_DATA).name == "data"


def test_lung_regions_flag_reaches_the_registration_config():
    from ImplicitKernelRegistrationLib.cli import _registration_config, build_parser
    from ImplicitKernelRegistrationLib.registration.pipeline import RegistrationConfig

    parser = build_parser()
    plain = parser.parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out"])
    assert _registration_config(plain)["lung_regions"] == RegistrationConfig().lung_regions
    on = parser.parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out", "--lung-regions"])
    off = parser.parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out", "--no-lung-regions"])
    assert _registration_config(on)["lung_regions"] and not _registration_config(off)["lung_regions"]
