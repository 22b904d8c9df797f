"""Point sets: round trips through CSV, .mrk.json and .fcsv, RAS/LPS, DIR-Lab voxels, pairing, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.errors import IkrError
from ImplicitKernelRegistrationLib.core.geometry import Geometry, lps_ras
from ImplicitKernelRegistrationLib.io.points import (
    MARKUPS_SCHEMA_URL,
    PointSet,
    check_points_inside,
    pair_points,
    read_dirlab_points,
    read_point_pairs,
    read_points,
    write_points,
)

POINTS = np.array([[-12.5, 40.25, -101.0], [3.0, -7.125, 55.5], [100.0, 0.0, 1e-3]])
LABELS = ["carina", "nodule, left", 'rib "7"']
SLICERIO_FCSV = Path(slicerio.__file__).parent / "data" / "F_1.fcsv"


def _point_set() -> PointSet:
    """Three labelled points with awkward labels (comma, quotes)."""
    return PointSet(POINTS.copy(), list(LABELS))


def _write(path: Path, text: str) -> Path:
    """Write a small test file and return its path."""
    path.write_text(text, encoding="utf-8")
    return path


def _tilted_geometry() -> Geometry:
    """A grid with anisotropic spacing, an off-origin corner and a rotated, z-flipped direction."""
    c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]])
    return Geometry((40, 30, 20), (0.8, 0.9, 2.5), (-30.0, 10.0, 60.0), tuple(direction.ravel()))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["p.csv", "p.mrk.json", "p.fcsv"])
@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_round_trip_keeps_lps_points_and_labels(tmp_path: Path, name: str, system: str) -> None:
    """Writing in LPS or RAS and reading back gives the same LPS points and labels in every format."""
    path = write_points(_point_set(), tmp_path / name, coordinate_system=system)
    back = read_points(path)
    np.testing.assert_allclose(back.points_lps, POINTS, rtol=0, atol=1e-12)
    assert back.labels == LABELS
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


def test_ras_markups_file_stores_ras_numbers(tmp_path: Path) -> None:
    """A point written as RAS markups holds (-L, -P, S) in the file and reads back as the LPS point."""
    path = write_points(_point_set(), tmp_path / "r.mrk.json", coordinate_system="RAS")
    markup = json.loads(path.read_text())["markups"][0]
    assert markup["coordinateSystem"] == "RAS"
    np.testing.assert_allclose(markup["controlPoints"][0]["position"], [12.5, -40.25, -101.0])
    np.testing.assert_allclose(read_points(path).points_lps[0], POINTS[0])


def test_written_markups_follow_the_slicer_schema(tmp_path: Path) -> None:
    """Our .mrk.json has the fields and value sets markups-schema-v1.0.3 requires of a point list."""
    doc = json.loads(write_points(_point_set(), tmp_path / "s.mrk.json").read_text())
    assert doc["@schema"] == MARKUPS_SCHEMA_URL and "markups-schema-v1.0.3.json" in doc["@schema"]
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] in ("LPS", "RAS") and markup["coordinateUnits"] == "mm"
    for cp in markup["controlPoints"]:
        assert isinstance(cp["id"], str) and isinstance(cp["label"], str)
        assert len(cp["position"]) == 3 and all(isinstance(v, float) for v in cp["position"])
        assert cp["positionStatus"] in ("undefined", "preview", "defined")
        assert all(isinstance(cp[k], bool) for k in ("selected", "locked", "visibility"))


def test_slicer_control_point_table_csv_in_ras_is_converted(tmp_path: Path) -> None:
    """Slicer's control-point table export (label,r,a,s,defined,...) reads as LPS; unplaced rows set aside."""
    text = (
        "label,r,a,s,defined,selected,visible,locked,description\n"
        "A,1.5,-2.0,3.0,1,1,1,0,first\n"
        "B,,,,0,1,1,0,not placed\n"
        "C,-4.0,5.0,-6.0,1,1,1,0,\n"
    )
    ps = read_points(_write(tmp_path / "table.csv", text))
    np.testing.assert_allclose(ps.points_lps, [[-1.5, 2.0, 3.0], [4.0, -5.0, -6.0]])
    assert ps.labels == ["A", "C"] and ps.undefined_labels == ["B"]
    assert ps.extra["description"] == ["first", ""]


