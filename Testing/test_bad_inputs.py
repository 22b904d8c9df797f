"""Bad input and faults (issue 19): each case reproduced on real files, refused in one line or survived.

Every test carries `@pytest.mark.bad_input(case, outcome)`: scripts/make_bad_inputs_table.py turns
these into docs/bad_inputs.md, and the last test checks that the document is up to date.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import ROOT, shared_path
from ImplicitKernelRegistrationLib.cli import main
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Image
from ImplicitKernelRegistrationLib.io.images import read_image, read_mask, write_image
from ImplicitKernelRegistrationLib.workspace import PREVIOUS_PAIRS_FILE

SPACING = "5"  # a coarse working grid: one phantom registration takes a few seconds


def _run(capsys, *args: object) -> tuple[int, str, str]:
    """Run `ikr ARGS` in this process; return the exit code, stdout and stderr."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _ikr(*args: object, limit_bytes: int | None = None) -> subprocess.Popen:
    """Start `ikr ARGS` as a separate process (optionally with a file-size limit, like a full disk)."""

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    command = [sys.executable, "-m", "ImplicitKernelRegistrationLib.cli", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def _one_line_error(err: str, *words: object) -> str:
    """The error is one line naming what it should; return it."""
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (hidden ones included) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _pairs_csv(path: Path, case: Path, rows: slice) -> Path:
    """A pair CSV of the synthetic case's true landmark pairs `rows`."""
    fixed = (case / "landmarks_fixed.csv").read_text().splitlines()[1:][rows]
    moving = (case / "landmarks_moving.csv").read_text().splitlines()[1:][rows]
    lines = ["fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z"] + [
        f"{a},{b}" for a, b in zip(fixed, moving, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _session(outdir: Path) -> dict:
    """The folder's session.json."""
    return json.loads((outdir / "session.json").read_text())


@pytest.fixture(scope="module")
def case(tmp_path_factory, phantom_case) -> Path:
    """The phantom breathing case written as files."""
    from ImplicitKernelRegistrationLib.synthetic.synth import write_case

    folder = tmp_path_factory.mktemp("case") / "case"
    write_case(phantom_case, folder)
    return folder


@pytest.fixture(scope="module")
def registered(tmp_path_factory, case) -> Path:
    """One `ikr register` output folder of the phantom case (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("registered") / "out"
    register = ["register", str(case / "fixed.nii.gz"), str(case / "moving.nii.gz"), "-o", str(out)]
    code = main([*register, "--spacing", SPACING, "--kernel", "gaussian", "--quiet"])
    assert code == 0
    return out


@pytest.fixture
def outdir(tmp_path, registered) -> Path:
    """A private copy of the registered output folder."""
    return Path(shutil.copytree(registered, tmp_path / "out"))


# ------------------------------------------------------------------ 1: truncated or short image files


@pytest.mark.bad_input(
    "A `.nii.gz` cut short (a truncated download)",
    "exit 2, `cannot read NIfTI image: a damaged or truncated gzip file`; no output folder",
)
def test_truncated_nifti_gz_is_refused(capsys, tmp_path, case):
    data = (case / "moving.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "register", case / "fixed.nii.gz", cut, "-o", tmp_path / "o", "--spacing", SPACING)
    assert code == 2
    _one_line_error(err, "cut.nii.gz", "truncated")
    assert not (tmp_path / "o").exists()


@pytest.mark.bad_input(
    "A NIfTI header claiming 1000^3 voxels with 5 kB of data (`.nii` or `.nii.gz`)",
    "exit 2 before any voxel memory is allocated: `truncated, its header describes N bytes but the file holds M`",
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_promising_more_voxels_than_present_is_refused(capsys, tmp_path, suffix):
    image = Image(np.arange(8000, dtype=np.int16).reshape(20, 20, 20) - 1000, read_image_geometry())
    small = tmp_path / f"small{suffix}"
    write_image(image, small)
    raw = bytearray(sitk_bytes(small))
    raw[40:56] = np.array([3, 1000, 1000, 1000, 1, 1, 1, 1], "<i2").tobytes()
    huge = tmp_path / f"huge{suffix}"
    if suffix == ".nii.gz":
        import gzip

        huge.write_bytes(gzip.compress(bytes(raw[:5000])))
    else:
        huge.write_bytes(bytes(raw[:5000]))
    code, _, err = _run(capsys, "info", huge)
    assert code == 2
    _one_line_error(err, huge.name, "2000000352 bytes", "holds 5000")


def read_image_geometry():
    """A 20^3 grid at 2 mm."""
    from ImplicitKernelRegistrationLib.core.geometry import Geometry

    return Geometry((20, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def sitk_bytes(path: Path) -> bytes:
    """The uncompressed bytes of a .nii or .nii.gz file."""
    import gzip

    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


@pytest.mark.bad_input(
    "A `.mha` cut short",
    "exit 2, `the file is truncated: N of M bytes of voxel data are present`, without raw ITK lines",
)
def test_short_metaimage_gives_one_line_without_itk_noise(capfd, tmp_path):
    image = Image(np.arange(8000, dtype=np.int16).reshape(20, 20, 20) - 1000, read_image_geometry())
    full = tmp_path / "full.mha"
    sitk.WriteImage(image.to_sitk(), str(full), useCompression=False)
    short = tmp_path / "short.mha"
    short.write_bytes(full.read_bytes()[:-6000])
    code = main(["info", str(short)])
    err = capfd.readouterr().err
    assert code == 2
    _one_line_error(err, "short.mha", "truncated", "of 16000 bytes")


# ------------------------------------------------------------------ 2: two refines at once


@pytest.mark.bad_input(
    "Two `ikr refine` at once on one folder",
    "the second waits for the first (saying the folder is busy), then adds its pair: both pairs kept",
)
def test_two_refines_at_once_keep_both_pairs(tmp_path, outdir, case):
    a = _pairs_csv(tmp_path / "a.csv", case, slice(0, 1))
    b = _pairs_csv(tmp_path / "b.csv", case, slice(1, 2))
    first, second = _ikr("refine", outdir, "--add", a), _ikr("refine", outdir, "--add", b)
    results = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, results
    pairs = _session(outdir)["user"]["pairs"]
    assert sorted(p["id"] for p in pairs) == [1, 2]
    fixed_points = {tuple(np.round(p["fixed_lps"], 2)) for p in pairs}
    for path in (a, b):
        row = path.read_text().splitlines()[1].split(",")
        assert tuple(np.round([float(v) for v in row[:3]], 2)) in fixed_points
    report = json.loads((outdir / "report.json").read_text())
    assert len(report["user_pairs"]) == 2 and report["generation"] == 3


# ------------------------------------------------------------------ 3: register over an earlier result


@pytest.mark.bad_input(
    "`ikr register -o FOLDER` where FOLDER holds an earlier result (with clicked pairs)",
    "exit 2, `holds an earlier ikr result and N clicked pairs; pass --overwrite`; with --overwrite the old"
    " pairs are written to user_pairs_before_overwrite.csv, which `ikr refine --add` re-applies",
)
def test_register_over_an_earlier_result_keeps_the_clicked_pairs(capsys, tmp_path, outdir, case):
    code, _, _ = _run(capsys, "refine", outdir, "--add", _pairs_csv(tmp_path / "p.csv", case, slice(0, 2)))
    assert code == 0
    before = _snapshot(outdir)
    register = ["register", case / "fixed.nii.gz", case / "moving.nii.gz", "-o", outdir, "--spacing", SPACING]
    code, _, err = _run(capsys, *register, "--kernel", "gaussian", "--quiet")
    assert code == 2
    _one_line_error(err, outdir, "2 clicked pairs", "--overwrite")
    assert _snapshot(outdir) == before
    code, _, err = _run(capsys, *register, "--kernel", "gaussian", "--quiet", "--overwrite")
    assert code == 0
    assert _session(outdir)["user"]["pairs"] == []
    kept = outdir / PREVIOUS_PAIRS_FILE
    assert str(kept) in err
    code, _, _ = _run(capsys, "refine", outdir, "--add", kept)
    assert code == 0
    old = json.loads(before["session.json"])["user"]["pairs"]
    new = _session(outdir)["user"]["pairs"]
    assert np.allclose([p["fixed_lps"] for p in new], [p["fixed_lps"] for p in old], atol=1e-3)
    assert np.allclose([p["moving_lps"] for p in new], [p["moving_lps"] for p in old], atol=1e-3)


# ------------------------------------------------------------------ 4, 5: damaged or foreign session files


@pytest.mark.bad_input(
    "A `correspondences.csv` cut mid-row (or edited)",
    "exit 2, `does not match session.json (N rows where M were written, checksum differs)`; nothing rewritten",
)
def test_damaged_correspondences_are_refused(capsys, tmp_path, outdir, case):
    path = outdir / "correspondences.csv"
    text = path.read_text()
    path.write_text(text[: len(text) // 3])
    before = _snapshot(outdir)
    code, _, err = _run(capsys, "refine", outdir, "--add", _pairs_csv(tmp_path / "p.csv", case, slice(0, 1)))
    assert code == 2
    _one_line_error(err, "correspondences.csv", "does not match session.json")
    assert _snapshot(outdir) == before


@pytest.mark.bad_input(
    "A `residual.npy` damaged, or missing while `session.json` records it",
    "exit 2, `residual.npy: does not match session.json (checksum differs)` or `is missing or unreadable`;"
    " nothing rewritten",
)
@pytest.mark.parametrize("damage", ["edited", "missing"])
def test_damaged_or_missing_residual_is_refused(capsys, tmp_path, outdir, case, damage):
    path = outdir / "residual.npy"
    assert path.is_file()  # the default registration fits a residual and saves it
    if damage == "edited":
        data = path.read_bytes()
        path.write_bytes(data[:-4] + bytes(4))
    else:
        path.unlink()
    before = _snapshot(outdir)
    code, _, err = _run(capsys, "refine", outdir, "--add", _pairs_csv(tmp_path / "p.csv", case, slice(0, 1)))
    assert code == 2
    _one_line_error(err, "residual.npy", "does not match session.json" if damage == "edited" else "is missing")
    assert _snapshot(outdir) == before


@pytest.mark.bad_input(
    "A `session.json` (alone, or with its `report.json`) copied from another registration",
    "exit 2: `session.json and report.json come from different registrations`, or with both copied"
    " `correspondences.csv: does not match session.json`; nothing rewritten",
)
@pytest.mark.parametrize("copied", [("session.json",), ("session.json", "report.json")])
def test_session_from_another_registration_is_refused(capsys, tmp_path, outdir, case, copied):
    other = tmp_path / "other"
    register = ["register", case / "moving.nii.gz", case / "fixed.nii.gz", "-o", other, "--spacing", "6"]
    assert _run(capsys, *register, "--kernel", "gaussian", "--quiet")[0] == 0
    for name in copied:
        shutil.copy(other / name, outdir / name)
    before = _snapshot(outdir)
    code, _, err = _run(capsys, "refine", outdir)
    assert code == 2
    if len(copied) == 1:
        _one_line_error(err, outdir, "different registrations")
    else:
        _one_line_error(err, "correspondences.csv", "does not match session.json")
    assert _snapshot(outdir) == before


@pytest.mark.bad_input(
    "An input image changed or replaced after the registration",
    "exit 2, `the moving image changed since this registration (size or SHA-256 differs): register again`",
)
def test_changed_input_image_is_refused(capsys, tmp_path, case):
    inputs = Path(shutil.copytree(case, tmp_path / "case"))
    out = tmp_path / "out"
    register = ["register", inputs / "fixed.nii.gz", inputs / "moving.nii.gz", "-o", out, "--spacing", SPACING]
    assert _run(capsys, *register, "--kernel", "gaussian", "--quiet")[0] == 0
    shutil.copy(inputs / "fixed.nii.gz", inputs / "moving.nii.gz")
    before = _snapshot(out)
    code, _, err = _run(capsys, "refine", out)
    assert code == 2
    _one_line_error(err, "moving.nii.gz", "changed since this registration")
    assert _snapshot(out) == before


@pytest.mark.bad_input(
    "A `session.json` without `inputs`, or with a bad `working_geometry`; `report.json` missing or damaged",
    "exit 2, one line naming the file and what is missing or damaged",
)
@pytest.mark.parametrize("damage", ["no inputs", "bad working_geometry", "no report", "damaged report"])
def test_incomplete_session_or_report_is_refused(capsys, outdir, damage):
    session = _session(outdir)
    if damage == "no inputs":
        del session["inputs"]
    elif damage == "bad working_geometry":
        session["working_geometry"] = {"size": [0, 3]}
    (outdir / "session.json").write_text(json.dumps(session))
    if damage == "no report":
        (outdir / "report.json").unlink()
    elif damage == "damaged report":
        (outdir / "report.json").write_text('{"runtime_s": 3.')
    code, _, err = _run(capsys, "refine", outdir, "--remove", "1")
    assert code == 2
    name = "report.json" if "report" in damage else "session.json"
    _one_line_error(err, name)


# ------------------------------------------------------------------ 10, 12: failed, interrupted and killed refines


@pytest.mark.bad_input(
    "A refine that fails while writing (disk full: a file-size limit)",
    "exit 2, `displacement.nii.gz: was not written completely (disk full?)` (or the first other NIfTI output"
    " that failed); every file of the folder unchanged"
    " (the pair is not committed), no temporaries left",
)
def test_failed_refine_commits_nothing(tmp_path, outdir, case):
    before = _snapshot(outdir)
    pairs = _pairs_csv(tmp_path / "p.csv", case, slice(0, 1))
    run = _ikr("refine", outdir, "--add", pairs, limit_bytes=200_000)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err
    line = _one_line_error(err, ".nii.gz: was not written completely")
    assert any(name in line for name in ("displacement.nii.gz", "warped.nii.gz", "uncertainty.nii.gz")), line
    assert _snapshot(outdir) == before
    assert sorted(p.name for p in outdir.iterdir()) == sorted(before)


@pytest.mark.bad_input(
    "A refine interrupted while moving its new files in (some outputs new, session.json old)",
    "the journal marks the folder: `ikr suggest` refuses it; the next `ikr refine` says so and rebuilds every"
    " output from session.json",
)
def test_interrupted_refine_is_marked_and_repaired(capsys, tmp_path, outdir, case):
    (outdir / "warped.nii.gz").unlink()
    (outdir / "warped.nii.gz").mkdir()  # a folder in the way: moving the new warped image in fails
    code, _, err = _run(capsys, "refine", outdir, "--add", _pairs_csv(tmp_path / "p.csv", case, slice(0, 1)))
    assert code == 2
    _one_line_error(err, "warped.nii.gz")
    assert _session(outdir)["user"]["pairs"] == [] and _session(outdir)["generation"] == 1
    assert (outdir / ".ikr-journal.json").is_file()
    code, _, err = _run(capsys, "suggest", outdir)
    assert code == 2
    _one_line_error(err, "interrupted", "ikr refine")
    (outdir / "warped.nii.gz").rmdir()
    code, _, err = _run(capsys, "refine", outdir)
    assert code == 0
    assert "interrupted" in err
    assert not (outdir / ".ikr-journal.json").exists()
    assert (outdir / "warped.nii.gz").is_file()
    report = json.loads((outdir / "report.json").read_text())
    assert report["generation"] == _session(outdir)["generation"] == 2
    assert report["user_pairs"] == []
    assert not [p for p in outdir.iterdir() if ".tmp" in p.name]


@pytest.mark.bad_input(
    "`kill -9` of a refine while it writes",
    "the next run removes the temporaries it left and repairs the folder (or finds it consistent)",
)
def test_killed_refine_is_cleaned_up_by_the_next_run(capsys, tmp_path, outdir, case):
    run = _ikr("refine", outdir, "--add", _pairs_csv(tmp_path / "p.csv", case, slice(0, 1)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if any(p.name.startswith(".staging.") for p in outdir.iterdir()):
            break
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate()
    code, _, err = _run(capsys, "refine", outdir)
    assert code == 0, err
    assert not [p for p in outdir.iterdir() if ".tmp" in p.name or p.name.startswith(".ikr-journal")]
    report = json.loads((outdir / "report.json").read_text())
    session = _session(outdir)
    assert report["generation"] == session["generation"]
    assert len(report["user_pairs"]) == len(session["user"]["pairs"]) <= 1


@pytest.mark.bad_input(
    "`kill -9` of a register while it writes its new folder",
    "no half-written folder appears; the next register into that path removes the hidden `.OUT.XXXX.tmp/` and says so",
)
def test_killed_register_leaves_no_folder_and_is_cleaned_up(capsys, tmp_path, case):
    out = tmp_path / "out"
    register = ["register", case / "fixed.nii.gz", case / "moving.nii.gz", "-o", out, "--spacing", SPACING]
    run = _ikr(*register, "--kernel", "gaussian", "--quiet")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None and not list(tmp_path.glob(".out.*.tmp")):
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate()
    assert not out.exists() or (out / "session.json").is_file()
    if out.exists():  # the kill came after the rename: the folder is whole
        shutil.rmtree(out)
    stale = list(tmp_path.glob(".out.*.tmp"))
    code, _, err = _run(capsys, *register, "--kernel", "gaussian", "--quiet")
    assert code == 0, err
    assert ("removed 1 temporary files" in err) == bool(stale)
    assert not list(tmp_path.glob(".out.*.tmp")) and (out / "session.json").is_file()


# ------------------------------------------------------------------ 6: DICOM folders


def _copy_series(src: Path, out: Path, keep: callable, uid: str | None = None) -> list[Path]:
    """Copy the DICOM files of `src` that `keep(k)` accepts into `out`, as a new series when `uid` is given."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).SliceLocation))
    written = []
    for k, path in enumerate(files):
        if not keep(k):
            continue
        ds = pydicom.dcmread(path)
        if uid is not None:
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / f"{uid or 's'}_{k:03d}.dcm")
        written.append(out / f"{uid or 's'}_{k:03d}.dcm")
    return written


@pytest.mark.bad_input(
    "A DICOM series with one slice missing where the spacing is uneven (4 mm then 7 mm)",
    "exit 2, `has a gap: slices N mm apart where M mm is expected (missing slices)`",
)
def test_missing_slice_in_an_uneven_series_is_a_gap(tmp_path):
    src = shared_path("dicom", "ct_tilt_uneven_ge")
    files = sorted(src.iterdir())
    shutil.copytree(src, tmp_path / "series")
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "series").iterdir()),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    Path(headers[5].filename).unlink()  # inside the 4 mm part
    assert len(files) == 28
    with pytest.raises(IkrError, match="has a gap"):
        read_image(tmp_path / "series")


