"""Check every Slicer API the Slicer module uses against Slicer's own sources; write the manifest.

Run by developers (not by CI) whenever the module starts using a Slicer API that is not in the manifest:

    .venv/bin/python scripts/check_slicer_api.py --slicer-repo /path/to/Slicer/.git

`--slicer-repo` is a git directory of Slicer's sources (a bare clone is enough; nothing is checked out). Every
Slicer-facing name of ImplicitKernelRegistration/ImplicitKernelRegistration.py is looked up there, at HEAD and at
each release tag (the oldest tag that has it is recorded, and whether v5.10.0, the oldest Slicer the extension
supports, has it). Names that Slicer inherits from VTK are checked with the `vtk` Python package; Qt and CTK names
against a short table checked by hand (QT_KNOWN). Classes of Slicer's remote vtkAddon are looked up in a vtkAddon
git directory (`--vtkaddon-repo`) at the commit Slicer's SuperBuild.cmake pins.

The result is Testing/slicer_api_manifest.json. Testing/test_slicer_api.py (which needs neither Slicer nor its
sources) re-extracts the names with `extract_slicer_api` below and fails when the module and the manifest differ.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import json
import re
import subprocess
import sys
import unittest
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_REL = "ImplicitKernelRegistration/ImplicitKernelRegistration.py"
MANIFEST = ROOT / "Testing" / "slicer_api_manifest.json"
DEFAULT_SLICER_REPO = "/work/.mirror/Slicer+Slicer/repo"
DEFAULT_VTKADDON_REPO = "/work/.mirror/Slicer+vtkAddon/repo"
BASELINE_TAG = "v5.10.0"  # the oldest Slicer the extension supports

# ---------------------------------------------------------------------------------------------- extraction
# Kinds, in manifest order:
#   import            `from slicer[.X] import Y`                        -> "slicer[.X].Y"
#   slicer-attribute  an attribute chain rooted at `slicer` or at a name imported from it
#                     (slicer.util.arrayFromVolume, slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.setup)
#   node-class        a class name string given to *ByClass(...) or as nodeClassName=/className=
#   node-id           any other "vtkMRML..." string (the ID of a node Slicer creates, e.g. a default color table)
#   method            a CamelCase method called on an object (a MRML/VTK instance), e.g. SetAndObserveTransformNodeID
#   inherited         self.X / self.parent.X / super().X that a module class inherits from Slicer's base classes
#   widget-member     a member of one of Slicer's Qt widgets (qMRML*, qSlicer*) the module calls or sets, named in
#                     WIDGET_MEMBERS (selector.addAttribute, ...sortFilterProxyModel().hiddenNodeIDs); plain Qt
#                     widget members (QPlainTextEdit.appendPlainText, QProgressBar.setValue) are not checked
KINDS = ("import", "slicer-attribute", "node-class", "node-id", "method", "inherited", "widget-member")
CLASS_KEYWORDS = {"nodeClassName", "className"}
MRML_STRING = re.compile(r"^vtkMRML[A-Za-z0-9]+$")
VTK_STYLE_METHOD = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")

Api = tuple[str, str]  # (kind, name)


def _chain(node: ast.AST) -> list[str] | None:
    """["slicer", "util", "f"] for `slicer.util.f`; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _imports(tree: ast.Module) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """Names bound to slicer modules, names imported from slicer (-> qualified name), other imported names."""
    slicer_roots, from_slicer, others = {}, {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if alias.name.split(".")[0] == "slicer":
                    slicer_roots[bound] = alias.name if alias.asname else "slicer"
                else:
                    others.add(bound)
        elif isinstance(node, ast.ImportFrom):
            slicer_module = node.level == 0 and node.module and node.module.split(".")[0] == "slicer"
            for alias in node.names:
                bound = alias.asname or alias.name
                if slicer_module:
                    from_slicer[bound] = f"{node.module}.{alias.name}"
                else:
                    others.add(bound)
    return slicer_roots, from_slicer, others


def extract_slicer_api(text: str) -> dict[Api, set[str]]:
    """Every Slicer-facing name the module source `text` uses -> the keyword arguments it is called with."""
    tree = ast.parse(text, feature_version=(3, 12))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    slicer_roots, from_slicer, others = _imports(tree)
    found: dict[Api, set[str]] = {}

    def add(kind: str, name: str, node: ast.AST | None = None) -> None:
        keywords = found.setdefault((kind, name), set())
        call = parents.get(node)
        if isinstance(call, ast.Call) and call.func is node:
            keywords.update(k.arg for k in call.keywords if k.arg)

    for alias_target in from_slicer.values():
        add("import", alias_target)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in WIDGET_MEMBERS:
            add("widget-member", f"{WIDGET_MEMBERS[node.attr]}.{node.attr}", node)
    class_strings = set()
    for node in ast.walk(tree):
        parent = parents.get(node)
        if isinstance(node, ast.Attribute) and not (isinstance(parent, ast.Attribute) and parent.value is node):
            chain = _chain(node)  # the whole chain only: slicer.util.f, not also slicer.util
            if chain and chain[0] in slicer_roots:
                add("slicer-attribute", ".".join([slicer_roots[chain[0]], *chain[1:]]), node)
            elif chain and chain[0] in from_slicer:
                # ScriptedLoadableModuleWidget.setup counts; ScriptedLoadableModuleWidget.__init__ is just the import
                rest = list(itertools.takewhile(lambda part: not part.startswith("__"), chain[1:]))
                if rest:
                    dotted = ".".join([from_slicer[chain[0]], *rest])
                    add("slicer-attribute", dotted, node if rest == chain[1:] else None)
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            takes_class = "ByClass" in name or name == "addAttribute"  # addAttribute(nodeType, name, value)
            if takes_class and node.args and isinstance(node.args[0], ast.Constant):
                class_strings.add(node.args[0])
            class_strings.update(k.value for k in node.keywords if k.arg in CLASS_KEYWORDS)  # only constants matter
            if isinstance(func, ast.Attribute) and VTK_STYLE_METHOD.match(func.attr):
                receiver = _chain(func.value)
                if not (receiver and receiver[0] in {*slicer_roots, *from_slicer, *others}):
                    add("method", func.attr, func)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and MRML_STRING.match(node.value):
            add("node-class" if node in class_strings else "node-id", node.value)
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in from_slicer for b in cls.bases):
            _inherited(cls, parents, add)
    return found


