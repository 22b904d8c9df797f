"""`run_margin`: the report folder, margin.json keys, the .vtp/.csv files, PHI, bad input; the demo pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_path
from ImplicitKernelRegistrationLib import __version__
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.fields import Field
from ImplicitKernelRegistrationLib.core.geometry import Geometry, Image
from ImplicitKernelRegistrationLib.io.images import read_image, write_image
from ImplicitKernelRegistrationLib.io.points import read_points
from ImplicitKernelRegistrationLib.io.transforms import write_field
from ImplicitKernelRegistrationLib.review.margin import compute_margin
from ImplicitKernelRegistrationLib.review.margin_report import run_margin
from ImplicitKernelRegistrationLib.synthetic.tumour import ball_occupancy, demo_tumour_and_zone

KEYS = [
    "min_margin_mm", "margin_p5_mm", "margin_p25_mm", "margin_p50_mm", "surface_fraction_ge_0mm",
    "surface_fraction_ge_5mm", "outside_volume_ml", "coverage_percent", "min_margin_point_lps",
]  # fmt: skip
G = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (-20.0, -20.0, -20.0))


def ball(centre: tuple[float, float, float], radius: float, g: Geometry = G) -> Image:
    """A uint8 ball on a grid."""
    inside = np.linalg.norm(g.grid_points_lps() - np.asarray(centre), axis=-1) <= radius
    return Image(inside.astype(np.uint8), g)


@pytest.fixture
def masks(tmp_path: Path) -> tuple[Path, Path]:
    """A tumour (r 8, shifted 3 mm in x) and an ablation zone (r 14) written as NRRD label maps."""
    return write_image(ball((3, 0, 0), 8), tmp_path / "tumour.nrrd"), write_image(
        ball((0, 0, 0), 14), tmp_path / "zone.nrrd"
    )


def test_report_folder(tmp_path: Path, masks: tuple[Path, Path]) -> None:
    field = Field(np.broadcast_to(np.array([1.0, 0, 0], np.float32), (*G.shape_zyx, 3)).copy(), G)
    transform = write_field(field, tmp_path / "field.nii.gz")
    out = tmp_path / "report"
    summary = run_margin(masks[0], masks[1], transform, out, thresholds_mm=(0.0, 2.5, 5.0))
    data = json.loads((out / "margin.json").read_text())
    assert all(k in data for k in KEYS) and "surface_fraction_ge_2.5mm" in data
    assert data == json.loads(json.dumps(summary))
    assert data["min_margin_mm"] == pytest.approx(14 - 8 - 2, abs=0.5)  # tumour at x = 3 - 1 in fixed space
    assert data["software_version"] == __version__
    assert data["inputs"] == {"tumour": "tumour.nrrd", "ablation": "zone.nrrd", "transform": "field.nii.gz"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "tumour.nrrd" in page and __version__ in page
    points = read_points(out / "margin_points.csv")
    margins = np.asarray(points.extra["margin_mm"], dtype=float)
    assert len(margins) == data["n_surface_points"] and margins.min() == pytest.approx(data["min_margin_mm"], abs=1e-3)
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(out / "tumour_surface_margin.vtp"))
    reader.Update()
    poly = reader.GetOutput()
    assert poly.GetNumberOfPoints() == len(margins)
    assert poly.GetFieldData().GetAbstractArray("SPACE").GetValue(0) == "LPS"
    assert poly.GetPointData().GetScalars().GetName() == "margin_mm"
    warped = read_image(out / "tumour_warped.nii.gz")
    assert warped.geometry.size == G.size and warped.array.sum() > 1500
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_inputs_leave_no_report(tmp_path: Path, masks: tuple[Path, Path]) -> None:
    empty = write_image(Image(np.zeros(G.shape_zyx, np.uint8), G), tmp_path / "empty.nrrd")
    out = tmp_path / "report"
    with pytest.raises(IkrError, match="empty.nrrd: the ablation-zone mask is empty"):
        run_margin(masks[0], empty, None, out)
    other = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (-10.0, -20.0, -20.0))
    ct = write_image(Image(np.arange(64000, dtype=np.int16).reshape(40, 40, 40), other), tmp_path / "pre.nrrd")
    with pytest.raises(IkrError, match="tumour.nrrd: the tumour mask's grid .* does not match"):
        run_margin(masks[0], masks[1], None, out, pre_image_path=ct)
    far = Field(np.broadcast_to(np.array([0, 0, 60.0], np.float32), (*G.shape_zyx, 3)).copy(), G)
    with pytest.raises(IkrError, match="field of view"):
        run_margin(masks[0], masks[1], write_field(far, tmp_path / "far.nii.gz"), out)
    assert not out.exists()


def test_include_phi(tmp_path: Path) -> None:
    folder = shared_path("dicom", "ct_phantom_j2k_lossless")
    ct = read_image(folder)
    centre = ct.geometry.index_to_lps(((np.asarray(ct.geometry.size) - 1) / 2.0)[None])[0]
    tumour = write_image(Image((ball_occupancy(ct.geometry, centre, 12) >= 0.5).astype(np.uint8), ct.geometry),
                         tmp_path / "t.nrrd")  # fmt: skip
    zone = write_image(Image((ball_occupancy(ct.geometry, centre, 25) >= 0.5).astype(np.uint8), ct.geometry),
                       tmp_path / "a.nrrd")  # fmt: skip
    hidden = run_margin(tumour, zone, None, tmp_path / "plain", post_image_path=folder)
    shown = run_margin(tumour, zone, None, tmp_path / "phi", include_phi=True, post_image_path=folder)  # fmt: skip
    assert "patient" not in hidden and shown["patient"] == {"PatientName": "HEAD", "PatientID": "PLASTIC"}
    assert "PLASTIC" not in (tmp_path / "plain" / "report.html").read_text()
    assert "PLASTIC" not in (tmp_path / "plain" / "margin.json").read_text()
    assert "PLASTIC" in (tmp_path / "phi" / "report.html").read_text()
    assert shown["min_margin_mm"] == hidden["min_margin_mm"] > 0


def test_demo_pair_reproduces_true_margin() -> None:
    ct = read_image(shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz"))
    liver = read_image(shared_path("ct", "liver_ts_example_ct_sm_livermask.nii.gz"))
    g = ct.geometry
    pts = g.grid_points_lps()
    d = np.zeros((*g.shape_zyx, 3), np.float32)  # a smooth, invertible warp of up to 4 mm
    d[..., 0] = 4.0 * np.sin(pts[..., 1] / 40.0)
    d[..., 2] = 3.0 * np.cos(pts[..., 0] / 50.0)
    field = Field(d, g)
    tumour, zone, true_margin = demo_tumour_and_zone(ct, field, liver, seed=3)
    assert 3.0 <= true_margin <= 6.0 and tumour.geometry == g and zone.geometry == g
    centre = np.average(pts[zone.array > 0.5], axis=0)
    assert liver.array[tuple(np.rint(g.lps_to_index(centre[None])[0][::-1]).astype(int))] > 0
    measured = compute_margin(tumour, zone, field)
    assert measured.min_margin_mm == pytest.approx(true_margin, abs=0.6)
    assert compute_margin(tumour, zone, None).min_margin_mm != pytest.approx(true_margin, abs=0.6)


def test_transform_file_with_affine(tmp_path: Path, masks: tuple[Path, Path]) -> None:
    transform = sitk.TranslationTransform(3, (-2.0, 0.0, 0.0))
    sitk.WriteTransform(transform, str(tmp_path / "shift.tfm"))
    data = run_margin(masks[0], masks[1], tmp_path / "shift.tfm", tmp_path / "out")
    assert data["min_margin_mm"] == pytest.approx(14 - 8 - 5, abs=0.5)  # fixed p -> moving p - 2: tumour at x = 5