@pytest.mark.bad_input(
    "An unreadable or damaged file inside a DICOM folder",
    "exit 2 naming the file (`cannot be read` / `a damaged DICOM file`), not skipped silently",
)
def test_damaged_file_in_a_dicom_folder_is_named(capsys, tmp_path):
    src = shared_path("dicom", "ct_phantom_jpeg_lossless_sv1")
    folder = Path(shutil.copytree(src, tmp_path / "series"))
    victim = folder / "I50.dcm"
    victim.write_bytes(victim.read_bytes()[:400])
    code, _, err = _run(capsys, "info", folder)
    assert code == 2
    _one_line_error(err, "I50.dcm", "damaged DICOM")


@pytest.mark.bad_input(
    "`ikr info` on a DICOM folder that yields no volume",
    "the series are listed on stdout, then exit 2 with the reason",
)
def test_info_without_a_volume_exits_2(capsys, tmp_path):
    src = shared_path("dicom", "seg_highdicom_ct", "ct_single")
    code, out, err = _run(capsys, "info", src)
    assert code == 2
    assert "series" in out
    _one_line_error(err, "single image")


# ------------------------------------------------------------------ 7, 8: geometry and points


@pytest.mark.bad_input(
    "A moving image at 0.001 mm or 100 mm spacing; a fixed image at 100 mm",
    "exit 2, `voxel spacing ... is outside what a CT has`; no output",
)
@pytest.mark.parametrize(("role", "spacing"), [("moving", 0.001), ("moving", 100.0), ("fixed", 100.0)])
def test_degenerate_spacing_is_refused(capsys, tmp_path, case, role, spacing):
    image = read_image(case / f"{role}.nii.gz")
    odd = Image(image.array, image.geometry.__class__(
        image.geometry.size, (spacing,) * 3, image.geometry.origin_lps, image.geometry.direction
    ))  # fmt: skip
    write_image(odd, tmp_path / "odd.nii.gz")
    paths = {"fixed": case / "fixed.nii.gz", "moving": case / "moving.nii.gz", role: tmp_path / "odd.nii.gz"}
    code, _, err = _run(capsys, "register", paths["fixed"], paths["moving"], "-o", tmp_path / "o", "--spacing", SPACING)
    assert code == 2
    _one_line_error(err, "odd.nii.gz", "spacing")
    assert not (tmp_path / "o").exists()