def _inherited(cls: ast.ClassDef, parents: dict, add) -> None:
    """self.X, self.parent.X and super().X in a class derived from a Slicer class, where X is not the class's own."""
    own = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    own |= {
        n.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and _chain(n) == ["self", n.attr]
    }
    for node in ast.walk(cls):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) and node.value.func.id == "super":
            add("inherited", f"super().{node.attr}", node)
        elif _chain(node) == ["self", node.attr] and node.attr not in own and not node.attr.startswith("__"):
            if hasattr(unittest.TestCase, node.attr):
                continue  # ScriptedLoadableModuleTest is a unittest.TestCase: assert*, skipTest are Python's
            parent = parents.get(node)
            if node.attr == "parent" and isinstance(parent, ast.Attribute):
                add("inherited", f"self.parent.{parent.attr}", parent)
            else:
                add("inherited", f"self.{node.attr}", node)


def module_api(root: Path = ROOT) -> dict[Api, set[str]]:
    """The Slicer-facing names of the module file under `root`."""
    return extract_slicer_api((root / MODULE_REL).read_text())


# ---------------------------------------------------------------------------------------------- judgement tables
# The objects each CamelCase method is called on in the module (read from the code; the most derived class; a tuple
# when it is called on several kinds of objects, each is checked). The lookup starts at the class's header and
# follows its base classes, into VTK when needed. A method missing here is reported NOT FOUND.
METHOD_RECEIVERS: dict[str, str | tuple[str, ...]] = {
    "AddControlPoint": "vtkMRMLMarkupsFiducialNode",
    "AddControlPointWorld": "vtkMRMLMarkupsFiducialNode",
    "AddDefaultColorLegendDisplayNode": "vtkSlicerColorLogic",
    "AddLayoutDescription": "vtkMRMLLayoutNode",
    "AddModel": "vtkSlicerModelsLogic",
    "AutoWindowLevelOff": "vtkMRMLScalarVolumeDisplayNode",
    "CloneVolume": "vtkSlicerVolumesLogic",
    "CreateDefaultDisplayNodes": ("vtkMRMLMarkupsFiducialNode", "vtkMRMLScalarVolumeNode"),
    "GetApplyThreshold": "vtkMRMLScalarVolumeDisplayNode",
    "GetAttribute": "vtkMRMLMarkupsFiducialNode",
    "GetColorLegendDisplayNode": "vtkSlicerColorLogic",
    "GetColorNodeID": "vtkMRMLModelDisplayNode",
    "GetDimensions": "vtkImageData",
    "GetDisplacementGrid": "vtkOrientedGridTransform",
    "GetDisplayNode": ("vtkMRMLModelNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLScalarVolumeNode"),
    "GetDisplayVisibility": "vtkMRMLMarkupsFiducialNode",
    "GetForegroundOpacity": "vtkMRMLSliceCompositeNode",
    "GetForegroundVolumeID": "vtkMRMLSliceCompositeNode",
    "GetID": (
        "vtkMRMLGridTransformNode",
        "vtkMRMLScalarVolumeNode",
        "vtkMRMLSliceCompositeNode",
        "vtkMRMLSegmentationNode",
        "vtkMRMLColorTableNode",
        "vtkMRMLMarkupsFiducialNode",
    ),
    "GetIJKToRASMatrix": "vtkMRMLScalarVolumeNode",
    "GetLayoutNode": "vtkMRMLLayoutLogic",
    "GetMatrixTransformToWorld": "vtkMRMLLinearTransformNode",
    "GetName": (
        "vtkMRMLScalarVolumeNode",
        "vtkMRMLSegmentationNode",
        "vtkMRMLLabelMapVolumeNode",
        "vtkMRMLLinearTransformNode",
    ),
    "GetNodeReferenceID": "vtkMRMLSegmentationNode",
    "IsLinear": "vtkMRMLLinearTransformNode",
    "GetNthControlPointID": "vtkMRMLMarkupsFiducialNode",
    "GetNthControlPointIndexByID": "vtkMRMLMarkupsFiducialNode",
    "GetNthControlPointPosition": "vtkMRMLMarkupsFiducialNode",
    "GetNthControlPointPositionStatus": "vtkMRMLMarkupsFiducialNode",
    "GetNthSegmentID": "vtkSegmentation",
    "GetNumberOfControlPoints": "vtkMRMLMarkupsFiducialNode",
    "GetNumberOfSegments": "vtkSegmentation",
    "GetParentTransformNode": ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLLinearTransformNode"),
    "GetSegmentation": "vtkMRMLSegmentationNode",
    "GetText": "vtkMRMLTextNode",
    "GetTransformFromParent": "vtkMRMLGridTransformNode",
    "GetTransformNodeID": ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLGridTransformNode"),
    "HardenTransform": "vtkMRMLScalarVolumeNode",
    "ImportLabelmapToSegmentationNode": "vtkSlicerSegmentationsModuleLogic",
    "IsLayoutDescription": "vtkMRMLLayoutNode",
    "JumpSlicesToLocation": "vtkSlicerMarkupsLogic",
    "Modified": "vtkOrientedGridTransform",
    "RemoveNthControlPoint": "vtkMRMLMarkupsFiducialNode",
    "SetActiveScalar": "vtkMRMLModelDisplayNode",
    "SetAndObserveColorNodeID": ("vtkMRMLModelDisplayNode", "vtkMRMLScalarVolumeDisplayNode"),
    "SetAndObservePolyData": "vtkMRMLModelNode",
    "SetAndObserveTransformFromParent": "vtkMRMLGridTransformNode",
    "SetAndObserveTransformNodeID": (
        "vtkMRMLScalarVolumeNode",
        "vtkMRMLMarkupsFiducialNode",
        "vtkMRMLSegmentationNode",
        "vtkMRMLLinearTransformNode",
    ),
    "SetApplyThreshold": "vtkMRMLScalarVolumeDisplayNode",
    "SetAttribute": "vtkMRMLMarkupsFiducialNode",
    "SetBackgroundVolumeID": "vtkMRMLSliceCompositeNode",
    "SetColor": "vtkMRMLColorTableNode",
    "SetDisplacementGridData": "vtkOrientedGridTransform",
    "SetDisplayVisibility": "vtkMRMLMarkupsFiducialNode",
    "SetElement": "vtkMatrix4x4",
    "SetForegroundOpacity": "vtkMRMLSliceCompositeNode",
    "SetForegroundVolumeID": "vtkMRMLSliceCompositeNode",
    "SetGridDirectionMatrix": "vtkOrientedGridTransform",
    "SetIJKToRASMatrix": "vtkMRMLScalarVolumeNode",
    "SetInterpolationModeToLinear": "vtkOrientedGridTransform",
    "SetLinkedControl": "vtkMRMLSliceCompositeNode",
    "SetLocked": "vtkMRMLMarkupsFiducialNode",
    "SetMatrixTransformToParent": "vtkMRMLLinearTransformNode",
    "SetName": "vtkMRMLModelNode",
    "SetNthControlPointLabel": "vtkMRMLMarkupsFiducialNode",
    "SetNthControlPointPosition": "vtkMRMLMarkupsFiducialNode",
    "SetNumberOfColors": "vtkMRMLColorTableNode",
    "SetPointLabelsVisibility": "vtkMRMLMarkupsFiducialDisplayNode",
    "SetReferenceImageGeometryParameterFromVolumeNode": "vtkMRMLSegmentationNode",
    "SetScalarRange": "vtkMRMLModelDisplayNode",
    "SetScalarRangeFlag": "vtkMRMLModelDisplayNode",
    "SetScalarVisibility": "vtkMRMLModelDisplayNode",
    "SetSelectedColor": "vtkMRMLMarkupsFiducialDisplayNode",
    "SetText": "vtkMRMLTextNode",
    "SetThreshold": "vtkMRMLScalarVolumeDisplayNode",
    "SetTitleText": "vtkMRMLColorLegendDisplayNode",
    "SetTypeToUser": "vtkMRMLColorTableNode",
    "SetVisibility2D": "vtkMRMLModelDisplayNode",
    "SetWindowLevelMinMax": "vtkMRMLScalarVolumeDisplayNode",
    "TransformPoint": "vtkOrientedGridTransform",
}
# Members of Slicer's Qt widgets the module uses (on the .ui's widgets, or on objects they return) -> the class that
# declares them (a Q_INVOKABLE method, a slot or a Q_PROPERTY; looked up in its header and its base classes).
WIDGET_MEMBERS = {
    "addAttribute": "qMRMLNodeComboBox",  # the display selectors show only the module's list of their role
    "sortFilterProxyModel": "qMRMLNodeComboBox",
    "hiddenNodeIDs": "qMRMLSortFilterProxyModel",  # the pair-list selectors leave the module's own lists out
}
# Members of Qt/CTK classes (not in Slicer's sources), checked by hand against Qt 5's documentation.
QT_KNOWN = {
    ("QCoreApplication", "processEvents"): "static slot QCoreApplication::processEvents() (Qt 5 QtCore)",
}
QT_BASES = {"QApplication": "QGuiApplication", "QGuiApplication": "QCoreApplication"}
# The Python modules (objects created by Slicer at start-up, and its scripted-module base classes).
PYTHON_FILES = {
    "util": "Base/Python/slicer/util.py",
    "ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
}
# The object `self.parent` is in each scripted base class (a Qt object made by Slicer's C++ side).
PARENT_CLASSES = ("qSlicerScriptedLoadableModule", "qSlicerScriptedLoadableModuleWidget")
# Where Slicer's Python start-up sets the application-level attributes of the `slicer` package (a bare file name is
# looked up anywhere in the tree: slicerqt.py moved from Base/Python/slicer/ to Base/Python/ after 5.10).
SLICER_GLOBALS = {
    "app": ("slicerqt.py", r"setattr\(\s*slicer,\s*[\"']app[\"']", "qSlicerApplication"),
    "mrmlScene": ("slicerqt.py", r"setattr\(\s*slicer,\s*[\"']mrmlScene[\"']", "vtkMRMLScene"),
    "modules": ("slicerqt.py", r"setattr\(\s*slicer\.modules,\s*moduleName\.lower\(\)", None),
}


