"""docs/developers.md draws the real package graph, and packages import only the layers below them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import package_graph  # noqa: E402

# The layers, lowest first: a package may import only packages of an earlier layer.
LAYERS = (
    ("core",),
    ("io",),
    ("registration",),
    ("review", "synthetic"),
    ("workspace",),
    ("batch",),
    ("training", "slicer_bridge", "requirements"),
    ("cli",),
)


def test_developers_guide_graph_is_current() -> None:
    """docs/developers.md holds what scripts/package_graph.py draws from today's imports."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package_graph.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_packages_import_only_lower_layers() -> None:
    nodes, between, _ = package_graph.graph()
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert set(nodes) <= set(layer), f"a package without a layer: {sorted(set(nodes) - set(layer))}"
    upward = [(a, b) for a in nodes for b in between[a] if layer[b] >= layer[a]]
    assert upward == [], f"imports that run up or sideways: {upward}"
    assert between["core"] == set()  # core imports nothing of the library


def test_graph_sees_relative_absolute_and_lazy_imports() -> None:
    """The import scan resolves `from ..x import y`, absolute library imports and imports inside functions."""
    _, between, inside = package_graph.graph()
    assert "registration" in between["cli"]  # cli imports the pipeline inside its command functions only
    assert "pipeline --> dense" in inside["registration"]
    assert "core" in between["registration"]