@pytest.mark.bad_input(
    "A clicked moving point 3 m outside the moving image",
    "exit 2, `moving point [...] (LPS mm) lies outside the moving image`; session unchanged",
)
def test_moving_point_outside_the_moving_image_is_refused(capsys, tmp_path, outdir, case):
    pairs = _pairs_csv(tmp_path / "p.csv", case, slice(0, 1))
    row = pairs.read_text().splitlines()
    values = row[1].split(",")
    values[3] = str(float(values[3]) + 3000.0)
    pairs.write_text(row[0] + "\n" + ",".join(values) + "\n")
    before = _snapshot(outdir)
    code, _, err = _run(capsys, "refine", outdir, "--add", pairs)
    assert code == 2
    _one_line_error(err, "outside the moving image")
    assert _snapshot(outdir) == before


# ------------------------------------------------------------------ 9, 15: output folders and wrong reasons


@pytest.mark.bad_input(
    "`ikr register -o` a path under a file (an output that cannot be written)",
    "exit 2 before registering: `the output path lies under a file, not a folder`",
)
def test_unwritable_output_is_refused_before_registering(capsys, tmp_path, case):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = _run(capsys, "register", case / "fixed.nii.gz", case / "moving.nii.gz", "-o", blocker / "out")
    assert code == 2
    _one_line_error(err, "lies under a file")
    assert "runtime" not in out  # refused before registering