# ---------------------------------------------------------------------------------------------- sources
class Sources:
    """Read-only access to Slicer's (and vtkAddon's) git directories at any revision."""

    def __init__(self, slicer_repo: str, vtkaddon_repo: str | None) -> None:
        """Remember the git directories."""
        self.slicer_repo, self.vtkaddon_repo = slicer_repo, vtkaddon_repo

    @staticmethod
    def _git(repo: str, *args: str) -> str:
        """Output of a git command in `repo` ('' when it fails)."""
        out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else ""

    @cache  # noqa: B019 (one Sources per run)
    def files(self, rev: str, addon: bool = False) -> dict[str, str]:
        """Basename -> path of every file at `rev` (first path wins)."""
        repo = self.vtkaddon_repo if addon else self.slicer_repo
        out = {}
        for path in self._git(repo, "ls-tree", "-r", "--name-only", rev).splitlines():
            out.setdefault(path.rsplit("/", 1)[-1], path)
        return out

    @cache  # noqa: B019
    def text(self, rev: str, path: str, addon: bool = False) -> str:
        """A file's text at `rev` ('' when absent)."""
        return self._git(self.vtkaddon_repo if addon else self.slicer_repo, "show", f"{rev}:{path}")

    @cache  # noqa: B019
    def addon_rev(self, rev: str) -> str | None:
        """The vtkAddon commit Slicer's SuperBuild.cmake pins at `rev`, if the vtkAddon repo has it.

        At Slicer's HEAD a pin newer than the vtkAddon repo falls back to the vtkAddon repo's HEAD (see addon_note).
        """
        if not self.vtkaddon_repo:
            return None
        m = re.search(r"Slicer_Remote_Add\(vtkAddon.*?GIT_TAG\s+(\w+)", self.text(rev, "SuperBuild.cmake"), re.S)
        if m and self._git(self.vtkaddon_repo, "cat-file", "-t", m.group(1)).strip() == "commit":
            return m.group(1)
        if m and rev == "HEAD":
            return self._git(self.vtkaddon_repo, "rev-parse", "HEAD").strip() or None
        return None

    def addon_note(self, rev: str) -> str:
        """Which vtkAddon commit was read for Slicer revision `rev`."""
        used = self.addon_rev(rev) or ""
        m = re.search(r"Slicer_Remote_Add\(vtkAddon.*?GIT_TAG\s+(\w+)", self.text(rev, "SuperBuild.cmake"), re.S)
        pinned = m.group(1) if m else ""
        if used and used != pinned:
            date = self._git(self.vtkaddon_repo, "log", "-1", "--format=%cs", used).strip()
            return f"vtkAddon {used[:10]} ({date}, newest available; Slicer pins {pinned[:10]}, not in the repo)"
        return f"vtkAddon {used[:10]} (pinned by SuperBuild.cmake)"

    def tags(self) -> list[str]:
        """Release tags vX.Y.Z, oldest first."""
        tags = [t for t in self._git(self.slicer_repo, "tag").split() if re.fullmatch(r"v\d+\.\d+\.\d+", t)]
        return sorted(tags, key=lambda t: tuple(int(x) for x in t[1:].split(".")))

    def head(self) -> str:
        """HEAD's commit hash and date."""
        return self._git(self.slicer_repo, "log", "-1", "--format=%H %cs", "HEAD").strip()

    def declaring_headers(self, method: str) -> list[str]:
        """Up to 8 Slicer headers that declare a method named `method` (a hint for METHOD_RECEIVERS)."""
        out = self._git(
            self.slicer_repo, "grep", "-l", "-E", rf"(^|[^>.:A-Za-z0-9_]){method}\s*\(", "HEAD", "--", "*.h"
        )
        return [line.rsplit("/", 1)[-1] for line in out.splitlines()[:8]]

    def usage(self, rev: str, member: str) -> str:
        """ "path:line" of a call `->member(` / `.member(` in Slicer's C++ or Python code at `rev` ('' when none)."""
        out = self._git(
            self.slicer_repo, "grep", "-n", "-m1", "-E", rf"(->|\.){member}\s*\(", rev, "--", "*.cxx", "*.py"
        )
        first = out.splitlines()[0].split(":", 3) if out else []
        return f"{first[1]}:{first[2]}" if len(first) == 4 else ""

    def first_commit(self, needle: str, path: str) -> str:
        """The oldest commit whose diff of `path` adds or removes `needle` ('' when none)."""
        out = self._git(self.slicer_repo, "log", "--follow", "--format=%h %cs", "-S", needle, "--", path)
        return out.splitlines()[-1] if out else ""  # (git ignores --follow together with --reverse)


