"""Segmentations: DICOM-SEG onto the referenced CT, Slicer .seg.nrrd, label maps, and bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.dicom import read_series
from ImplicitKernelRegistrationLib.io.segmentations import read_dicom_seg, read_labels, write_labels

ROUTINE_BRAIN = "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2"


def test_dcmqi_liver_seg_matches_the_nrrd_label_map() -> None:
    """The SEG's frames land on the referenced CT slices: equal to dcmqi's NRRD at the same positions."""
    base = shared_path("dicom", "seg_dcmqi_liver")
    masks = read_dicom_seg(base / "liver_seg.dcm", base / "ct")
    assert list(masks) == ["Liver"]
    liver = masks["Liver"]
    nrrd = Image.from_sitk(sitk.ReadImage(str(base / "liver_seg.nrrd")))
    points = nrrd.geometry.grid_points_lps().reshape(-1, 3)
    idx = liver.geometry.lps_to_index(points)
    assert np.max(np.abs(idx - np.round(idx))) < 1e-3
    r = np.round(idx).astype(int)
    assert np.all((r >= 0) & (r < np.array(liver.geometry.size)))
    assert np.array_equal(liver.array[r[:, 2], r[:, 1], r[:, 0]], nrrd.array.reshape(-1))
    assert liver.array.sum() == 36233 + 35645 + 35220


def test_read_labels_from_dicom_seg_with_a_reference_image() -> None:
    """read_labels turns a SEG into a label map with its segment names on the reference grid."""
    base = shared_path("dicom", "seg_dcmqi_liver")
    ct = read_series(base / "ct")
    labels, names = read_labels(base / "liver_seg.dcm", reference=ct)
    assert names == {1: "Liver"}
    assert labels.geometry == ct.geometry
    assert set(np.unique(labels.array)) == {0, 1}
    from_folder, folder_names = read_labels(base, reference=ct)  # the one SEG in the CT's folder
    assert folder_names == names and np.array_equal(from_folder.array, labels.array)
    with pytest.raises(IkrError, match="needs the image it segments"):
        read_labels(base / "liver_seg.dcm")


def _contiguous_ct(tmp_path: Path) -> Path:
    """A folder linking the 3 contiguous slices of the 4-slice CT the highdicom SEGs reference."""
    out = tmp_path / "ct"
    out.mkdir()
    for name in ("17136", "17166", "17196"):
        os.symlink(shared_path("dicom", "seg_highdicom_ct", "ct", name), out / name)
    return out


def test_overlap_seg_gives_two_overlapping_segments(tmp_path: Path) -> None:
    """The overlap SEG has 2 segments that overlap; its off-grid slice is refused unless dropped on request."""
    seg = shared_path("dicom", "seg_highdicom_ct", "seg_image_ct_binary_overlap.dcm")
    with pytest.raises(IkrError) as err:  # the full 4-slice CT has a 202 mm gap: not one volume
        read_dicom_seg(seg, shared_path("dicom", "seg_highdicom_ct", "ct"))
    assert ROUTINE_BRAIN in str(err.value) and "gap" in str(err.value)
    ref = read_series(_contiguous_ct(tmp_path))
    with pytest.raises(IkrError) as err:
        read_dicom_seg(seg, ref)
    assert str(seg) in str(err.value) and "does not lie on a slice" in str(err.value)
    masks = read_dicom_seg(seg, ref, drop_outside=True)
    assert list(masks) == ["first segment", "second segment"]
    first, second = (m.array for m in masks.values())
    assert first.shape == second.shape == (3, 16, 16)
    assert np.any(first & second)
    assert np.any(first & ~second.astype(bool))
    assert masks["first segment"].meta["frames_outside_reference"] == 2
    with pytest.raises(IkrError, match="overlap"):
        read_labels(seg, reference=ref)


@pytest.mark.parametrize("name", ["seg_image_ct_binary_fractional.dcm", "seg_image_ct_true_fractional.dcm"])
def test_fractional_segs_load_per_segment_in_unit_range(tmp_path: Path, name: str) -> None:
    """Fractional SEGs load as float masks with values in [0, 1] on the referenced slices."""
    seg = shared_path("dicom", "seg_highdicom_ct", name)
    masks = read_dicom_seg(seg, _contiguous_ct(tmp_path))
    assert len(masks) == 1
    mask = next(iter(masks.values()))
    assert mask.array.dtype == np.float32
    assert mask.array.min() >= 0.0 and 0.0 < mask.array.max() <= 1.0
    if "true" in name:
        assert np.any((mask.array > 0) & (mask.array < 1))


def test_binary_seg_lands_on_the_right_slices(tmp_path: Path) -> None:
    """A binary SEG's frames go to the reference slices with the same positions (checked via the source UIDs)."""
    import highdicom as hd

    seg_path = shared_path("dicom", "seg_highdicom_ct", "seg_image_ct_binary.dcm")
    ref = read_series(_contiguous_ct(tmp_path))
    mask = read_dicom_seg(seg_path, ref)["first segment"]
    seg = hd.seg.segread(seg_path)
    frames = seg.pixel_array
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        sop = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = ref.meta["sop_instance_uids"].index(str(sop))
        assert np.array_equal(mask.array[k], frames[f])