@pytest.mark.bad_input(
    "`ikr margin --thresholds 2 10` or a NaN threshold",
    "thresholds other than 0 and 5 are reported as asked; NaN or beyond +-50 mm: exit 2, one line; no output",
)
def test_margin_thresholds(capsys, tmp_path, phantom_case):
    from ImplicitKernelRegistrationLib.synthetic.tumour import demo_tumour_and_zone

    tumour, zone, _ = demo_tumour_and_zone(phantom_case.fixed, phantom_case.true_field, None, 0)
    write_image(tumour, tmp_path / "t.nii.gz")
    write_image(zone, tmp_path / "z.nii.gz")
    args = ["margin", "--tumour", tmp_path / "t.nii.gz", "--ablation", tmp_path / "z.nii.gz"]
    code, out, err = _run(capsys, *args, "-o", tmp_path / "m", "--thresholds", "2", "10")
    assert code == 0, err
    figures = json.loads((tmp_path / "m" / "margin.json").read_text())
    assert 0.0 <= figures["surface_fraction_ge_10mm"] <= figures["surface_fraction_ge_2mm"] <= 1.0
    assert "margin >= 2 mm" in out and "margin >= 10 mm" in out
    code, _, err = _run(capsys, *args, "-o", tmp_path / "n", "--thresholds", "nan")
    assert code == 2
    _one_line_error(err, "threshold")
    assert not (tmp_path / "n").exists()