# ---------------------------------------------------------------------------------------------- lookup
@dataclass
class Hit:
    """Where a name is defined: `where` is "path:line", "vtkAddon:path:line", "vtk", "qt" or "ctk"."""

    where: str
    note: str = ""
    path: str = ""  # the Slicer path whose history tells when it came (empty outside Slicer's repository)
    needle: str = ""
    bad_keywords: list[str] = field(default_factory=list)


def _line_of(text: str, pattern: str) -> int:
    """1-based line of the first non-comment line matching `pattern` (0 when none)."""
    rx = re.compile(pattern)
    for i, line in enumerate(text.splitlines(), 1):
        if rx.search(line) and not re.match(r"\s*(//|/\*|\*|#)", line):
            return i
    return 0


def _member_patterns(member: str) -> list[str]:
    """Regexes for a C++ header declaring `member`: method, Q_PROPERTY, enum value, or VTK Set/Get macros."""
    m = re.escape(member)
    pats = [
        rf"(?<![\w>.:]){m}\s*\(",  # a declaration, not a call through -> or .
        rf"Q_PROPERTY\(\s*[\w:<>]+\s*\*?\s*{m}\s",
        rf"^\s*{m}\s*(=(?!=)|,|$)",  # an enum value
    ]
    for prefix in ("Set", "Get"):
        if member.startswith(prefix):
            pats.append(rf"vtk{prefix}\w*Macro\(\s*{re.escape(member[3:])}\s*[,)]")
    for suffix in ("On", "Off"):
        if member.endswith(suffix):
            pats.append(rf"vtkBooleanMacro\(\s*{re.escape(member[: -len(suffix)])}\s*,")
    return pats


