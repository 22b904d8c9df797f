"""The methods compared and how one run of one method is carried out (an adapter in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ImplicitKernelRegistrationLib.registration.pipeline import DEFAULT_ENCODER, DEFAULT_WEIGHTS

BENCH = Path(__file__).resolve().parent
ADAPTERS = BENCH / "adapters"
PEERS_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
SPATIAL_WEIGHTS = DEFAULT_WEIGHTS.with_name(DEFAULT_WEIGHTS.stem + "_spatial.pt")
DEFAULT_METHOD = "ikr-learned"  # RegistrationConfig's default kernel
FALLBACK_REFERENCE = "ikr-tps"  # the ratio reference while the learned weights are missing


@dataclass(frozen=True)
class Method:
    """One method: its adapter script, which venv runs it, its settings, and a note for the table."""

    name: str
    adapter: str
    peer: bool
    options: dict = field(default_factory=dict)
    weights: Path | None = None
    note: str = ""

    def python(self) -> str:
        """The interpreter that runs the adapter: the peers' venv, or this project's."""
        return str(PEERS_PYTHON) if self.peer else sys.executable

    def missing(self) -> str | None:
        """Why the method cannot run here (None when it can)."""
        if self.weights is not None and not self.weights.is_file():
            return f"weights {self.weights.relative_to(BENCH.parent)} not found"
        if self.peer and not PEERS_PYTHON.exists():
            return "peers' venv missing (bench/setup_peers.sh failed)"
        return None


METHODS = (
    Method("ikr-learned", "ikr_adapter.py", False, {"kernel": "learned"}, DEFAULT_WEIGHTS, "default: learned kernel"),
    Method(
        "ikr-learned-noopt",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "key_iterations": 0, "residual_iterations": 0},
        DEFAULT_WEIGHTS,
        "the default before session 5: no key optimisation, no residual (key_iterations 0, residual_iterations 0)",
    ),
    Method(
        "ikr-learned-spatial",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "heads": "spatial", "weights": str(SPATIAL_WEIGHTS)},
        SPATIAL_WEIGHTS,
        "learned kernel, spatial head only (no image features)",
    ),
    Method(
        "ikr-encoder",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "features": "learned"},
        DEFAULT_ENCODER,
        "learned kernel, matching on the learned encoder's features",
    ),
    Method(
        "ikr-learned-lungs",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "lung_regions": True},
        DEFAULT_WEIGHTS,
        "learned kernel, region-aware neighbourhoods in an automatic lung mask (lungs against the rest)",
    ),
    Method(
        "ikr-learned-nolungs",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "lung_regions": False},
        DEFAULT_WEIGHTS,
        "learned kernel, one neighbourhood for all keys (no lung regions)",
    ),
    Method(
        "ikr-learned-opt",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "key_iterations": 50, "key_robust": 0.0, "residual_iterations": 0},
        DEFAULT_WEIGHTS,
        "learned kernel, key displacements optimised against the images, plain SSD (key_optimisation.py, 50 its)",
    ),
    Method(
        "ikr-learned-opt-robust",
        "ikr_adapter.py",
        False,
        {"kernel": "learned", "key_iterations": 50, "key_robust": 2.0, "residual_iterations": 0},
        DEFAULT_WEIGHTS,
        "as ikr-learned-opt, each point's SSD through Geman-McClure (scale 2^2 x the median at the matched keys): "
        "the default of session 5 (no residual)",
    ),
    Method(
        "ikr-learned-dense-opt",
        "ikr_adapter.py",
        False,
        {
            "kernel": "learned",
            "keypoint_nms_vox": 2,
            "lattice_keys": 1000,
            "key_iterations": 50,
            "key_robust": 0.0,
            "residual_iterations": 0,
        },
        DEFAULT_WEIGHTS,
        "learned kernel, denser keys (NMS 2, 1000 lattice keys) optimised against the images (50 iterations)",
    ),
    Method("ikr-tps", "ikr_adapter.py", False, {"kernel": "tps"}, note="thin-plate spline kernel"),
    Method("ikr-gaussian", "ikr_adapter.py", False, {"kernel": "gaussian"}, note="Gaussian kernel"),
    Method("elastix", "elastix_adapter.py", True, note="default bspline map only, 4 levels, 10 mm final grid"),
    Method("convexadam", "convexadam_adapter.py", True, note="MIND-SSC, grid 6, Adam 80 its, float32 on CPU"),
    Method(
        "elastix-affine",
        "elastix_adapter.py",
        True,
        {"affine": True},
        note="default affine map, then default bspline map (as its users run it)",
    ),
    Method("greedy", "greedy_adapter.py", True, note="deformable only: NCC 2x2x2, -n 100x50x20"),
    Method(
        "greedy-affine",
        "greedy_adapter.py",
        True,
        {"affine": True},
        note="greedy -a (dof 12, NMI, image centres), then deformable -it affine (as its users run it)",
    ),
    Method("demons", "demons_adapter.py", True, note="SimpleITK diffeomorphic, 3 levels (no affine stage)"),
    Method(
        "demons-affine",
        "demons_adapter.py",
        True,
        {"affine": True},
        note="SimpleITK affine (geometry centring, Mattes MI), then diffeomorphic demons",
    ),
    Method("ants", "ants_adapter.py", True, note="antspyx SyN defaults (affine + SyN, MI)"),
)


def method_names() -> list[str]:
    """All method names, in table order."""
    return [m.name for m in METHODS]


def get_method(name: str) -> Method:
    """The method of this name."""
    for method in METHODS:
        if method.name == name:
            return method
    raise KeyError(name)


def _environment(threads: int) -> dict:
    """The subprocess environment, with every thread pool sized to `threads`."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[key] = str(threads)
    return env