@pytest.mark.bad_input(
    "A folder given to `ikr refine --add`",
    "exit 2, `is a folder, not a point file` (not `no such file`)",
)
def test_folder_given_as_point_file(capsys, tmp_path, outdir):
    code, _, err = _run(capsys, "refine", outdir, "--add", tmp_path)
    assert code == 2
    _one_line_error(err, str(tmp_path), "is a folder, not a point file")


@pytest.mark.bad_input(
    "A file or DICOM folder this user may not read (not as root: root reads everything)",
    "exit 2 with the true reason, `cannot be read (permission denied)`, not `no such file` or `no DICOM files`",
)
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads every file: no permission to deny")
def test_unreadable_file_and_folder_get_the_true_reason(capsys, tmp_path, case):
    image = Path(shutil.copy(case / "fixed.nii.gz", tmp_path / "locked.nii.gz"))
    folder = tmp_path / "locked_dicom"
    folder.mkdir()
    image.chmod(0)
    folder.chmod(0)
    try:
        for path in (image, folder):
            code, _, err = _run(capsys, "info", path)
            assert code == 2
            _one_line_error(err, path.name, "permission denied")
    finally:
        image.chmod(0o600)
        folder.chmod(0o700)


# ------------------------------------------------------------------ 13: masks


@pytest.mark.bad_input(
    "Masks: all ones (accepted), empty, or a CT volume given as a mask",
    "all ones is used; empty: `is an empty mask`; a CT: `is not a mask: its values run from -1000 to ...`",
)
def test_masks_are_checked_as_masks(tmp_path, phantom_case):
    geometry = phantom_case.fixed.geometry
    ones = tmp_path / "ones.nii.gz"
    write_image(Image(np.ones(phantom_case.fixed.array.shape, np.uint8), geometry), ones)
    assert read_mask(ones).array.min() == 1
    empty = tmp_path / "empty.nii.gz"
    write_image(Image(np.zeros(phantom_case.fixed.array.shape, np.uint8), geometry), empty)
    with pytest.raises(IkrError, match="empty mask"):
        read_mask(empty)
    ct = tmp_path / "ct.nii.gz"
    write_image(phantom_case.fixed, ct)
    with pytest.raises(IkrError, match="is not a mask"):
        read_mask(ct)