def _python_def(text: str, name: str, owner: str | None = None) -> int:
    """Line of `def name`/`class name`/`name =` (inside class `owner` when given; 0 when absent)."""
    start = 0
    lines = text.splitlines()
    if owner:
        start = _line_of(text, rf"^class {re.escape(owner)}\b")
        if not start:
            return 0
    indent = r"\s+" if owner else r""
    rx = re.compile(rf"^{indent}(def|class)\s+{re.escape(name)}\b|^{indent}{re.escape(name)}\s*(:[^=]*)?=(?!=)")
    for i in range(start, len(lines)):
        if owner and i > start and re.match(r"^(class|def)\s", lines[i]):
            break
        if rx.match(lines[i]):
            return i + 1
    return 0


def _python_keywords(text: str, name: str) -> set[str] | None:
    """Parameter names of top-level `def name` (None: accepts any keyword, or not parseable)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            a = node.args
            if a.kwarg:
                return None
            return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    return None


class Resolver:
    """Finds where a Slicer-facing name is defined at one revision of Slicer's sources."""

    def __init__(self, sources: Sources, rev: str) -> None:
        """Look at revision `rev`."""
        self.src, self.rev = sources, rev

    # ------------------------------------------------------------------ classes and members
    def header(self, cls: str) -> tuple[str, str, bool] | None:
        """(path, text, in vtkAddon) of the header declaring class `cls`, or None outside Slicer and vtkAddon."""
        rx = rf"^\s*class\s+(\w+\s+)?{re.escape(cls)}\b\s*(:|$|{{)"
        path = self.src.files(self.rev).get(f"{cls}.h")
        if path and _line_of(self.src.text(self.rev, path), rx):
            return path, self.src.text(self.rev, path), False
        addon = self.src.addon_rev(self.rev)
        if addon:
            path = self.src.files(addon, addon=True).get(f"{cls}.h")
            if path and _line_of(self.src.text(addon, path, addon=True), rx):
                return path, self.src.text(addon, path, addon=True), True
        return None

    def klass(self, cls: str) -> Hit | None:
        """Where class `cls` is declared (Slicer or vtkAddon)."""
        found = self.header(cls)
        if not found:
            return None
        path, text, addon = found
        line = _line_of(text, rf"^\s*class\s+(\w+\s+)?{re.escape(cls)}\b")
        if addon:
            return Hit(f"vtkAddon:{path}:{line}", f"class of Slicer's remote {self.src.addon_note(self.rev)}")
        return Hit(f"{path}:{line}", path=path, needle=cls)

    def member(self, cls: str, member: str) -> Hit | None:
        """Where `cls.member` is declared: the class's header or a base class's, in Slicer, vtkAddon, VTK or Qt."""
        chain = []
        while cls:
            chain.append(cls)
            found = self.header(cls)
            if found is None:
                return self._external_member(cls, member, chain)
            path, text, addon = found
            for pattern in _member_patterns(member):
                line = _line_of(text, pattern)
                if line:
                    via = f" (reached from {' -> '.join(chain)})" if len(chain) > 1 else ""
                    if addon:
                        return Hit(f"vtkAddon:{path}:{line}", f"{cls}::{member}{via}; {self.src.addon_note(self.rev)}")
                    return Hit(f"{path}:{line}", f"{cls}::{member}{via}", path, member)
            base = re.search(rf"class\s+(\w+\s+)?{re.escape(cls)}\s*:\s*public\s+(virtual\s+)?(\w+)", text)
            cls = base.group(3) if base else None
        return None

    @staticmethod
    def _external_member(cls: str, member: str, chain: list[str]) -> Hit | None:
        """A member of a VTK (checked with the vtk Python package) or Qt (QT_KNOWN) class."""
        via = " -> ".join(chain)
        if cls.startswith("vtk"):
            klass, version = _vtk_class(cls)
            if klass is not None and hasattr(klass, member):
                return Hit("vtk", f"{cls}.{member} (reached from {via}), checked with the vtk {version} package")
            return None
        while cls:
            if (cls, member) in QT_KNOWN:
                return Hit("qt", f"{QT_KNOWN[cls, member]} (reached from {via}), checked by hand")
            cls = QT_BASES.get(cls)
            via += f" -> {cls}" if cls else ""
        return None

    # ------------------------------------------------------------------ kinds
    def resolve(self, kind: str, name: str, keywords: set[str]) -> Hit | None:
        """Where (kind, name) is defined at this revision, or None."""
        if kind == "node-class":
            return self.klass(name)
        if kind == "node-id":
            return self.node_id(name)
        if kind == "method":
            return self.method(name)
        if kind == "inherited":
            return self.inherited(name, keywords)
        if kind == "widget-member":
            return self.member(*name.split(".", 1))
        return self.dotted(name.split(".")[1:], keywords)  # import, slicer-attribute: a path under `slicer`

    def method(self, name: str) -> Hit | None:
        """A method on every receiver class METHOD_RECEIVERS lists for it (the first one's definition is shown)."""
        receivers = METHOD_RECEIVERS.get(name, ())
        receivers = (receivers,) if isinstance(receivers, str) else receivers
        hits = [self.member(cls, name) for cls in receivers]
        if not hits or not all(hits):
            return None
        for cls, hit in zip(receivers[1:], hits[1:], strict=True):
            hits[0].note += f"; also checked on {cls}" + (f" ({hit.where})" if hit.where != hits[0].where else "")
        return hits[0]

    def dotted(self, parts: list[str], keywords: set[str]) -> Hit | None:
        """`slicer.<parts>`: a Python module function/class, a global made at start-up, a module, a class member."""
        head, rest = parts[0], parts[1:]
        if head in PYTHON_FILES:
            if not rest:
                path = PYTHON_FILES[head]
                return Hit(f"{path}:1", "a Python module", path, "") if self.src.text(self.rev, path) else None
            return self.python(PYTHON_FILES[head], rest, keywords)
        if head == "parameterNodeWrapper" and len(rest) == 1:
            return self.python_package("Base/Python/slicer/parameterNodeWrapper/", rest[0])
        if head in SLICER_GLOBALS:
            path, pattern, cls = SLICER_GLOBALS[head]
            path = path if "/" in path else self.src.files(self.rev).get(path, path)
            if not rest:
                line = _line_of(self.src.text(self.rev, path), pattern)
                note = f"slicer.{head} is set when Slicer's Python starts"
                return Hit(f"{path}:{line}", note, path, head) if line else None
            if head == "modules":
                return self.slicer_module(rest)
            return self.member(cls, rest[0]) if len(rest) == 1 else None
        if not rest:
            return self.klass(head)
        return self.member(head, rest[0]) if len(rest) == 1 else None

    def python(self, path: str, parts: list[str], keywords: set[str]) -> Hit | None:
        """A function/class (or a class's method) of one of Slicer's Python modules; checks keyword arguments."""
        text = self.src.text(self.rev, path)
        if len(parts) == 1:
            line = _python_def(text, parts[0])
        elif len(parts) == 2:
            line = _python_def(text, parts[1], owner=parts[0])
        else:
            return None
        if not line:
            return None
        hit = Hit(f"{path}:{line}", "", path, parts[-1])
        accepted = _python_keywords(text, parts[0]) if len(parts) == 1 and keywords else None
        if accepted is not None:
            hit.bad_keywords = sorted(keywords - accepted)
        if keywords:
            hit.note = f"keywords used: {', '.join(sorted(keywords))}"
        return hit

    def python_package(self, folder: str, name: str) -> Hit | None:
        """A class/function of a package whose __init__.py star-imports its submodules."""
        init = self.src.text(self.rev, folder + "__init__.py")
        for path in sorted(p for p in self.src.files(self.rev).values() if p.startswith(folder)):
            line = _python_def(self.src.text(self.rev, path), name)
            module = path[len(folder) : -3]
            if line and re.search(rf"from \.{module} import (\*|.*\b{name}\b)", init):
                return Hit(f"{path}:{line}", f"re-exported by {folder}__init__.py", path, name)
        return None

    def slicer_module(self, parts: list[str]) -> Hit | None:
        """slicer.modules.<name>[.member]: the module's qSlicer<Name>Module class (and a member of it)."""
        classes = {
            base[:-2]
            for base in self.src.files(self.rev)
            if re.fullmatch(r"qSlicer\w+Module\.h", base) and base[7:-8].lower() == parts[0]
        }
        for cls in sorted(classes):
            hit = self.klass(cls) if len(parts) == 1 else self.member(cls, parts[1]) if len(parts) == 2 else None
            if hit:
                hit.note = f"slicer.modules.{parts[0]} is a {cls}" + (f"; {hit.note}" if hit.note else "")
                return hit
        return None

    def inherited(self, name: str, keywords: set[str]) -> Hit | None:
        """self.X / super().X from ScriptedLoadableModule*.py or VTKObservationMixin; self.parent.X from Qt."""
        if name.startswith("self.parent."):
            for cls in PARENT_CLASSES:
                hit = self.member(cls, name.split(".")[2])
                if hit:
                    return hit
            return None
        attr = name.split(".")[-1]
        for path, prefix in ((PYTHON_FILES["ScriptedLoadableModule"], ""), (PYTHON_FILES["util"], "VTKObservation")):
            text = self.src.text(self.rev, path)
            for cls in re.findall(rf"^class ({prefix}\w*)", text, re.M):
                line = _python_def(text, attr, owner=cls)
                if not line:  # an attribute the base class sets: self.X = ...
                    inside = _line_of(self._class_body(text, cls), rf"self\.{re.escape(attr)}\s*=(?!=)")
                    line = inside and inside + _line_of(text, rf"^class {cls}\b") - 1
                if line:
                    return Hit(f"{path}:{line}", f"{cls}.{attr}", path, attr)
        return None

    @staticmethod
    def _class_body(text: str, cls: str) -> str:
        """The lines of top-level class `cls` (from its `class` line to the next top-level statement)."""
        lines = text.splitlines()
        start = _line_of(text, rf"^class {re.escape(cls)}\b")
        if not start:
            return ""
        end = next((i for i in range(start, len(lines)) if re.match(r"^\S", lines[i])), len(lines))
        return "\n".join(lines[start - 1 : end])

    def node_id(self, name: str) -> Hit | None:
        """The ID of a default color table node: vtkMRMLColorTableNode + GetTypeAsString() of a built-in type."""
        prefix = "vtkMRMLColorTableNode"
        if not name.startswith(prefix):
            return None
        path = self.src.files(self.rev).get(f"{prefix}.cxx")
        text = self.src.text(self.rev, path) if path else ""
        line = _line_of(text, rf'return\s+"{re.escape(name[len(prefix) :])}"')
        if not line:
            return None
        note = "default color table node; ID = class name + GetTypeAsString() (vtkMRMLColorLogic::GetColorNodeID)"
        return Hit(f"{path}:{line}", note, path, f'"{name[len(prefix) :]}"')


