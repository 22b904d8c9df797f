"""Image reading/writing/description: real CTs, axis flips and permutations, RAS storage, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.images import (
    check_image,
    describe_image,
    format_description,
    read_image,
    write_image,
)

CT_FILES = {  # file: (size, spacing, origin) from data README / SOURCES-ct.md
    "thorax_popi_T00_1p5mm.nii.gz": ((320, 233, 188), 1.5, (-250.0, -136.656, -164.5)),
    "abdomen_ts_example_ct_3mm.nii.gz": ((122, 101, 112), 3.0, (-185.04, -311.32, 94.30)),
    "liver_ts_example_ct_sm_3mm.nii.gz": ((122, 101, 30), 3.0, (-185.04, -311.32, 94.30)),
    "liver_ts_example_ct_sm_labels117.nii.gz": ((122, 101, 30), 3.0, (-185.04, -311.32, 94.30)),
    "liver_ts_example_ct_sm_livermask.nii.gz": ((122, 101, 30), 3.0, (-185.04, -311.32, 94.30)),
}


@pytest.mark.parametrize("name", sorted(CT_FILES))
def test_describe_every_ct_file(name: str) -> None:
    """describe_image reports the documented size, spacing, origin, identity direction and pixel type."""
    size, spacing, origin = CT_FILES[name]
    desc = describe_image(shared_path("ct", name))
    assert desc["format"] == "NIfTI"
    assert tuple(desc["size"]) == size
    assert np.allclose(desc["spacing_mm"], spacing)
    assert np.allclose(desc["origin_lps"], origin, atol=0.01)
    assert np.allclose(desc["direction"], np.eye(3).ravel())
    assert np.allclose(desc["extent_mm"], np.array(size) * spacing)
    is_label = "label" in name or "mask" in name
    assert desc["pixel_type"] == ("uint8" if is_label else "int16")
    assert desc["modality"] == ("unknown" if is_label else "CT")
    assert "not stored" in desc["modality_source"]
    lo, hi = desc["value_range"]
    assert lo < hi
    text = format_description(desc)
    assert name in text and " x ".join(str(v) for v in size) in text


DICOM_VOLUMES = {  # folder: (size or None when resampled, spacing xy, modality)
    "ct_phantom_j2k_lossless": ((512, 512, 28), (0.4512, 0.4512, 5.0), (-115.5, -1.85, 696.21), "CT"),
    "ct_phantom_jpeg_lossless_sv1": ((512, 512, 28), (0.4512, 0.4512, 5.0), (-115.5, -1.85, 696.21), "CT"),
    "seg_dcmqi_liver": ((512, 512, 3), (0.8105, 0.8105, 1.0), (-235.2, -226.8, -128.69), "CT"),
    "mr_compressed_with_nifti_gt_dicom2nifti/compressed_jpegls": (
        (256, 256, 4),
        (1.0, 1.0, 1.0),
        (-100.794, -161.075, 130.051),
        "MR",
    ),
}


@pytest.mark.parametrize("folder", sorted(DICOM_VOLUMES))
def test_describe_dicom_volume_folders(folder: str) -> None:
    """Folders holding one readable series describe its geometry and list the series found."""
    size, spacing, origin, modality = DICOM_VOLUMES[folder]
    desc = describe_image(shared_path("dicom", *folder.split("/")))
    assert desc["format"] == "DICOM"
    assert tuple(desc["size"]) == size
    assert np.allclose(desc["spacing_mm"], spacing, atol=1e-4)
    assert np.allclose(desc["origin_lps"], origin, atol=1e-3)
    assert desc["modality"] == modality and desc["modality_source"] == "DICOM Modality attribute"
    assert any(s["consistent"] for s in desc["series"])


def test_describe_every_dicom_folder() -> None:
    """Every folder under dicom/ is described without raising; multi-series folders list their series."""
    root = shared_path("dicom")
    expected_series = {
        "ct_tilt_uneven_ge": 1,
        "ct_phantom_j2k_lossless": 1,
        "ct_phantom_jpeg_lossless_sv1": 1,
        "mr_compressed_with_nifti_gt_dicom2nifti": 1,
        "mixed_series_pydicom": 6,
        "seg_dcmqi_liver": 2,
        "seg_highdicom_ct": 7,
    }
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        desc = describe_image(folder)
        assert len(desc["series"]) == expected_series[folder.name], folder.name
        assert ("size" in desc) != ("volume_problem" in desc), folder.name
        assert format_description(desc)
    tilt = describe_image(root / "ct_tilt_uneven_ge")
    assert "gantry tilt 18.5" in tilt["resampled"]
    assert np.allclose(tilt["spacing_mm"][:2], 0.48828, atol=1e-4)
    flat = describe_image(root / "mixed_series_pydicom" / "flat")
    assert len(flat["series"]) == 6 and "--series" in flat["volume_problem"]
    assert "NOT A VOLUME" in format_description(flat)


def test_description_holds_no_patient_identifiers() -> None:
    """The info description of a DICOM folder contains no patient name, ID or birth date."""
    import pydicom

    folder = shared_path("dicom", "seg_dcmqi_liver")
    ds = pydicom.dcmread(folder / "ct" / "01.dcm", stop_before_pixels=True)
    text = repr(describe_image(folder)) + format_description(describe_image(folder))
    for value in (ds.get("PatientName"), ds.get("PatientID"), ds.get("PatientBirthDate")):
        if value:
            assert str(value) not in text


def test_single_dicom_file_reads_its_series() -> None:
    """A path to one DICOM file reads the series it belongs to."""
    image = read_image(shared_path("dicom", "seg_dcmqi_liver", "ct", "02.dcm"))
    assert image.geometry.size == (512, 512, 3)


def _liver() -> tuple[sitk.Image, sitk.Image]:
    """The liver slab CT and its mask as SimpleITK images."""
    ct = sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz")))
    mask = sitk.ReadImage(str(shared_path("ct", "liver_ts_example_ct_sm_livermask.nii.gz")))
    return ct, mask


def _centroid_lps(mask: Image) -> np.ndarray:
    """The LPS centroid of a binary mask's voxels."""
    z, y, x = np.nonzero(mask.array)
    return mask.geometry.index_to_lps(np.stack([x, y, z], axis=1)).mean(axis=0)