# ------------------------------------------------------------------ 16: synth arguments


@pytest.mark.bad_input(
    "`ikr synth --magnitude nan` (or negative, or 1e6), or a label map given as the CT",
    "exit 2 with one line; no case written",
)
@pytest.mark.parametrize("magnitude", ["nan", "-3", "1e6", None])
def test_synth_refuses_bad_magnitudes_and_label_maps(capsys, tmp_path, case, magnitude):
    if magnitude is None:
        labels = read_image(case / "fixed.nii.gz")
        write_image(labels.with_array((labels.array > 0).astype(np.uint8)), tmp_path / "labels.nii.gz")
        code, _, err = _run(capsys, "synth", tmp_path / "labels.nii.gz", "-o", tmp_path / "s")
        _one_line_error(err, "labels.nii.gz", "not a CT")
    else:
        code, _, err = _run(capsys, "synth", case / "fixed.nii.gz", "-o", tmp_path / "s", "--magnitude", magnitude)
        _one_line_error(err, "magnitude")
    assert code == 2
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ 14 and issue 22 item 5: DICOM studies


@pytest.fixture
def study(tmp_path) -> Path:
    """A study folder: a thin full series, a thick full series (every 2nd slice), a short thin one, a scout."""
    src = shared_path("dicom", "ct_phantom_jpeg_lossless_sv1")
    folder = tmp_path / "study"
    _copy_series(src, folder, lambda k: True, "1.2.826.0.1.3680043.8.498.1")
    _copy_series(src, folder, lambda k: k % 2 == 0, "1.2.826.0.1.3680043.8.498.2")
    _copy_series(src, folder, lambda k: k < 10, "1.2.826.0.1.3680043.8.498.3")
    scout = _copy_series(src, folder, lambda k: k in (0, 1), "1.2.826.0.1.3680043.8.498.4")
    for path in scout:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    return folder