@cache
def _vtk_class(cls: str):
    """(class, VTK version) from the vtk Python package, or (None, '') when absent."""
    try:
        vtkmodules = importlib.import_module("vtkmodules")
    except ImportError:
        return None, ""
    for module in ("vtkCommonCore", "vtkCommonDataModel", "vtkCommonTransforms", "vtkCommonMath",
                   "vtkFiltersHybrid", "vtkFiltersCore", "vtkFiltersGeneral", "vtkImagingCore"):  # fmt: skip
        klass = getattr(importlib.import_module(f"vtkmodules.{module}"), cls, None)
        if klass is not None:
            return klass, vtkmodules.__version__
    return None, vtkmodules.__version__


# ---------------------------------------------------------------------------------------------- manifest
OUTSIDE = {"vtk": "VTK", "qt": "Qt", "ctk": "CTK"}  # "defined_in" of names Slicer takes from these libraries


def _since(sources: Sources, kind: str, name: str, keywords: set[str], head_hit: Hit) -> tuple[str, bool | None]:
    """The oldest release tag that has the name (and the commit adding it when that is not the oldest tag)."""
    if head_hit.where in OUTSIDE:
        text = f"history not checked ({OUTSIDE[head_hit.where]}, outside Slicer's repository)"
        used = sources.usage(BASELINE_TAG, name.rsplit(".", 1)[-1])
        return text + (f"; Slicer {BASELINE_TAG}'s own code calls it: {used}" if used else ""), None
    tags = sources.tags()
    if head_hit.where.startswith("vtkAddon:"):  # older pins are not all in the vtkAddon repo: check the baseline only
        tags = [BASELINE_TAG] if BASELINE_TAG in tags else []
    present = {}

    def has(tag: str) -> bool:
        if tag not in present:
            hit = Resolver(sources, tag).resolve(kind, name, keywords)
            present[tag] = bool(hit) and not hit.bad_keywords
        return present[tag]

    first = next((t for t in tags if has(t)), None)
    in_baseline = has(BASELINE_TAG) if BASELINE_TAG in tags else None
    if first is None:
        text = "after the last release tag"
    elif head_hit.where.startswith("vtkAddon:"):
        text = f"in vtkAddon {sources.addon_rev(first)[:10]}, which {first} pins"
    elif first == tags[0]:
        text = f"{first} or earlier (oldest tag in the mirror)"
    else:
        text = f"{first} (first release tag that has it)"
    if (first is None or first != tags[0]) and head_hit.path:
        commit = sources.first_commit(head_hit.needle, head_hit.path)
        if commit:
            text += f"; {head_hit.needle!r} first appears in {head_hit.path.rsplit('/', 1)[-1]} at {commit}"
    if in_baseline is False:
        text += f"; NOT in {BASELINE_TAG}"
    return text, in_baseline