def test_csv_extra_columns_survive_a_round_trip(tmp_path: Path) -> None:
    """Columns other than coordinates and label come back unchanged; CSV without labels gets 1..N."""
    text = "x,y,z,confidence\n1,2,3,0.9\n4,5,6,0.5\n"
    ps = read_points(_write(tmp_path / "c.csv", text))
    assert ps.labels == ["1", "2"] and ps.extra == {"confidence": ["0.9", "0.5"]}
    back = read_points(write_points(ps, tmp_path / "c2.csv"))
    assert back.extra == ps.extra
    np.testing.assert_array_equal(back.points_lps, [[1, 2, 3], [4, 5, 6]])


def test_point_pairs_csv_is_read_with_labels(tmp_path: Path) -> None:
    """A pair CSV (fixed_x..moving_z,label, LPS mm) gives the fixed and moving points and their labels."""
    text = "fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z,label\n1,2,3,2,0,3.5,a\n-4,5,6,-3,3,6.5,b\n"
    f2, m2 = read_point_pairs(_write(tmp_path / "pairs.csv", text))
    np.testing.assert_allclose(f2.points_lps, [[1, 2, 3], [-4, 5, 6]], atol=1e-12)
    np.testing.assert_allclose(m2.points_lps, [[2, 0, 3.5], [-3, 3, 6.5]], atol=1e-12)
    assert f2.labels == m2.labels == ["a", "b"]


# ---------------------------------------------------------------- Slicer files and slicerio


def test_real_slicer_fcsv_agrees_with_slicerio() -> None:
    """A real Slicer 5 .fcsv (slicerio's sample, trailing status columns) reads as slicerio reads it."""
    if not SLICERIO_FCSV.exists():
        pytest.skip(f"slicerio's sample {SLICERIO_FCSV} is absent")
    ours = read_points(SLICERIO_FCSV)
    theirs = slicerio.read_markups_fcsv(SLICERIO_FCSV)["markups"][0]
    assert theirs["coordinateSystem"] == "LPS"
    np.testing.assert_allclose(ours.points_lps, [cp["position"] for cp in theirs["controlPoints"]])
    assert ours.labels == [cp["label"] for cp in theirs["controlPoints"]]
    assert ours.extra["description"][1] == "Some description"


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_slicerio_reads_our_fcsv_in_the_stated_system(tmp_path: Path, system: str) -> None:
    """slicerio reads our .fcsv with the same coordinate system, positions and labels we wrote."""
    labels = ["F-1", "carina left", "T7"]  # slicerio splits on every comma, so no commas here
    path = write_points(PointSet(POINTS.copy(), labels), tmp_path / "ours.fcsv", coordinate_system=system)
    markup = slicerio.read_markups_fcsv(path)["markups"][0]
    assert markup["coordinateSystem"] == system
    positions = np.array([cp["position"] for cp in markup["controlPoints"]])
    np.testing.assert_allclose(positions, POINTS if system == "LPS" else lps_ras(POINTS))
    assert [cp["label"] for cp in markup["controlPoints"]] == labels


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_slicerio_markups_json_agrees_with_ours(tmp_path: Path, system: str) -> None:
    """slicerio's .mrk.json (converted from our .fcsv) reads as our points, and matches our JSON's fields."""
    plain = PointSet(POINTS.copy(), ["F-1", "F-2", "F-3"])
    fcsv = write_points(plain, tmp_path / "a.fcsv", coordinate_system=system)
    theirs_path = slicerio.fcsv_to_markups_json(fcsv, tmp_path / "theirs.mrk.json")
    theirs = read_points(theirs_path)
    np.testing.assert_allclose(theirs.points_lps, POINTS)
    assert theirs.labels == plain.labels
    ours = json.loads(write_points(plain, tmp_path / "ours.mrk.json", coordinate_system=system).read_text())
    their_doc = json.loads(Path(theirs_path).read_text())
    assert ours["@schema"] == their_doc["@schema"]
    ours_m, theirs_m = ours["markups"][0], their_doc["markups"][0]
    assert (ours_m["type"], ours_m["coordinateSystem"]) == (theirs_m["type"], theirs_m["coordinateSystem"])
    np.testing.assert_allclose(
        [cp["position"] for cp in ours_m["controlPoints"]],
        [cp["position"] for cp in theirs_m["controlPoints"]],
    )