def test_seg_nrrd_round_trip_through_slicerio(tmp_path: Path) -> None:
    """write_labels writes a .seg.nrrd that slicerio reads back with the same names and voxel values."""
    labels, _ = read_labels(shared_path("ct", "liver_ts_example_ct_sm_labels117.nii.gz"))
    names = {5: "liver", 1: "spleen", 2: "kidney_right"}
    keep = np.where(np.isin(labels.array, list(names)), labels.array, 0).astype(np.uint8)
    image = labels.with_array(keep)
    out = write_labels(image, names, tmp_path / "organs.seg.nrrd")
    seg = slicerio.read_segmentation(str(out))
    assert {s["labelValue"]: s["name"] for s in seg["segments"]} == names
    assert np.array_equal(np.transpose(seg["voxels"], (2, 1, 0)), keep)
    assert np.allclose(seg["ijkToLPS"], image.geometry.index_to_lps_matrix())
    back, back_names = read_labels(out)
    assert back_names == names
    assert np.array_equal(back.array, keep)
    assert np.allclose(back.geometry.origin_lps, image.geometry.origin_lps)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_plain_label_map_round_trip(tmp_path: Path, suffix: str) -> None:
    """Plain label maps round-trip through NRRD and NIfTI; the 117-class map has 42 values incl. liver (5)."""
    labels, names = read_labels(shared_path("ct", "liver_ts_example_ct_sm_labels117.nii.gz"))
    assert len(np.unique(labels.array)) == 42 and len(names) == 41 and 5 in names  # 42 values incl. 0
    out = write_labels(labels, names, tmp_path / f"labels{suffix}")
    back, back_names = read_labels(out)
    assert np.array_equal(back.array, labels.array)
    assert back_names == names


def test_multi_layer_seg_nrrd(tmp_path: Path) -> None:
    """Segments in separate layers get their own labels when disjoint; overlapping ones are refused."""
    geometry = Geometry((6, 5, 4), (1.0, 1.0, 2.0), (10.0, 20.0, 30.0))
    a = np.zeros((6, 5, 4), np.uint8)  # (i, j, k) order, as slicerio stores voxels
    b = np.zeros_like(a)
    a[0:2] = 1
    b[4:6] = 1

    def write(layers: np.ndarray, name: str) -> Path:
        seg = slicerio.create_segmentation(a.shape, geometry.index_to_lps_matrix())
        seg["voxels"] = layers
        seg["segments"] = [
            {"id": "s1", "name": "left", "labelValue": 1, "layer": 0},
            {"id": "s2", "name": "right", "labelValue": 1, "layer": 1},
        ]
        slicerio.write_segmentation(str(tmp_path / name), seg)
        return tmp_path / name

    labels, names = read_labels(write(np.stack([a, b]), "disjoint.seg.nrrd"))
    assert names == {1: "left", 2: "right"}
    assert np.array_equal(labels.array, np.transpose(a + 2 * b, (2, 1, 0)))
    assert labels.geometry.size == (6, 5, 4)
    b[1:3] = 1
    path = write(np.stack([a, b]), "overlap.seg.nrrd")
    with pytest.raises(IkrError) as err:
        read_labels(path)
    assert str(path) in str(err.value) and "'left' and 'right' overlap" in str(err.value)


def test_label_map_resampled_onto_a_reference_grid() -> None:
    """With a reference on another grid, labels are resampled (nearest neighbour) onto it."""
    mask_path = shared_path("ct", "liver_ts_example_ct_sm_livermask.nii.gz")
    labels, _ = read_labels(mask_path)
    g = labels.geometry
    finer = Geometry(
        (g.size[0] * 2, g.size[1] * 2, g.size[2]), (1.5, 1.5, 3.0), tuple(np.array(g.origin_lps) - 0.75), g.direction
    )
    ref = Image(np.zeros(finer.shape_zyx, np.int16), finer)
    resampled, _ = read_labels(mask_path, reference=ref)
    assert resampled.geometry == finer
    assert resampled.array.sum() == pytest.approx(4 * labels.array.sum(), rel=0.01)


# ---- bad input ---------------------------------------------------------------------------------


def test_non_integer_and_negative_label_maps_are_refused(tmp_path: Path) -> None:
    """A float image with fractions or negative values is not a label map."""
    frac = tmp_path / "frac.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.linspace(0, 2, 64, dtype=np.float32).reshape(4, 4, 4)), str(frac))
    with pytest.raises(IkrError) as err:
        read_labels(frac)
    assert str(frac) in str(err.value) and "not integers" in str(err.value)
    neg = tmp_path / "neg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(-3, 61, dtype=np.int16).reshape(4, 4, 4)), str(neg))
    with pytest.raises(IkrError, match="negative"):
        read_labels(neg)


def test_corrupt_segmentations_are_refused(tmp_path: Path) -> None:
    """Corrupt .seg.nrrd and DICOM-SEG files give one-line messages naming them."""
    bad = tmp_path / "broken.seg.nrrd"
    bad.write_text("NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(IkrError) as err:
        read_labels(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    bad_seg = tmp_path / "broken_seg.dcm"
    bad_seg.write_bytes(b"\0" * 128 + b"DICM" + b"junk" * 10)
    with pytest.raises(IkrError) as err:
        read_dicom_seg(bad_seg, shared_path("dicom", "seg_dcmqi_liver", "ct"))
    assert str(bad_seg) in str(err.value)


def test_write_labels_refuses_float_labels_without_output(tmp_path: Path) -> None:
    """Float arrays are not written as label maps, and nothing is left behind."""
    image = Image(np.full((2, 2, 2), 0.5, np.float32), Geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    with pytest.raises(IkrError, match="non-negative integers"):
        write_labels(image, {1: "x"}, tmp_path / "x.seg.nrrd")
    assert list(tmp_path.iterdir()) == []
