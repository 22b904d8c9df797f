"""DICOM series reading: decoders, geometry, tilt resampling, series splitting and refusals (real files)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.io.dicom import list_series, read_series
from ImplicitKernelRegistrationLib.io.images import read_image

PHI_KEYS = ("PatientName", "PatientID", "PatientBirthDate")
SMARTSCORE = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
ROUTINE_BRAIN = "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2"
MR_MIXED = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136"


@pytest.mark.parametrize("folder", ["ct_phantom_j2k_lossless", "ct_phantom_jpeg_lossless_sv1"])
def test_phantom_decodes_to_the_stored_pixels(folder: str) -> None:
    """J2K and JPEG-lossless series decode to exactly the original stored values (SHA-256 per slice)."""
    truth = json.loads(shared_path("dicom", "ct_phantom_pixel_ground_truth.json").read_text())["slices"]
    image = read_series(shared_path("dicom", folder))
    assert image.geometry.size == (512, 512, 28)
    assert np.allclose(image.geometry.spacing_mm, (0.451171875, 0.451171875, 5.0))
    assert np.allclose(image.geometry.origin_lps, (-115.5, -1.85, 696.21))
    assert np.allclose(image.geometry.direction, np.eye(3).ravel())
    assert image.array.dtype == np.int16
    assert image.array.min() == -1024 and image.array.max() == 782
    truth = sorted(truth, key=lambda s: s["z"])
    for k, expected in enumerate(truth):
        stored = (image.array[k].astype(np.int32) - int(expected["RescaleIntercept"])).astype("<u2")
        assert hashlib.sha256(stored.tobytes()).hexdigest() == expected["sha256_raw_pixels"], k


def test_mr_every_transfer_syntax_matches_the_reference_nifti() -> None:
    """J2K, JPEG lossless, JPEG-LS and RLE give identical voxels, equal to dicom2nifti's at the same points."""
    base = shared_path("dicom", "mr_compressed_with_nifti_gt_dicom2nifti")
    reference = read_image(base / "001_ground_truth.nii.gz")
    images = [
        read_series(base / name)
        for name in ("compressed_j2k", "compressed_jpeg", "compressed_jpegls", "compressed_rle")
    ]
    first = images[0]
    assert first.geometry.size == (256, 256, 4)
    assert np.allclose(first.geometry.origin_lps, (-100.79415804148, -161.07467269897, 130.05125403404))
    assert np.allclose(first.geometry.direction, (0, 0, -1, 1, 0, 0, 0, -1, 0))
    assert first.array.dtype == np.uint16
    for other in images[1:]:
        assert other.geometry == first.geometry
        assert np.array_equal(other.array, first.array)
    # dicom2nifti stores the slices in the opposite order: compare at the same physical positions
    points = reference.geometry.grid_points_lps().reshape(-1, 3)
    idx = first.geometry.lps_to_index(points)
    assert np.max(np.abs(idx - np.round(idx))) < 1e-3
    r = np.round(idx).astype(int)
    assert np.all((r >= 0) & (r < np.array(first.geometry.size)))
    assert np.array_equal(first.array[r[:, 2], r[:, 1], r[:, 0]], reference.array.reshape(-1))


def test_tilted_uneven_series_is_resampled_at_true_slice_positions() -> None:
    """The gantry-tilt series is resampled from each slice's IPP: slices 1 and 28 land where DICOM puts them."""
    folder = shared_path("dicom", "ct_tilt_uneven_ge")
    image = read_series(folder)
    assert "sheared" in image.meta["resampled"] and "varies" in image.meta["resampled"]
    g = image.geometry
    assert np.allclose(g.direction_matrix[:, 1], (0, 0.9483237, -0.3173047), atol=1e-6)
    for name, plane in (("01.dcm", 0), ("28.dcm", g.size[2] - 1)):
        ds = pydicom.dcmread(folder / name)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        rows, cols = np.meshgrid(np.arange(40, 480, 8), np.arange(40, 480, 8), indexing="ij")
        ps = [float(v) for v in ds.PixelSpacing]
        pts = ipp + cols.reshape(-1, 1) * ps[1] * iop[:3] + rows.reshape(-1, 1) * ps[0] * iop[3:]
        idx = g.lps_to_index(pts)
        assert np.all(np.abs(idx[:, 2] - plane) < 0.5)  # on the first / last output plane
        assert np.all(g.contains_lps(pts))
        r = np.round(idx).astype(int)
        sampled = image.array[r[:, 2], r[:, 1], r[:, 0]]
        original = ds.pixel_array[rows.reshape(-1), cols.reshape(-1)].astype(np.float64)
        if plane == 0:  # slice 1 defines the in-plane grid: exact values
            assert np.array_equal(sampled, original)
        else:  # slice 28 is shifted by a fraction of a pixel: nearest output voxel, close values
            assert np.corrcoef(sampled, original)[0, 1] > 0.95


