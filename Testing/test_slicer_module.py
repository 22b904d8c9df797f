"""The Slicer module outside Slicer: Python 3.12 grammar, .ui widget names, CMake lists, icon, no torch at import."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "ImplicitKernelRegistration"
MODULE = MODULE_DIR / "ImplicitKernelRegistration.py"
UI = MODULE_DIR / "Resources" / "UI" / "ImplicitKernelRegistration.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "ImplicitKernelRegistration.png"
LIB = MODULE_DIR / "ImplicitKernelRegistrationLib"


def _tree() -> ast.Module:
    """The module file parsed with Python 3.12's grammar (Slicer 5.10's Python)."""
    return ast.parse(MODULE.read_text(), filename=str(MODULE), feature_version=(3, 12))


def _ui_widgets() -> dict[str, ET.Element]:
    """Every named widget of the .ui file by name."""
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _ui_parameter_names() -> dict[str, str]:
    """Widget name -> its SlicerParameterName property."""
    out = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[name] = prop.findtext("string")
    return out


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    """A top-level class of the module."""
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def _cmake_list(text: str, variable: str) -> list[str]:
    """The items of `set(VARIABLE ...)` in a CMakeLists.txt."""
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", "ImplicitKernelRegistration") for item in match.group(1).split()]


def test_module_compiles_under_python_312_grammar() -> None:
    tree = _tree()
    compile(tree, str(MODULE), "exec")
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {
        "ImplicitKernelRegistration",
        "ImplicitKernelRegistrationWidget",
        "ImplicitKernelRegistrationLogic",
        "ImplicitKernelRegistrationTest",
        "ImplicitKernelRegistrationParameterNode",
    } <= names


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file() -> None:
    used = {
        node.attr
        for node in ast.walk(_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert len(used) >= 10
    missing = used - set(_ui_widgets())
    assert not missing, f"widgets used by the module but absent from the .ui: {sorted(missing)}"


def test_ui_parameter_names_match_the_parameter_node_fields() -> None:
    node = _class(_tree(), "ImplicitKernelRegistrationParameterNode")
    fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    bound = _ui_parameter_names()
    unknown = {w: p for w, p in bound.items() if p not in fields}
    assert not unknown, f"widgets bound to parameters the node lacks: {unknown}"
    # Every input the user chooses is bound to the parameter node, so the scene saves it.
    for field in ("fixedVolume", "movingVolume", "device", "tumourSegmentation", "ablationSegmentation"):
        assert field in bound.values(), field


def test_ui_is_a_qmrml_widget_whose_node_selectors_get_the_scene() -> None:
    root = ET.parse(UI).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    selectors = {
        n for n, w in _ui_widgets().items() if w.get("class") in ("qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget")
    }
    assert selectors and selectors <= receivers
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used_custom = {w.get("class") for w in _ui_widgets().values() if w.get("class").startswith(("q", "ctk"))}
    assert used_custom <= declared


def test_cmake_lists_every_python_file_and_resource() -> None:
    """The extension ships every library module except the trainers and the cohort batch (not run in Slicer)."""
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = set(_cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    library = {p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}
    left_out = ("training", "batch")
    shipped = {str(p.relative_to(MODULE_DIR)) for p in library if not set(left_out) & set(p.relative_to(LIB).parts)}
    on_disk = {"ImplicitKernelRegistration.py"} | shipped
    assert on_disk - scripts == set(), f"not listed in CMakeLists.txt: {sorted(on_disk - scripts)}"
    assert not any(f"/{d}/" in s for s in scripts for d in left_out), "trainers and batch are not in the extension"
    assert all((MODULE_DIR / s).is_file() for s in scripts), "CMakeLists.txt lists a file that does not exist"
    resources = set(_cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    files = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert files <= resources and all((MODULE_DIR / r).is_file() for r in resources)
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text


def test_extension_metadata() -> None:
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):  # fmt: skip
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Registration")' in text
    assert "add_subdirectory(ImplicitKernelRegistration)" in text
    # Screenshots named in the metadata exist in the repository.
    for url in re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', text).group(1).split():
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url


def test_icon_is_a_128_pixel_png() -> None:
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_torch_is_not_imported_at_module_import_time() -> None:
    """Top-level imports must work in a Slicer without torch: neither torch nor a torch-using library module."""
    torch_users = {"pipeline", "refine", "dense", "kernel", "features", "keypoints", "matching", "preprocess", "train"}
    for node in _tree().body:
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "torch" for a in node.names)
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] != "torch"
            assert node.module.split(".")[-1] not in torch_users, node.module
            assert not any(a.name in torch_users for a in node.names), node.module
    # The Slicer-facing helpers the module imports at the top do not import torch either.
    import subprocess
    import sys

    code = (
        "import sys; import ImplicitKernelRegistrationLib.slicer_bridge, ImplicitKernelRegistrationLib.core.errors;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_logic_calls_only_library_functions_that_exist() -> None:
    """Every `from ImplicitKernelRegistrationLib... import name` in the module names something real."""
    import importlib
    import importlib.util

    for node in ast.walk(_tree()):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ImplicitKernelRegistrationLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:  # a name in the module, or a submodule of the package
                real = hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}")
                assert real, f"{node.module}.{alias.name}"
    bridge = importlib.import_module("ImplicitKernelRegistrationLib.slicer_bridge")
    used = {
        n.attr
        for n in ast.walk(_tree())
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "slicer_bridge"
    }
    assert used and all(hasattr(bridge, name) for name in used), used


def _field_annotations() -> dict[str, ast.AnnAssign]:
    """The parameter node's fields by name."""
    node = _class(_tree(), "ImplicitKernelRegistrationParameterNode")
    return {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)}