def test_markups_without_coordinate_system_are_lps(tmp_path: Path) -> None:
    """A .mrk.json with no coordinateSystem is LPS, as Slicer's JSON reader and the schema default say."""
    doc = {
        "@schema": MARKUPS_SCHEMA_URL,
        "markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2, 3]}]}],
    }
    ps = read_points(_write(tmp_path / "old.mrk.json", json.dumps(doc)))
    np.testing.assert_array_equal(ps.points_lps, [[1, 2, 3]])
    assert ps.labels == ["1"]


def test_fcsv_without_coordinate_system_line_is_ras(tmp_path: Path) -> None:
    """An old .fcsv with no CoordinateSystem line is RAS; '1' means LPS (Slicer's old numbering)."""
    rows = "# Markups fiducial file version = 4.6\n1,10,20,30,0,0,0,1,1,1,0,A,,\n"
    np.testing.assert_array_equal(read_points(_write(tmp_path / "a.fcsv", rows)).points_lps, [[-10, -20, 30]])
    numbered = rows.replace("4.6\n", "4.6\n# CoordinateSystem = 1\n")
    np.testing.assert_array_equal(read_points(_write(tmp_path / "b.fcsv", numbered)).points_lps, [[10, 20, 30]])


def test_markups_reads_first_point_list_and_skips_unplaced_points(tmp_path: Path) -> None:
    """Among several markups the first point list is read; undefined points go to undefined_labels."""
    points = [
        {"label": "a", "position": [1, 2, 3], "positionStatus": "defined"},
        {"label": "b", "position": [0, 0, 0], "positionStatus": "undefined"},
        {"label": "c", "positionStatus": "defined"},
        {"label": "d", "position": [4, 5, 6]},
    ]
    doc = {
        "@schema": MARKUPS_SCHEMA_URL,
        "markups": [
            {"type": "Line", "controlPoints": [{"position": [9, 9, 9]}]},
            {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": points},
            {"type": "Fiducial", "controlPoints": [{"position": [7, 7, 7]}]},
        ],
    }
    ps = read_points(_write(tmp_path / "multi.mrk.json", json.dumps(doc)))
    np.testing.assert_array_equal(ps.points_lps, [[-1, -2, 3], [-4, -5, 6]])
    assert ps.labels == ["a", "d"] and ps.undefined_labels == ["b", "c"]
    with pytest.raises(IkrError, match="by label"):
        pair_points(ps, ps, by="order")


def test_format_is_found_from_content_without_a_known_suffix(tmp_path: Path) -> None:
    """A markups file and a headed CSV saved under odd suffixes are still recognised."""
    json_path = tmp_path / "points.dat"
    json_path.write_text(write_points(_point_set(), tmp_path / "x.mrk.json").read_text())
    np.testing.assert_allclose(read_points(json_path).points_lps, POINTS)
    csv_txt = _write(tmp_path / "landmarks.txt", "label,x,y,z\nA,1,2,3\n")
    np.testing.assert_array_equal(read_points(csv_txt).points_lps, [[1, 2, 3]])


def test_semicolon_and_tab_separated_tables_are_read(tmp_path: Path) -> None:
    """Spreadsheet exports with semicolons, and .tsv files, read like comma CSV."""
    expected = [[1.5, 2.0, 3.0], [4.0, 5.0, 6.0]]
    semi = read_points(_write(tmp_path / "s.csv", "label;x;y;z\nA;1.5;2;3\nB;4;5;6\n"))
    tab = read_points(_write(tmp_path / "t.tsv", "label\tx\ty\tz\nA\t1.5\t2\t3\nB\t4\t5\t6\n"))
    for ps in (semi, tab):
        np.testing.assert_array_equal(ps.points_lps, expected)
        assert ps.labels == ["A", "B"]


# ---------------------------------------------------------------- DIR-Lab voxels and the image


def test_dirlab_indices_map_through_a_tilted_geometry(tmp_path: Path) -> None:
    """1-based DIR-Lab indices land where SimpleITK puts index - 1 on a rotated, flipped grid."""
    geometry = _tilted_geometry()
    path = _write(tmp_path / "case_300_T00_xyz.txt", "1\t1\t1\n40\t 30\t 20\n12 7 5\n")
    ps = read_points(path, geometry)
    image = geometry.reference_image()
    for got, idx in zip(ps.points_lps, [(0, 0, 0), (39, 29, 19), (11, 6, 4)], strict=True):
        np.testing.assert_allclose(got, image.TransformIndexToPhysicalPoint(idx), atol=1e-9)


def test_dirlab_flip_z_counts_slices_from_the_other_end(tmp_path: Path) -> None:
    """With flip_z, slice z lands on grid slice size_z - z (index 0-based), x and y unchanged."""
    geometry = _tilted_geometry()
    path = _write(tmp_path / "lm.txt", "3 4 1\n3 4 20\n")
    flipped = read_dirlab_points(path, geometry, flip_z=True)
    expected = geometry.index_to_lps(np.array([[2, 3, 19], [2, 3, 0]], dtype=float))
    np.testing.assert_allclose(flipped.points_lps, expected, atol=1e-9)
    np.testing.assert_allclose(read_points(path, geometry, dirlab_flip_z=True).points_lps, expected)


def test_dirlab_on_a_real_ct_grid(tmp_path: Path) -> None:
    """On the real POPI thorax grid, the centre voxel index converts to SimpleITK's physical point."""
    ct = shared_path("ct", "thorax_popi_T00_1p5mm.nii.gz")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct))
    reader.ReadImageInformation()
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    geometry = Geometry(
        tuple(int(v) for v in reader.GetSize()),
        reader.GetSpacing(),
        reader.GetOrigin(),
        reader.GetDirection(),
    )
    centre = [s // 2 for s in geometry.size]
    ps = read_points(_write(tmp_path / "c.txt", " ".join(str(c + 1) for c in centre) + "\n"), geometry)
    np.testing.assert_allclose(ps.points_lps[0], image.TransformIndexToPhysicalPoint(centre), atol=1e-6)


def test_points_outside_the_image_are_refused(tmp_path: Path) -> None:
    """A landmark beyond the grid raises an error naming the file and the point's label."""
    geometry = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    path = _write(tmp_path / "p.csv", "label,x,y,z\ninside,5,5,5\nfar,5,5,50\n")
    with pytest.raises(IkrError, match="1 of 2 points lie outside.*'far'") as err:
        read_points(path, geometry)
    assert str(path) in str(err.value)
    with pytest.raises(IkrError, match="outside"):
        read_points(_write(tmp_path / "d.txt", "1 1 11\n"), geometry)
    check_points_inside(np.array([[9.4, 0, -0.4]]), geometry, path)  # within half a voxel: accepted


# ---------------------------------------------------------------- pairing


def test_pair_by_label_reorders_moving_points() -> None:
    """Pairing by label follows the fixed order whatever the moving order is."""
    fixed = PointSet([[0, 0, 0], [1, 1, 1]], ["a", "b"])
    moving = PointSet([[11, 11, 11], [10, 10, 10]], ["b", "a"])
    f, m, labels = pair_points(fixed, moving, by="label")
    np.testing.assert_array_equal(m, [[10, 10, 10], [11, 11, 11]])
    assert labels == ["a", "b"]


def test_pair_by_order_pairs_index_with_index() -> None:
    """Pairing by order keeps both orders and the fixed labels."""
    fixed, moving = PointSet([[0, 0, 0], [1, 1, 1]]), PointSet([[5, 5, 5], [6, 6, 6]], ["x", "y"])
    f, m, labels = pair_points(fixed, moving)
    np.testing.assert_array_equal(m, moving.points_lps)
    assert labels == ["1", "2"]


@pytest.mark.parametrize(
    ("fixed_labels", "moving_labels", "by", "message"),
    [
        (["a", "b"], ["a"], "order", "2 fixed points but 1 moving"),
        (["a", "b"], ["a", "c"], "label", r"no moving partner: \['b'\].*no fixed partner: \['c'\]"),
        (["a", "a"], ["a", "b"], "label", "fixed list has the label 'a' more than once"),
        (["a"], ["a", "a"], "label", "moving list has the label 'a' more than once"),
        (["a"], ["a"], "nearest", "unknown pairing"),
    ],
)
def test_pairing_errors_are_clear(fixed_labels: list[str], moving_labels: list[str], by: str, message: str) -> None:
    """Missing partners, duplicate labels, different counts and unknown modes each say what is wrong."""
    fixed = PointSet(np.zeros((len(fixed_labels), 3)), fixed_labels)
    moving = PointSet(np.ones((len(moving_labels), 3)), moving_labels)
    with pytest.raises(IkrError, match=message):
        pair_points(fixed, moving, by=by)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("e.csv", "", "the file is empty"),
        ("comments.dat", "# only a comment\n", "the file is empty"),
        ("h.csv", "label,x,y,z\n", "only a header"),
        ("c.csv", "x,y,z\n1,2,3\n4,5\n", "line 3: expected 3 columns"),
        ("n.csv", "x,y,z\n1,2,3\n4,abc,6\n", "line 3: column 'y' value 'abc' is not a number"),
        ("nan.csv", "x,y,z\n1,nan,3\n", "line 2: column 'y' value 'nan' is not finite"),
        ("inf.csv", "x,y,z\n1,2,-inf\n", "line 2: column 'z' value '-inf' is not finite"),
        ("cols.csv", "a,b,c\n1,2,3\n", "must name the columns x,y,z"),
        (
            "pairs.csv",
            ",".join(["fixed_x", "fixed_y", "fixed_z", "moving_x", "moving_y", "moving_z"]) + "\n1,2,3,4,5,6\n",
            "read_point_pairs",
        ),
        ("d.txt", "1 2 3\n4 5\n", "line 2: expected 3 voxel indices"),
        ("t.txt", "1 2 3\n4 x 6\n", "line 2: value 'x' is not a number"),
        ("j.mrk.json", "{not json", "not valid JSON"),
        ("k.mrk.json", '{"name": "a scene", "nodes": []}', "not a Slicer markups file"),
        ("l.mrk.json", '{"markups": [{"type": "Line", "controlPoints": []}]}', "no point list.*Line"),
        (
            "s.mrk.json",
            '{"markups": [{"type": "Fiducial", "coordinateSystem": "IJK", "controlPoints": []}]}',
            "unknown coordinate system 'IJK'",
        ),
        (
            "u.mrk.json",
            '{"markups": [{"type": "Fiducial", "coordinateUnits": "um", "controlPoints": []}]}',
            "only mm",
        ),
        (
            "p.mrk.json",
            '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, "2", 3]}]}]}',
            "control point 1.*not a number",
        ),
        (
            "q.mrk.json",
            '{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}',
            "list of 3 numbers",
        ),
        (
            "r.mrk.json",
            '{"markups": [{"type": "Fiducial", "controlPoints": [{"positionStatus": "undefined"}]}]}',
            "no placed",
        ),
        ("f.fcsv", "# CoordinateSystem = IJK\n1,1,2,3\n", "line 1: unknown coordinate system"),
        ("g.fcsv", "# CoordinateSystem = LPS\n1,1,zz,3\n", "line 2: column 'y' value 'zz' is not a number"),
        ("h.fcsv", "# CoordinateSystem = LPS\n1,1,2\n", "line 2: expected at least id,x,y,z"),
    ],
)
def test_bad_files_raise_ikr_error_naming_file_and_problem(tmp_path: Path, name: str, text: str, message: str) -> None:
    """Each malformed file raises IkrError whose message starts with the path and says what is wrong."""
    path = _write(tmp_path / name, text)
    geometry = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(IkrError, match=message) as err:
        read_points(path, geometry if name.endswith(".txt") else None)
    assert str(err.value).startswith(f"{path}: ")