def run_method(
    method: Method, fixed: Path, moving: Path, outdir: Path, device: str, threads: int, timeout_s: float
) -> dict:
    """Run one adapter on one image pair; the run record with status 'ok', 'failed', 'timeout' or 'missing'."""
    reason = method.missing()
    if reason:
        return {"method": method.name, "status": "missing", "reason": reason}
    outdir.mkdir(parents=True, exist_ok=True)
    field_path, record_path, log_path = outdir / "field.nii.gz", outdir / "run.json", outdir / "log.txt"
    for stale in (field_path, record_path):
        stale.unlink(missing_ok=True)
    device_arg = device if method.name.startswith("ikr") or method.name == "convexadam" else "cpu"
    command = [
        method.python(),
        str(ADAPTERS / method.adapter),
        *("--fixed", str(fixed), "--moving", str(moving), "--out", str(field_path), "--json", str(record_path)),
        *("--device", device_arg, "--threads", str(threads), "--options", json.dumps(method.options)),
    ]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(
                command,
                cwd=outdir,  # tools that drop files in the working directory (transformix) drop them here
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_environment(threads),
                timeout=timeout_s,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            return {"method": method.name, "status": "timeout", "reason": f"over {timeout_s:.0f} s"}
    wall = round(time.perf_counter() - start, 3)
    if code != 0 or not record_path.exists() or not field_path.exists():
        return {"method": method.name, "status": "failed", "reason": _last_line(log_path), "exit_code": code}
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return {**record, "method": method.name, "status": "ok", "wall_s": wall, "field": str(field_path)}


def run_command(fixed: Path, moving: Path, outdir: Path, device: str, threads: int, timeout_s: float) -> dict:
    """Time the whole `ikr register FIXED MOVING -o OUTDIR` as a user waits for it (start to every output written)."""
    ikr = Path(sys.executable).with_name("ikr")
    outdir.mkdir(parents=True, exist_ok=True)
    report = outdir / "report.json"
    report.unlink(missing_ok=True)
    command = [str(ikr), "register", str(fixed), str(moving), "-o", str(outdir), "--device", device, "--quiet"]
    start = time.perf_counter()
    with open(outdir.with_name(outdir.name + ".log"), "w", encoding="utf-8") as log:
        try:
            code = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=_environment(threads), timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"over {timeout_s:.0f} s"}
    wall = round(time.perf_counter() - start, 3)
    if code != 0 or not report.exists():
        return {"status": "failed", "reason": _last_line(Path(log.name)), "exit_code": code}
    runtime = json.loads(report.read_text(encoding="utf-8")).get("runtime_s")
    return {"status": "ok", "wall_s": wall, "runtime_s": runtime}


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (the error, usually), shortened."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:200]