def test_expected_error_and_suggestion_widgets_are_bound_and_connected() -> None:
    """Issue #12: the overlay check box, the number of suggestions and both output nodes live in the parameter node."""
    fields = _field_annotations()
    bound = _ui_parameter_names()
    widgets = _ui_widgets()
    expected = {
        "showExpectedErrorCheckBox": ("showExpectedError", "QCheckBox"),
        "numberOfSuggestionsSpinBox": ("numberOfSuggestions", "QSpinBox"),
        "expectedErrorSelector": ("expectedErrorVolume", "qMRMLNodeComboBox"),
        "suggestedClicksSelector": ("suggestedClicks", "qMRMLNodeComboBox"),
    }
    for widget, (field, cls) in expected.items():
        assert bound.get(widget) == field, widget
        assert widgets[widget].get("class") == cls, widget
        assert field in fields, field
    assert widgets["suggestClicksButton"].get("class") == "QPushButton"
    # Field defaults and range agree with the widgets: overlay off, 5 suggestions within 1..20.
    assert ast.literal_eval(fields["showExpectedError"].value) is False
    assert ast.literal_eval(fields["numberOfSuggestions"].value) == 5
    spin = {p.get("name"): p.findtext("number") for p in widgets["numberOfSuggestionsSpinBox"].findall("property")}
    assert (spin["minimum"], spin["maximum"], spin["value"]) == ("1", "20", "5")
    assert "WithinRange(1, 20)" in ast.unparse(fields["numberOfSuggestions"].annotation)
    # The button and the check box reach the logic.
    text = MODULE.read_text()
    assert 'self.ui.suggestClicksButton.connect("clicked(bool)", self.onSuggestClicks)' in text
    assert 'self.ui.showExpectedErrorCheckBox.connect("toggled(bool)", self.onShowExpectedError)' in text