def test_mixed_folder_lists_six_series_and_reads_one_by_uid() -> None:
    """A folder of 6 series is split by SeriesInstanceUID; a consistent one is read by its UID."""
    folder = shared_path("dicom", "mixed_series_pydicom", "flat")
    series = {s.series_uid: s for s in list_series(folder)}
    assert len(series) == 6
    assert sum(s.n_files for s in series.values()) == 18
    assert series[SMARTSCORE].consistent
    assert not series[ROUTINE_BRAIN].consistent and "gap" in series[ROUTINE_BRAIN].reason
    assert not series[MR_MIXED].consistent and "orientations" in series[MR_MIXED].reason
    image = read_series(folder, SMARTSCORE)
    assert image.geometry.size == (16, 16, 5)
    assert image.geometry.spacing_mm[2] == pytest.approx(2.5)
    assert image.geometry.origin_lps[2] == pytest.approx(-1.2375)
    assert image.meta["series_description"].startswith("SmartScore")


@pytest.mark.parametrize(("uid", "words"), [(ROUTINE_BRAIN, "gap"), (MR_MIXED, "orientations")])
def test_inconsistent_series_are_refused_with_one_line(uid: str, words: str) -> None:
    """Inconsistent stacks are refused with a one-line message naming the folder and the series."""
    folder = shared_path("dicom", "mixed_series_pydicom", "flat")
    with pytest.raises(IkrError) as err:
        read_series(folder, uid)
    message = str(err.value)
    assert "\n" not in message and uid in message and words in message and str(folder) in message


def test_several_series_without_uid_lists_them() -> None:
    """Without --series a multi-series folder is refused with every UID, its description and the hint."""
    folder = shared_path("dicom", "mixed_series_pydicom", "flat")
    with pytest.raises(IkrError) as err:
        read_series(folder)
    message = str(err.value)
    assert "--series" in message and SMARTSCORE in message and "SmartScore" in message
    assert "\n" not in message


def test_no_patient_identifiers_unless_asked() -> None:
    """meta has no patient name/ID/birth date by default; include_phi adds name and ID only."""
    folder = shared_path("dicom", "mixed_series_pydicom", "flat")
    ds = pydicom.dcmread(next(folder.glob("98892001_CT5N_*.dcm")), stop_before_pixels=True)
    image = read_series(folder, SMARTSCORE)
    text = repr(image.meta)
    assert not any(k in image.meta for k in PHI_KEYS)
    assert str(ds.PatientID) not in text and str(ds.PatientName) not in text
    with_phi = read_series(folder, SMARTSCORE, include_phi=True)
    assert with_phi.meta["PatientID"] == str(ds.PatientID)


def test_duplicate_copies_and_single_images_are_refused() -> None:
    """The same SOP instances twice (4 transfer syntaxes in one tree) and a one-image series are refused."""
    with pytest.raises(IkrError, match="same SOPInstanceUID"):
        read_series(shared_path("dicom", "mr_compressed_with_nifti_gt_dicom2nifti"))
    with pytest.raises(IkrError, match="single image"):
        read_series(shared_path("dicom", "seg_highdicom_ct", "ct_single"))


def test_empty_and_non_dicom_folders_are_refused(tmp_path: Path) -> None:
    """A folder without DICOM files gives a message naming it."""
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(IkrError) as err:
        read_series(tmp_path)
    assert str(tmp_path) in str(err.value) and "no DICOM" in str(err.value)
    with pytest.raises(IkrError, match="not a folder"):
        read_series(tmp_path / "missing")


def _copy_series(tmp_path: Path, edit: callable) -> Path:
    """Copy the SmartScore slices into tmp_path, applying `edit(k, dataset)` to each."""
    src = sorted(shared_path("dicom", "mixed_series_pydicom", "flat").glob("98892001_CT5N_*.dcm"))
    out = tmp_path / "series"
    out.mkdir()
    for k, path in enumerate(src):
        ds = pydicom.dcmread(path)
        edit(k, ds)
        ds.save_as(out / path.name)
    return out


def test_mixed_rows_columns_are_refused(tmp_path: Path) -> None:
    """Slices of different sizes in one series are refused."""

    def edit(k: int, ds: pydicom.Dataset) -> None:
        if k == 0:
            ds.Rows, ds.Columns = 8, 32

    with pytest.raises(IkrError, match="mixes image sizes"):
        read_series(_copy_series(tmp_path, edit))


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    """Two slices at the same position are refused."""

    def edit(k: int, ds: pydicom.Dataset) -> None:
        if k == 0:  # onto the position of the second file
            ds.ImagePositionPatient = [-72.2, -143.0, 6.2625]

    folder = _copy_series(tmp_path, edit)
    with pytest.raises(IkrError, match="same position"):
        read_series(folder)


def test_corrupt_pixel_data_names_the_file(tmp_path: Path) -> None:
    """Undecodable pixel data is refused with the file named."""
    src = shared_path("dicom", "ct_phantom_jpeg_lossless_sv1")
    out = tmp_path / "series"
    shutil.copytree(src, out)
    victim = out / "I10.dcm"
    ds = pydicom.dcmread(victim)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8garbage"])
    ds.save_as(victim)
    with pytest.raises(IkrError) as err:
        read_series(out)
    assert "I10.dcm" in str(err.value) and "decode" in str(err.value)
