"""The benchmark's convention check and tables (bench/), on the real liver slab; no registration runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_path
from ImplicitKernelRegistrationLib.core.fields import Field, warp_image
from ImplicitKernelRegistrationLib.io.images import read_image
from ImplicitKernelRegistrationLib.io.transforms import write_field

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from cases import TRANSLATION_MM, CaseSpec, build_translation_case  # noqa: E402
from report import ratios_table, values_table  # noqa: E402
from scoring import convention_check  # noqa: E402


@pytest.fixture(scope="module")
def translation_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The translation case written into a temporary work folder."""
    data = shared_path("ct", "liver_ts_example_ct_sm_3mm.nii.gz").parents[1]
    return build_translation_case(data, tmp_path_factory.mktemp("bench"))


def _constant_field(fixed_path: Path, shift_mm: np.ndarray, out: Path) -> Path:
    """A constant displacement field on the fixed grid, written as a vector NIfTI."""
    geometry = read_image(fixed_path).geometry
    field = Field(np.broadcast_to(shift_mm, (*geometry.shape_zyx, 3)).astype(np.float32).copy(), geometry)
    return write_field(field, out)


def test_translation_case_moves_anatomy_by_t(translation_case: Path) -> None:
    """The moving image is the fixed one shifted by +t: moving(p + t) == fixed(p) inside the image."""
    fixed = read_image(translation_case / "fixed.nii.gz")
    moving = read_image(translation_case / "moving.nii.gz")
    field = Field(np.broadcast_to(np.asarray(TRANSLATION_MM), (*fixed.geometry.shape_zyx, 3)).copy(), fixed.geometry)
    inner = (slice(3, -3), slice(5, -5), slice(5, -5))
    warped = warp_image(moving, field).array[inner].astype(float)
    original = fixed.array[inner].astype(float)
    unwarped = moving.array[inner].astype(float)
    aligned, misaligned = np.median(np.abs(warped - original)), np.median(np.abs(unwarped - original))
    assert aligned < 0.5 * misaligned, (aligned, misaligned)


def test_convention_check_passes_t_and_flags_minus_t(translation_case: Path, tmp_path: Path) -> None:
    """A field of +t passes; -t is reported as read the wrong way round; a swapped axis fails."""
    fixed = translation_case / "fixed.nii.gz"
    t = np.asarray(TRANSLATION_MM)
    good = convention_check(_constant_field(fixed, t, tmp_path / "good.nii.gz"), fixed)
    assert good["verdict"] == "pass"
    assert np.allclose(good["median_displacement_mm"], t, atol=1e-3)
    reversed_ = convention_check(_constant_field(fixed, -t, tmp_path / "rev.nii.gz"), fixed)
    assert reversed_["verdict"].startswith("FAIL: reversed")
    swapped = convention_check(_constant_field(fixed, t[::-1], tmp_path / "swap.nii.gz"), fixed)
    assert swapped["verdict"] == "FAIL: wrong"


def test_tables_show_ratios_to_the_default() -> None:
    """Ratios are taken against ikr-learned in the same case; unfinished runs show their status."""
    spec = CaseSpec("liver_ts_example_ct_sm_3mm.nii.gz", "sliding", 0)
    assert spec.name == "liver-sliding-s0" and spec.unseen == "family + CT"

    def row(method: str, mean: float, seconds: float) -> dict:
        tre = {"mean": mean, "sd": 1.0, "p50": mean, "p90": 2 * mean}
        jac = {"sdlogj": 0.1, "folding_percent": 0.0}
        return {"case": spec.name, "unseen": spec.unseen, "method": method, "status": "ok", "tre": tre,
                "jacobian": jac, "time_s": seconds, "memory_mb": 100.0, "device": "cpu"}  # fmt: skip

    rows = [row("ikr-learned", 1.0, 10.0), row("greedy", 2.0, 40.0)]
    rows.append({"case": spec.name, "unseen": spec.unseen, "method": "ants", "status": "failed", "reason": "boom"})
    ratios = ratios_table(rows)
    greedy_line = next(line for line in ratios.splitlines() if "| greedy |" in line)
    assert "| ikr-learned | 2.00 |" in greedy_line and "| 4.00 |" in greedy_line
    assert "failed: boom" in values_table(rows)


def test_tables_show_ikr_verdict_and_pleura_tre() -> None:
    """ikr's own quality verdict appears in its row, '—' in a peer's; the TRE near the pleura where a case has it."""
    tre = {"mean": 1.0, "sd": 0.5, "p50": 1.0, "p90": 2.0}
    base = {"case": "ev-thorax-sliding-s0", "unseen": "generator", "status": "ok", "tre": tre, "time_s": 1.0,
            "jacobian": {"sdlogj": 0.1, "folding_percent": 0.0}, "memory_mb": 100.0, "device": "cpu"}  # fmt: skip
    rows = [
        {**base, "method": "ikr-learned", "quality": {"verdict": "doubtful"}, "tre_pleura": {**tre, "mean": 1.23}},
        {**base, "method": "greedy", "tre_pleura": {**tre, "mean": 2.34}},
    ]
    table = values_table(rows)
    assert "TRE pleura" in table.splitlines()[0] and "verdict" in table.splitlines()[0]
    ikr_line = next(line for line in table.splitlines() if "| ikr-learned |" in line)
    greedy_line = next(line for line in table.splitlines() if "| greedy |" in line)
    assert "| 1.23 |" in ikr_line and "| doubtful |" in ikr_line
    assert "| 2.34 |" in greedy_line and "| — |" in greedy_line


def test_case_sets_have_distinct_names_and_the_clean_set_is_named_and_seeded_apart() -> None:
    from cases import CASE_SETS, CLEAN_CASES, INDEPENDENT_CASES, QUICK_SETS

    names = [spec.name for specs in CASE_SETS.values() for spec in specs]
    assert len(names) == len(set(names))  # one folder per case under bench/work/cases
    assert set(QUICK_SETS) == set(CASE_SETS)
    assert {(s.ct, s.kind) for s in CLEAN_CASES} == {(s.ct, s.kind) for s in INDEPENDENT_CASES}
    for spec in CLEAN_CASES:
        assert spec.clean and spec.set == "clean" and spec.name.endswith(f"-s{spec.seed}-clean")
        assert spec.seed not in {s.seed for s in INDEPENDENT_CASES}  # other deformations, not the same ones


def test_a_clean_case_keeps_the_ct_as_its_fixed_image_and_has_no_intensity_model(tmp_path: Path) -> None:
    from cases import CLEAN_CASES, LIVER, load_case

    ct_path = shared_path("ct", LIVER)
    spec = next(s for s in CLEAN_CASES if s.ct == LIVER and s.kind == "local")
    case = load_case(spec.build(ct_path.parents[1], tmp_path))
    ct = read_image(ct_path)
    np.testing.assert_array_equal(case.fixed.array, ct.array.astype(case.fixed.array.dtype))  # no noise added
    assert case.params["intensity_params"] == {}
    assert len(case.landmarks_fixed_lps) > 0