@pytest.mark.bad_input(
    "A DICOM study folder with several series (thin, thick, short, scout)",
    "the axial CT volume with the largest coverage and thinnest regular slices is chosen, and why is said on"
    " stderr and in report.json; `--fixed-series`/`--moving-series` choose another",
)
def test_study_folder_chooses_the_thin_full_series(study):
    image = read_image(study, choose_series=True)
    choice = image.meta["series_choice"]
    assert choice["uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert "largest coverage" in choice["why"] and "localizer" in choice["why"]
    assert image.geometry.size[2] == 28
    thick = read_image(study, series_uid="1.2.826.0.1.3680043.8.498.2", choose_series=True)
    assert thick.geometry.size[2] == 14


def _write_dicom_series(image: Image, folder: Path, uid: str, keep: callable, description: str) -> None:
    """Write the axial slices `keep(k)` of a CT Image as a DICOM series (uncompressed, identity direction)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    g = image.geometry
    for k in (k for k in range(g.size[2]) if keep(k)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.100", uid
        ds.Modality, ds.SeriesDescription, ds.ImageType = "CT", description, ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in g.index_to_lps(np.array([[0.0, 0.0, k]]))[0]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [g.spacing_mm[1], g.spacing_mm[0]]
        ds.SliceThickness = g.spacing_mm[2]
        ds.Rows, ds.Columns = g.size[1], g.size[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(image.array[k].astype("<i2")).tobytes()
        ds.save_as(folder / f"{uid.rsplit('.', 1)[-1]}_{k:03d}.dcm", enforce_file_format=True)


@pytest.mark.bad_input(
    "`ikr register` with a DICOM study folder (thin, thick and short series of the same CT)",
    "registers the thin full series; stderr and report.json's inputs say which and why",
)
def test_register_a_dicom_study_says_which_series_and_why(capsys, tmp_path, phantom_case, case):
    study = tmp_path / "study"
    fixed = phantom_case.fixed
    _write_dicom_series(fixed, study, "1.2.826.0.1.3680043.8.498.11", lambda k: k % 2 == 0, "thick")
    _write_dicom_series(fixed, study, "1.2.826.0.1.3680043.8.498.12", lambda k: True, "thin")
    _write_dicom_series(fixed, study, "1.2.826.0.1.3680043.8.498.13", lambda k: 20 <= k < 60, "short")
    out = tmp_path / "out"
    register = ["register", study, case / "moving.nii.gz", "-o", out, "--spacing", SPACING]
    code, _, err = _run(capsys, *register, "--kernel", "gaussian", "--quiet")
    assert code == 0, err
    assert "fixed image: chose series 1.2.826.0.1.3680043.8.498.12 ('thin'" in err
    chosen = json.loads((out / "report.json").read_text())["inputs"]["fixed_series"]
    assert chosen["uid"] == "1.2.826.0.1.3680043.8.498.12" and "thinnest regular slices" in chosen["why"]
    assert "'thick'" in chosen["why"] and "'short'" in chosen["why"]
    code, _, err = _run(capsys, "refine", out)  # the refine reads the same series again
    assert code == 0, err


@pytest.mark.bad_input(
    "`ikr register` on the mixed folder (6 series, 2 patients, CT and MR), or with an unknown --fixed-series",
    "the one consistent axial CT volume is chosen and named on stderr; an unknown UID: exit 2 listing the series",
)
def test_register_names_the_series_it_chose(capsys, tmp_path):
    flat = shared_path("dicom", "mixed_series_pydicom", "flat")
    code, _, err = _run(capsys, "register", flat, flat, "-o", tmp_path / "o", "--fixed-series", "1.2.3", "--quiet")
    assert code == 2
    _one_line_error(err, "1.2.3", "SmartScore")
    code, _, err = _run(capsys, "register", flat, flat, "-o", tmp_path / "o", "--spacing", "1", "--quiet")
    assert "fixed image: chose series 1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6" in err
    assert "moving image: chose series" in err


# ------------------------------------------------------------------ the document


def test_bad_inputs_document_is_generated_from_these_tests():
    """docs/bad_inputs.md is what scripts/make_bad_inputs_table.py makes of the markers above."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_bad_inputs_table.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
