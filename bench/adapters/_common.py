"""Shared by every adapter: arguments, timing, peak memory, and writing the field in our convention.

An adapter reads a fixed and a moving NIfTI image, registers them with one tool, and writes
- `--out`: a float32 3-component vector NIfTI on the fixed grid holding displacements in LPS mm that
  map fixed points to moving points (moving point = p + d(p); ITK DisplacementFieldTransform);
- `--json`: {"method", "package", "version", "settings", "device", "threads", "registration_s",
  "process_s", "peak_rss_mb"}.

Only SimpleITK and numpy are used here, so the file runs in either venv.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

PROCESS_START = time.perf_counter()


def parse_args(description: str) -> argparse.Namespace:
    """The adapters' common command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fixed", required=True, help="fixed image (NIfTI)")
    parser.add_argument("--moving", required=True, help="moving image (NIfTI)")
    parser.add_argument("--out", required=True, help="displacement field to write (.nii.gz)")
    parser.add_argument("--json", required=True, help="run record to write (.json)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (only tools that use a GPU honour it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--options", default="{}", help="JSON object of tool settings overriding the defaults")
    return parser.parse_args()


def options(args: argparse.Namespace, defaults: dict) -> dict:
    """The tool settings: `defaults` updated by the --options JSON (unknown keys are an error)."""
    given = json.loads(args.options)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise SystemExit(f"unknown options {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def read_float(path: str) -> sitk.Image:
    """Read an image as float32."""
    return sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), MB.

    Not getrusage: Linux carries the parent's high-water mark across fork and exec into ru_maxrss,
    so a small adapter would report the runner's memory.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def field_image(displacement_zyx3: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A float32 vector image of LPS mm displacements (z, y, x, 3) on the reference grid."""
    image = sitk.GetImageFromArray(np.asarray(displacement_zyx3, dtype=np.float32), isVector=True)
    image.CopyInformation(reference)
    return image


def index_to_mm(displacement_vox_xyz: np.ndarray, reference: sitk.Image) -> np.ndarray:
    """Displacements (..., 3) in voxel steps along the image axes (x, y, z) -> LPS mm."""
    direction = np.asarray(reference.GetDirection(), dtype=np.float64).reshape(3, 3)
    matrix = direction * np.asarray(reference.GetSpacing(), dtype=np.float64)[None, :]
    return np.asarray(displacement_vox_xyz, dtype=np.float64) @ matrix.T


def check_grid(field: sitk.Image, fixed: sitk.Image) -> None:
    """Fail loudly if a field is not on the fixed grid (an adapter bug)."""
    same = (
        field.GetSize() == fixed.GetSize()
        and np.allclose(field.GetSpacing(), fixed.GetSpacing(), atol=1e-4)
        and np.allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-3)
        and np.allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-5)
    )
    if not same or field.GetNumberOfComponentsPerPixel() != 3:
        raise SystemExit("adapter bug: the field is not a 3-vector image on the fixed grid")


def version(package: str) -> str:
    """The installed version of a distribution, or 'unknown'."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _replace_atomically(target: Path, write: callable) -> None:
    """Call write(tmp) on a temporary name beside `target`, then rename it onto `target`."""
    suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def finish(args: argparse.Namespace, field: sitk.Image, fixed: sitk.Image, record: dict) -> None:
    """Check and write the field (float32) and the run record, each atomically."""
    check_grid(field, fixed)
    field = sitk.Cast(field, sitk.sitkVectorFloat32)
    _replace_atomically(Path(args.out), lambda tmp: sitk.WriteImage(field, str(tmp), True))
    record = {
        **record,
        "threads": args.threads,
        "process_s": round(time.perf_counter() - PROCESS_START, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    text = json.dumps(record, indent=2) + "\n"
    _replace_atomically(Path(args.json), lambda tmp: tmp.write_text(text, encoding="utf-8"))


class Stopwatch:
    """Wall time of a `with` block, in seconds (`.seconds`)."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)