def build_manifest(sources: Sources, module_text: str) -> dict:
    """The manifest for `module_text` (see Testing/test_slicer_api.py for how it is used)."""
    entries = []
    api = extract_slicer_api(module_text)
    head = Resolver(sources, "HEAD")
    for kind, name in sorted(api, key=lambda a: (KINDS.index(a[0]), a[1].lower())):
        keywords = api[kind, name]
        hit = head.resolve(kind, name, keywords)
        entry = {"name": name, "kind": kind}
        if hit is None:
            note = "no definition found"
            if kind == "method":
                receivers = METHOD_RECEIVERS.get(name)
                note = f"not on {receivers}" if receivers else "add its receiver class to METHOD_RECEIVERS"
                candidates = ", ".join(sources.declaring_headers(name)) or "none"
                note += f"; headers declaring a method of that name: {candidates}"
            entry |= {"defined_in": "", "since": "", "status": "NOT FOUND", "note": note, "in_slicer_5_10": None}
        else:
            since, in_baseline = _since(sources, kind, name, keywords, hit)
            status = "NOT FOUND" if hit.bad_keywords else "found"
            note = hit.note + (f"; keywords NOT accepted: {', '.join(hit.bad_keywords)}" if hit.bad_keywords else "")
            entry |= {"defined_in": hit.where, "since": since, "status": status, "note": note}
            entry["in_slicer_5_10"] = in_baseline
        if keywords:
            entry["keywords"] = sorted(keywords)
        entries.append(entry)
        print(f"{entry['status']:9} {kind:16} {name:60} {entry['defined_in']}", file=sys.stderr)
    addon = sources.addon_rev("HEAD")
    return {
        "slicer_source": f"Slicer/Slicer {sources.head()}" + (f"; {sources.addon_note('HEAD')}" if addon else ""),
        "baseline": BASELINE_TAG,
        "module": MODULE_REL,
        "apis": entries,
    }


def main(argv: list[str] | None = None) -> int:
    """Write the manifest; exit status 1 when some name is NOT FOUND or absent from the baseline release."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slicer-repo", default=DEFAULT_SLICER_REPO, help="git directory of Slicer's sources")
    parser.add_argument("--vtkaddon-repo", default=DEFAULT_VTKADDON_REPO, help="git directory of Slicer/vtkAddon")
    parser.add_argument("--output", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    addon = args.vtkaddon_repo if Path(args.vtkaddon_repo).exists() else None
    manifest = build_manifest(Sources(args.slicer_repo, addon), (ROOT / MODULE_REL).read_text())
    args.output.write_text(json.dumps(manifest, indent=2) + "\n")
    bad = [a["name"] for a in manifest["apis"] if a["status"] != "found" or a["in_slicer_5_10"] is False]
    print(f"{len(manifest['apis'])} names -> {args.output}; problems: {bad or 'none'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