def test_logic_wires_the_uncertainty_library_and_the_self_test_exercises_it() -> None:
    """The logic reaches the map, suggestions and interval through the workspace (which calls the uncertainty
    library); the Slicer self-test calls the logic's steps."""
    tree = _tree()
    logic = _class(tree, "ImplicitKernelRegistrationLogic")
    methods = {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    assert {"updateExpectedError", "setExpectedErrorVisible", "suggestClicks", "jumpToPoint"} <= methods
    called = {ast.unparse(n.func) for n in ast.walk(logic) if isinstance(n, ast.Call)}
    assert {"self.workspace.expected_error", "self.workspace.suggest"} <= called
    assert any(c.endswith(".margin") for c in called)
    workspace = ast.parse((LIB / "workspace.py").read_text())
    imported = {
        alias.name
        for n in ast.walk(workspace)
        if isinstance(n, ast.ImportFrom) and n.module == "review.uncertainty"
        for alias in n.names
    }
    assert imported == {"expected_error_map", "suggest_clicks", "margin_interval"}
    test = _class(tree, "ImplicitKernelRegistrationTest")
    called = {n.func.attr for n in ast.walk(test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {"updateExpectedError", "suggestClicks", "computeMargins", "saveMarginReport"} <= called
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert {"IKR expected error (mm)", "IKR suggested clicks"} <= constants


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    """A method of a top-level class."""
    return next(n for n in _class(tree, cls).body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_cancel_is_caught_inside_the_error_display() -> None:
    """Issue 21 fault 3: tryWithErrorDisplay shows a dialog and re-raises, so the cancellation is caught inside it."""
    register = _method(_tree(), "ImplicitKernelRegistrationWidget", "onRegister")
    withs = [n for n in ast.walk(register) if isinstance(n, ast.With)]
    assert withs and "tryWithErrorDisplay" in ast.unparse(withs[0].items[0].context_expr)
    inner = [
        h
        for n in ast.walk(withs[0])
        if isinstance(n, ast.Try)
        for h in n.handlers
        if h.type is not None and ast.unparse(h.type) == "RegistrationCancelled"
    ]
    assert inner, "RegistrationCancelled must be handled inside the `with slicer.util.tryWithErrorDisplay(...)`"


def test_busy_panel_disables_everything_but_cancel() -> None:
    """Issue 21 fault 7: every widget named in BUSY_DISABLED exists; Cancel and the progress display are not in it."""
    tree = _tree()
    busy = next(
        ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "BUSY_DISABLED" for t in n.targets)
    )
    widgets = _ui_widgets()
    assert set(busy) <= set(widgets), set(busy) - set(widgets)
    assert not {"cancelButton", "progressBar", "statusLabel", "runLogCollapsible", "runLogTextEdit"} & set(busy)
    collapsibles = {n for n, w in widgets.items() if w.get("class") == "ctkCollapsibleButton"}
    assert collapsibles - {"registrationCollapsible", "runLogCollapsible"} <= set(busy)  # the log is read during a run


def test_correspondences_are_hidden_by_default() -> None:
    """2000 points would hide the anatomy: the check box starts unticked and the node is made hidden."""
    box = _ui_widgets()["showCorrespondencesCheckBox"]
    checked = {p.get("name"): p.findtext("bool") for p in box.findall("property")}.get("checked")
    assert checked == "false"
    body = ast.unparse(_method(_tree(), "ImplicitKernelRegistrationLogic", "showCorrespondences"))
    assert "SetDisplayVisibility(False)" in body


def test_requirements_come_from_the_library_and_versions_are_checked() -> None:
    """Issue 21 fault 13: no requirement strings or bare find_spec checks in the module itself."""
    text = MODULE.read_text()
    assert "find_spec" not in text and "REQUIREMENTS = {" not in text
    assert "from ImplicitKernelRegistrationLib.requirements import" in text
    assert "unmet_requirements(SLICER_REQUIREMENTS)" in text


def test_self_test_covers_the_issue_21_paths_and_never_skips() -> None:
    """Issue 21 fault 15: re-register, resample mode, both exports, tumour drawn before; never skipTest."""
    tree = _tree()
    test = _class(tree, "ImplicitKernelRegistrationTest")
    calls = [ast.unparse(n.func) for n in ast.walk(test) if isinstance(n, ast.Call)]
    assert "self.skipTest" not in calls
    assert calls.count("logic.register") >= 3  # twice in one test (re-register), once in resample mode
    for needed in ("logic.exportTransform", "logic.exportWarpedSegmentation", "logic.syncPairs", "logic.undo",
                   "logic.openSession", "logic.computeMargins", "slicer_bridge.point_selector_hidden_ids",
                   "logic.runLog.text", "p.fixedPoints.SetNthControlPointPosition"):  # fmt: skip
        assert needed in calls, needed
    assert "p.qualitySummary" in ast.unparse(test)
    assert "p.resampleMoving = True" in ast.unparse(test)
    run = _method(tree, "ImplicitKernelRegistrationTest", "runTest")
    assert {"test_RegisterRefineMargins", "test_ResampleModeAndExports"} <= {
        n.attr for n in ast.walk(run) if isinstance(n, ast.Attribute)
    }


def test_cmake_follows_the_slicer_5_10_template_and_the_index_entry_is_documented() -> None:
    """Issue 21 fault 16: the template's CMake range; EXTENSION_DEPENDS PyTorch is the index's build dependency."""
    import json

    text = (ROOT / "CMakeLists.txt").read_text()
    assert text.startswith("cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)")
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]+)"\)', text).group(1).split()
    guide = (ROOT / "docs" / "user_guide.md").read_text()
    entry = json.loads(re.search(r"```json\n(.*?)```", guide, re.S).group(1))
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', text).group(1)


def _properties(widget: ET.Element) -> dict[str, str]:
    """A .ui widget's simple properties (bool, number, string, enum) as text."""
    out = {}
    for prop in widget.findall("property"):
        value = next(iter(prop), None)
        out[prop.get("name")] = value.text if value is not None else None
    return out


def test_the_run_log_is_a_collapsible_read_only_text_box_fed_by_the_logic() -> None:
    """Issue 21: a log of the run in the panel. The logic writes into slicer_bridge.RunLog (steps, the Workspace's
    `say`, warnings, the verdict, timing); the widget shows each line as it comes."""
    widgets = _ui_widgets()
    collapsible, box = widgets["runLogCollapsible"], widgets["runLogTextEdit"]
    assert collapsible.get("class") == "ctkCollapsibleButton" and box.get("class") == "QPlainTextEdit"
    assert box in list(collapsible.iter("widget"))
    assert _properties(box)["readOnly"] == "true" and _properties(collapsible)["collapsed"] == "true"
    tree = _tree()
    logic = ast.unparse(_class(tree, "ImplicitKernelRegistrationLogic"))
    assert "self.runLog = slicer_bridge.RunLog()" in logic
    assert "say=self.runLog.say" in logic  # the Workspace's messages
    for call in ("self.runLog.begin(", "self.runLog.progress(", "self.runLog.verdict(", "self.runLog.end(",
                 "slicer_bridge.registration_lines(", "slicer_bridge.pair_edit_line("):  # fmt: skip
        assert call in logic, call
    assert "logging.warning" not in logic  # warnings go to the run log (which also logs them)
    widget = ast.unparse(_class(tree, "ImplicitKernelRegistrationWidget"))
    assert "self.logic.runLog.listeners.append(self._appendLogLine)" in widget
    assert "self.ui.runLogTextEdit.appendPlainText(line)" in widget


def test_the_quality_verdict_is_shown_after_register_and_kept_with_the_scene() -> None:
    """Issue 21: the verdict with its reasons in its own label (not only the status line a pair edit overwrites)."""
    bound = _ui_parameter_names()
    assert bound["qualityLabel"] == "qualitySummary"
    assert _properties(_ui_widgets()["qualityLabel"])["wordWrap"] == "true"
    assert "qualitySummary" in _field_annotations()
    show = ast.unparse(_method(_tree(), "ImplicitKernelRegistrationLogic", "_showRegistration"))
    assert "p.qualitySummary = slicer_bridge.quality_summary(workspace.quality)" in show


def test_register_says_why_it_is_disabled_on_the_button_and_the_status_line() -> None:
    """Issue 21: the tooltip of the disabled button and, while the status line is free, the line itself."""
    check = ast.unparse(_method(_tree(), "ImplicitKernelRegistrationWidget", "_checkCanRegister"))
    assert "slicer_bridge.register_blocker(" in check
    assert "self.ui.registerButton.toolTip = blocker or" in check
    assert "REGISTER_BLOCKED_PREFIX" in check and "self.ui.statusLabel.text" in check


def test_the_module_s_own_point_lists_stay_out_of_the_pair_list_selectors() -> None:
    """Issue 21: correspondences and suggested clicks are marked with a role attribute before the parameter node
    (and so the selectors) sees them; the fixed/moving point selectors hide them, the display selectors show only
    their role's list."""
    tree = _tree()
    logic = _class(tree, "ImplicitKernelRegistrationLogic")
    for method, role in (("showCorrespondences", "correspondences"), ("suggestClicks", "suggestions")):
        body = ast.unparse(_method(tree, "ImplicitKernelRegistrationLogic", method))
        mark = body.index(f"node.SetAttribute(slicer_bridge.ROLE_ATTRIBUTE, '{role}')")
        assigned = body.index("p.correspondences = node" if role == "correspondences" else "p.suggestedClicks = node")
        assert mark < assigned, method
    assert "markOwnLists" in {n.name for n in logic.body if isinstance(n, ast.FunctionDef)}
    update = ast.unparse(_method(tree, "ImplicitKernelRegistrationWidget", "_updatePointSelectors"))
    assert "slicer_bridge.point_selector_hidden_ids(" in update
    assert "selector.sortFilterProxyModel().hiddenNodeIDs = hidden" in update
    assert "self.ui.fixedPointsSelector" in update and "self.ui.movingPointsSelector" in update
    setup = ast.unparse(_method(tree, "ImplicitKernelRegistrationWidget", "setup"))
    assert "selector.addAttribute('vtkMRMLMarkupsFiducialNode', slicer_bridge.ROLE_ATTRIBUTE, role)" in setup
    modified = ast.unparse(_method(tree, "ImplicitKernelRegistrationWidget", "_onParameterNodeModified"))
    assert "self._updatePointSelectors()" in modified


def test_a_drag_is_one_undo_step_in_the_logic() -> None:
    """Issue 21: syncPairs hands the session all its edits at once (Workspace.edit_pairs: one undo step), a dragged
    pair as a move; undo puts a dragged pair's points back (ListSync.move_back)."""
    tree = _tree()
    sync = ast.unparse(_method(tree, "ImplicitKernelRegistrationLogic", "syncPairs"))
    assert "self.workspace.edit_pairs(" in sync and "move=edits.move" in sync
    assert "self.workspace.remove_pair" not in sync and "self.workspace.add_pairs" not in sync
    lists = ast.unparse(_method(tree, "ImplicitKernelRegistrationLogic", "_syncListsToSession"))
    assert "sync.move_back" in lists and "SetNthControlPointPosition" in lists