def test_missing_file_and_missing_geometry_are_refused(tmp_path: Path) -> None:
    """A missing file, and DIR-Lab voxels without a geometry, raise IkrError naming the file."""
    with pytest.raises(IkrError, match="no such file"):
        read_points(tmp_path / "absent.csv")
    path = _write(tmp_path / "v.txt", "1 2 3\n")
    with pytest.raises(IkrError, match="image geometry is needed") as err:
        read_points(path)
    assert str(path) in str(err.value)


def test_pair_csv_errors(tmp_path: Path) -> None:
    """A pair CSV missing moving columns, or with a non-numeric value, is refused with the line."""
    with pytest.raises(IkrError, match="missing"):
        read_point_pairs(_write(tmp_path / "a.csv", "fixed_x,fixed_y,fixed_z\n1,2,3\n"))
    header = "fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\n"
    with pytest.raises(IkrError, match="line 3: column 'moving_y'"):
        read_point_pairs(_write(tmp_path / "b.csv", header + "1,2,3,4,5,6\n1,2,3,4,?,6\n"))


def test_writes_refuse_bad_requests_and_leave_no_file(tmp_path: Path) -> None:
    """An unknown coordinate system or an unknown suffix writes nothing."""
    with pytest.raises(IkrError, match="unknown coordinate system"):
        write_points(_point_set(), tmp_path / "a.mrk.json", coordinate_system="XYZ")
    with pytest.raises(IkrError, match=r"\.csv, \.mrk\.json or \.fcsv"):
        write_points(_point_set(), tmp_path / "a.vtk")
    assert list(tmp_path.iterdir()) == []
