"""One case of a batch: register (and measure the margin) into OUT/<case>/, the files the single commands write.

`run_case` is the one place where a batch case meets the registration. It registers (and measures the
margin when the row gives a tumour and an ablation zone) through the same workspace as `ikr register`
and `ikr margin`, so the files are those of the single commands; a refusal's one-line error becomes the
case's error. A worker runs one case at a time (torch's thread count belongs to the process), with
torch's thread count set for the case and restored after.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import IkrError
from ..io.guard import fingerprint
from ..io.outputs import OUTPUT_FILES
from ..workspace import MARGIN_FOLDER, Workspace
from .manifest import Case

MARGIN_FILES = ("margin.json", "report.html")
_ONE_CASE_AT_A_TIME = threading.Lock()  # per process: torch's thread count is the process's


@dataclass(frozen=True)
class CaseOptions:
    """How every case of a batch runs: the registration settings (RegistrationConfig fields), margin thresholds,
    strictness and torch threads."""

    settings: dict = field(default_factory=dict)
    thresholds_mm: tuple[float, ...] = (0.0, 5.0)
    strict: bool = False
    torch_threads: int = 1

    def record(self) -> dict:
        """What decides the outputs (threads excluded): compared on a rerun to skip finished cases."""
        return {"settings": dict(self.settings), "thresholds_mm": list(self.thresholds_mm)}


@dataclass
class CaseResult:
    """What became of one case: status ok, failed or skipped, its one-line error, timings and input fingerprints."""

    case: str
    status: str
    error: str = ""
    runtime_s: float = 0.0
    started: float = 0.0
    worker: str = ""
    torch_threads: int = 0
    inputs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    registration_id: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready record (batch.json)."""
        return asdict(self)


def input_fingerprints(case: Case) -> dict:
    """Size and SHA-256 of every input of the case (a missing one is recorded as missing)."""
    prints = {}
    for column, path in case.input_paths().items():
        prints[column] = fingerprint(path) if Path(path).exists() else {"path": path, "missing": True}
    return prints


def outputs_complete(case: Case, outdir: Path) -> bool:
    """True when OUT/<case>/ holds every registration output (and the margin report when asked), none half-written."""
    from ..io.outputs import interrupted_generation

    if not all((outdir / name).is_file() for name in OUTPUT_FILES.values()):
        return False
    if interrupted_generation(outdir) is not None:
        return False
    return not case.has_margin or all((outdir / MARGIN_FOLDER / name).is_file() for name in MARGIN_FILES)


def finished_before(case: Case, outdir: Path, options: CaseOptions, previous: dict | None) -> bool:
    """True when an earlier run finished this case with the same inputs and options and its outputs are intact."""
    if not previous or previous.get("status") not in ("ok", "skipped") or previous.get("options") != options.record():
        return False
    if not outputs_complete(case, outdir):
        return False
    try:
        report = json.loads((outdir / OUTPUT_FILES["report"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if report.get("registration_id") != previous.get("registration_id"):
        return False
    return _same_inputs(previous.get("inputs") or {}, input_fingerprints(case))


def _same_inputs(before: dict, now: dict) -> bool:
    """The same input columns, paths, sizes and SHA-256 as recorded."""
    keys = ("path", "size_bytes", "sha256")
    return before.keys() == now.keys() and all(
        not now[c].get("missing") and all(before[c].get(k) == now[c].get(k) for k in keys) for c in now
    )


def run_case(case: Case, outdir: Path, options: CaseOptions) -> CaseResult:
    """Register the case (and measure its margin) into `outdir`; never raises: a failure is the result's error.

    Memory was checked once for the whole batch (each worker's share), so the registration does not check it again.
    """
    with _ONE_CASE_AT_A_TIME:
        result = CaseResult(case.name, "failed", started=time.time(), torch_threads=options.torch_threads)
        result.options = options.record()
        start = time.perf_counter()
        try:
            result.inputs = input_fingerprints(case)
            with _torch_threads(options.torch_threads):
                _reset_peak_memory()
                _register_and_measure(case, outdir, options, result)
        except Exception as err:  # noqa: BLE001 - any failure of one case is recorded and the batch goes on
            result.error = _one_line(err)
        result.runtime_s = round(time.perf_counter() - start, 3)
        return result


def _register_and_measure(case: Case, outdir: Path, options: CaseOptions, result: CaseResult) -> None:
    """Register (as `ikr register`) and, with a tumour and ablation, measure the margin (as `ikr margin`) into
    `outdir`; set the result's status from the outcome."""
    landmarks = None
    if case.get("fixed_landmarks") or case.get("moving_landmarks"):
        if not (case.get("fixed_landmarks") and case.get("moving_landmarks")):
            raise IkrError("give both fixed_landmarks and moving_landmarks, or neither")
        landmarks = (case.get("fixed_landmarks"), case.get("moving_landmarks"))
    workspace = Workspace(outdir, command="ikr batch", say=result.warnings.append)
    report = workspace.register(
        case.fixed,
        case.moving,
        dict(options.settings),
        fixed_mask=case.get("fixed_mask") or None,
        moving_mask=case.get("moving_mask") or None,
        landmarks=landmarks,
        overwrite=True,
        check_memory=False,
    )
    result.registration_id = report.get("registration_id", "")
    if case.has_margin:
        workspace.margin_report(
            case.get("tumour"),
            case.get("ablation"),
            outdir / MARGIN_FOLDER,
            thresholds_mm=options.thresholds_mm,
            pre_image=case.moving,
            post_image=case.fixed,
        )
    quality = report.get("quality") or {}
    verdict = quality.get("verdict", "ok")
    if verdict == "failed" or (options.strict and verdict != "ok"):
        reasons = "; ".join(quality.get("reasons", [])) or "see report.json"
        raise IkrError(f"quality verdict {verdict}: {reasons}")
    result.status = "ok"


def _one_line(err: BaseException) -> str:
    """An exception as one line: an IkrError's message, else its type and first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if isinstance(err, IkrError) else f"{type(err).__name__}: {text}".rstrip(": ")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with torch using `n` threads, then restore the process's previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reset_peak_memory() -> None:
    """Reset this process's peak resident set (Linux), so report.json's peak memory is this case's, not the worker's."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
