"""Every Slicer API the Slicer module uses is in the checked manifest (Testing/slicer_api_manifest.json).

The manifest is written by scripts/check_slicer_api.py, which looks each name up in Slicer's own sources (and
records the oldest release that has it). These tests need neither Slicer nor its sources: they re-extract the
module's Slicer-facing names with the script's own `extract_slicer_api` and compare them with the manifest, so
a new Slicer call fails CI until someone has run the script and checked it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_slicer_api.py"
MANIFEST = ROOT / "Testing" / "slicer_api_manifest.json"
RERUN = "run `python scripts/check_slicer_api.py` (needs a git clone of Slicer) and review the manifest"


def _checker() -> ModuleType:
    """scripts/check_slicer_api.py imported by path (it is not part of the installed package)."""
    if "check_slicer_api" not in sys.modules:
        spec = importlib.util.spec_from_file_location("check_slicer_api", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["check_slicer_api"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["check_slicer_api"]


@pytest.fixture(scope="module")
def used() -> dict[tuple[str, str], set[str]]:
    """(kind, name) of every Slicer-facing name the module uses -> keyword arguments it passes."""
    return _checker().module_api(ROOT)


@pytest.fixture(scope="module")
def manifest() -> dict:
    """The checked manifest."""
    return json.loads(MANIFEST.read_text())


def _entries(manifest: dict) -> dict[tuple[str, str], dict]:
    """Manifest entries by (kind, name)."""
    return {(a["kind"], a["name"]): a for a in manifest["apis"]}


def test_manifest_is_for_this_module(manifest: dict) -> None:
    """The manifest names the module file and the Slicer sources it was checked against."""
    checker = _checker()
    assert manifest["module"] == checker.MODULE_REL
    assert manifest["slicer_source"].startswith("Slicer/Slicer "), manifest["slicer_source"]
    assert len(manifest["apis"]) == len(_entries(manifest)), "duplicate (kind, name) entries in the manifest"
    for entry in manifest["apis"]:
        assert entry["kind"] in checker.KINDS, entry
        assert entry["status"] in ("found", "NOT FOUND"), entry


def test_extraction_finds_each_kind_of_slicer_name() -> None:
    """The extraction sees chains, imports, class strings, node IDs, methods and inherited members; not Qt/numpy."""
    source = """
import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

class W(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ScriptedLoadableModuleWidget.__init__(self)
        self.local = 1
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.setup)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLModelNode", "name")
        node.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
        slicer.util.addVolumeFromArray(np.zeros(3), name="v", nodeClassName="vtkMRMLLabelMapVolumeNode")
        qt.QTableWidgetItem("x").setText("y")
        np.Something(self.local)
        if self.parent.isEntered:
            self.assertTrue(True)
"""
    got = _checker().extract_slicer_api(source)
    assert got == {
        ("import", "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget"): set(),
        ("import", "slicer.util.VTKObservationMixin"): set(),
        ("slicer-attribute", "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.setup"): set(),
        ("slicer-attribute", "slicer.mrmlScene"): set(),
        ("slicer-attribute", "slicer.mrmlScene.EndCloseEvent"): set(),
        ("slicer-attribute", "slicer.mrmlScene.AddNewNodeByClass"): set(),
        ("slicer-attribute", "slicer.util.addVolumeFromArray"): {"name", "nodeClassName"},
        ("node-class", "vtkMRMLModelNode"): set(),
        ("node-class", "vtkMRMLLabelMapVolumeNode"): set(),
        ("node-id", "vtkMRMLColorTableNodeRainbow"): set(),
        ("method", "GetDisplayNode"): set(),
        ("method", "SetAndObserveColorNodeID"): set(),
        ("inherited", "self.addObserver"): set(),
        ("inherited", "self.parent.isEntered"): set(),
    }


def test_extraction_finds_members_of_slicer_s_qt_widgets() -> None:
    """Members of qMRML widgets named in WIDGET_MEMBERS are checked (the node type given to addAttribute is a class)."""
    source = """
import slicer

class W:
    def setup(self):
        self.ui.selector.addAttribute("vtkMRMLMarkupsFiducialNode", "Role", "x")
        self.ui.selector.sortFilterProxyModel().hiddenNodeIDs = ["a"]
        self.ui.box.appendPlainText("a Qt member: not checked")
"""
    got = _checker().extract_slicer_api(source)
    assert got == {
        ("widget-member", "qMRMLNodeComboBox.addAttribute"): set(),
        ("widget-member", "qMRMLNodeComboBox.sortFilterProxyModel"): set(),
        ("widget-member", "qMRMLSortFilterProxyModel.hiddenNodeIDs"): set(),
        ("node-class", "vtkMRMLMarkupsFiducialNode"): set(),
    }


def test_every_slicer_name_the_module_uses_is_in_the_manifest(used: dict, manifest: dict) -> None:
    """(a) No Slicer-facing name of the module is missing from the manifest."""
    assert len(used) >= 50
    missing = sorted(f"{kind} {name}" for kind, name in set(used) - set(_entries(manifest)))
    assert not missing, f"Slicer APIs the module uses that were never checked against Slicer: {missing}; {RERUN}"


def test_no_manifest_entry_is_not_found(manifest: dict) -> None:
    """(b) Every name was found in Slicer's sources (or, for VTK/Qt/CTK names, checked there)."""
    bad = [f"{a['kind']} {a['name']}: {a['note']}" for a in manifest["apis"] if a["status"] != "found"]
    assert not bad, f"Slicer APIs the module uses that Slicer does not define: {bad}"
    for entry in manifest["apis"]:
        where = entry["defined_in"]
        assert where in ("vtk", "qt", "ctk") or where.rsplit(":", 1)[-1].isdigit(), entry
        assert entry["since"], entry


def test_manifest_lists_nothing_the_module_no_longer_uses(used: dict, manifest: dict) -> None:
    """(c) No stale entries: everything in the manifest is still used by the module."""
    stale = sorted(f"{kind} {name}" for kind, name in set(_entries(manifest)) - set(used))
    assert not stale, f"manifest entries the module no longer uses: {stale}; {RERUN}"


def test_keyword_arguments_were_checked(used: dict, manifest: dict) -> None:
    """Every keyword argument the module passes to a Slicer function was checked against its signature."""
    entries = _entries(manifest)
    unchecked = {
        f"{kind} {name}": sorted(keywords - set(entries[kind, name].get("keywords", [])))
        for (kind, name), keywords in used.items()
        if (kind, name) in entries and keywords - set(entries[kind, name].get("keywords", []))
    }
    assert not unchecked, f"keyword arguments never checked against Slicer: {unchecked}; {RERUN}"


def test_every_slicer_name_exists_in_the_oldest_supported_slicer(manifest: dict) -> None:
    """The extension supports Slicer 5.10: nothing the module uses may be newer (VTK/Qt names are not dated)."""
    assert manifest["baseline"] == "v5.10.0"
    newer = [f"{a['kind']} {a['name']} ({a['since']})" for a in manifest["apis"] if a["in_slicer_5_10"] is False]
    assert not newer, f"Slicer APIs absent from Slicer 5.10: {newer}"
    undated = [
        a["name"] for a in manifest["apis"] if a["in_slicer_5_10"] is None and a["defined_in"] not in ("vtk", "qt")
    ]
    assert not undated, f"names whose presence in Slicer 5.10 was not checked: {undated}"