def _variants(image: sitk.Image) -> dict[str, sitk.Image]:
    """The same physical content stored with permuted/flipped axes and in RAS order."""
    return {
        "permuted_zxy.nrrd": sitk.PermuteAxes(image, [2, 0, 1]),
        "flipped_xz.nii.gz": sitk.Flip(image, [True, False, True]),
        "permuted_flipped.mha": sitk.Flip(sitk.PermuteAxes(image, [1, 2, 0]), [False, True, False]),
        "ras_stored.nii.gz": sitk.DICOMOrient(image, "RAS"),
    }


@pytest.mark.parametrize(
    "variant", ["permuted_zxy.nrrd", "flipped_xz.nii.gz", "permuted_flipped.mha", "ras_stored.nii.gz"]
)
def test_flipped_and_permuted_axes_keep_physical_content(tmp_path: Path, variant: str) -> None:
    """Written with other axis orders, the liver centroid and CT values at landmarks stay at the same LPS."""
    ct, mask = _liver()
    original = Image.from_sitk(ct)
    original_mask = Image.from_sitk(mask)
    centroid = _centroid_lps(original_mask)
    z, y, x = np.nonzero(original_mask.array)
    pick = np.linspace(0, len(x) - 1, 7).astype(int)
    landmarks = original.geometry.index_to_lps(np.stack([x[pick], y[pick], z[pick]], axis=1))
    values = original.array[z[pick], y[pick], x[pick]]

    write_image(Image.from_sitk(_variants(ct)[variant]), tmp_path / f"ct_{variant}")
    write_image(Image.from_sitk(_variants(mask)[variant]), tmp_path / f"mask_{variant}")
    ct2 = read_image(tmp_path / f"ct_{variant}")
    mask2 = read_image(tmp_path / f"mask_{variant}")

    if variant != "ras_stored.nii.gz":
        assert not np.allclose(ct2.geometry.direction, np.eye(3).ravel())
    else:
        assert np.allclose(ct2.geometry.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
    assert np.allclose(_centroid_lps(mask2), centroid, atol=1e-3)
    idx = ct2.geometry.lps_to_index(landmarks)
    assert np.max(np.abs(idx - np.round(idx))) < 1e-3
    r = np.round(idx).astype(int)
    assert np.array_equal(ct2.array[r[:, 2], r[:, 1], r[:, 0]], values)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_write_read_round_trip_keeps_voxels_and_geometry(tmp_path: Path) -> None:
    """write_image then read_image gives the same array, dtype and geometry."""
    ct, _ = _liver()
    image = Image.from_sitk(ct)
    out = write_image(image, tmp_path / "sub" / "ct.nrrd")
    back = read_image(out)
    assert back.array.dtype == image.array.dtype
    assert np.array_equal(back.array, image.array)
    assert np.allclose(back.geometry.origin_lps, image.geometry.origin_lps)
    assert np.allclose(back.geometry.spacing_mm, image.geometry.spacing_mm)


# ---- bad input ---------------------------------------------------------------------------------


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    """The message, checked to be one line that names the file."""
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    """Missing, corrupt and unsupported files are refused with the file named."""
    with pytest.raises(IkrError) as err:
        read_image(tmp_path / "missing.nii.gz")
    assert "no such file" in _one_line_naming(err, tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image at all" * 20)
    with pytest.raises(IkrError) as err:
        read_image(bad)
    assert "cannot read NIfTI" in _one_line_naming(err, bad)
    txt = tmp_path / "image.txt"
    txt.write_text("hello")
    with pytest.raises(IkrError) as err:
        read_image(txt)
    assert "unsupported image format" in _one_line_naming(err, txt)


def test_folder_without_dicom(tmp_path: Path) -> None:
    """A folder with no DICOM files is refused, named."""
    (tmp_path / "readme.md").write_text("nothing here")
    with pytest.raises(IkrError) as err:
        read_image(tmp_path)
    assert "no DICOM" in _one_line_naming(err, tmp_path)


def test_2d_and_vector_images_are_refused(tmp_path: Path) -> None:
    """A 2D image and a vector image are refused where a 3D scalar volume is needed."""
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16) + 1, str(flat))
    with pytest.raises(IkrError) as err:
        read_image(flat)
    assert "2D" in _one_line_naming(err, flat)
    vec = tmp_path / "vector.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(vec))
    with pytest.raises(IkrError) as err:
        read_image(vec)
    assert "vector image" in _one_line_naming(err, vec)


def test_constant_nan_and_empty_images_are_refused(tmp_path: Path) -> None:
    """Constant, non-finite and zero-size images are refused, naming the file."""
    const = tmp_path / "constant.mha"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16) + 7, str(const))
    with pytest.raises(IkrError) as err:
        read_image(const)
    assert "constant" in _one_line_naming(err, const)
    arr = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    nan_file = tmp_path / "nan.nrrd"  # ITK turns NaN in NIfTI into 0 on reading
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan_file))
    with pytest.raises(IkrError) as err:
        read_image(nan_file)
    assert "2 NaN or infinite" in _one_line_naming(err, nan_file)
    empty = Image(np.zeros((0, 4, 4), np.int16), Geometry((4, 4, 0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    with pytest.raises(IkrError, match="empty"):
        check_image(empty, tmp_path / "empty.nii")


def test_write_refuses_unknown_format_without_leaving_files(tmp_path: Path) -> None:
    """Writing to an unsupported format raises and leaves nothing behind."""
    image = Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), Geometry((3, 3, 3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    with pytest.raises(IkrError) as err:
        write_image(image, tmp_path / "out.mhd")
    _one_line_naming(err, tmp_path / "out.mhd")
    assert list(tmp_path.iterdir()) == []
