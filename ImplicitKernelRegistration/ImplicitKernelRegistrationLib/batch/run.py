"""`ikr batch`: every case of a manifest on a dask.distributed cluster, resumable, with a summary.

A LocalCluster of `workers` processes by default (one case at a time per process, torch threads =
the host's cores / its workers, so torch does not oversubscribe the cores), or an existing scheduler
by address: the same command then runs on every worker of that cluster. Workers read inputs and write
OUT/<case>/ by path, so on a real cluster every worker must see the manifest's paths and OUT at the
same paths (a shared file system; see docs/user_guide.md). OUT/batch.json records the engine, the
scheduler, the versions and each case's result, and is rewritten as each case ends, so a rerun after a
crash skips what was finished (same inputs, same options, outputs intact) unless `force`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..core.errors import IkrError
from ..io.atomic import write_text_atomic
from ..io.guard import sha256_file
from .case import CaseOptions, CaseResult, finished_before, run_case
from .manifest import Case, read_manifest

if TYPE_CHECKING:
    from distributed import Client, Future, Worker

    from ..core.geometry import Geometry

BATCH_FILE = "batch.json"
POLL_S = 0.5


@dataclass(frozen=True)
class BatchSettings:
    """Where and how a batch runs: workers or a scheduler address, --force, the memory check."""

    workers: int | None = None
    scheduler: str | None = None
    force: bool = False
    force_memory: bool = False
    spacing_mm: float = 2.0
    show_progress: bool = True


def process_case(
    case: Case, outdir: str, options: CaseOptions, previous: dict | None, force: bool, threads: dict
) -> CaseResult:
    """The task a worker runs: skip a case finished before, else run it with this host's share of threads."""
    from distributed import get_worker

    address = get_worker().address
    options = replace(options, torch_threads=threads.get(address, options.torch_threads))
    if not force and finished_before(case, Path(outdir), options, previous):
        kept = {k: previous[k] for k in ("inputs", "options", "registration_id", "runtime_s") if k in previous}
        return CaseResult(case.name, "skipped", worker=previous.get("worker", ""), **kept)
    result = run_case(case, Path(outdir), options)
    result.worker = address
    return result


def run_batch(
    manifest: str | os.PathLike, out: str | os.PathLike, options: CaseOptions, settings: BatchSettings
) -> list[CaseResult]:
    """Run every case of the manifest into OUT; write batch.json and the summary; return the results in row order."""
    from ..io.guard import check_writable, folder_lock
    from .summary import write_summary

    cases = read_manifest(manifest)
    out = Path(out).absolute()  # workers elsewhere write OUT/<case>/ by this path
    check_writable(out)
    if settings.scheduler and settings.workers:
        raise IkrError("--workers is for the local cluster; an existing scheduler (--scheduler) has its own workers")
    if settings.workers is not None and settings.workers < 1:
        raise IkrError(f"--workers {settings.workers}: give at least 1 worker")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, command="ikr batch"):
        previous = _previous_records(out)
        peaks = {c.name: _estimate_peak_mb(c, settings.spacing_mm) for c in cases}
        record = {
            "engine": "dask.distributed",
            "manifest": str(Path(manifest).resolve()),
            "manifest_sha256": sha256_file(manifest),
            "versions": _versions(),
            "options": options.record(),
            "force": settings.force,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "estimated_peak_mb": peaks,
        }
        t0 = time.perf_counter()
        with _cluster(settings, len(cases), peaks, record) as client:
            threads = _threads_per_worker(client)
            record["torch_threads"] = threads
            results = _run_all(client, cases, out, options, previous, settings, threads, record)
        record["wall_s"] = round(time.perf_counter() - t0, 3)
        _write_record(out, record, results, previous, cases)
        write_summary(cases, results, out)
    return [results[c.name] for c in cases]


def _run_all(
    client: Client,
    cases: list[Case],
    out: Path,
    options: CaseOptions,
    previous: dict[str, dict],
    settings: BatchSettings,
    threads: dict[str, int],
    record: dict,
) -> dict[str, CaseResult]:
    """Submit every case, follow them with the progress display, rewrite batch.json as each ends."""
    run_id = uuid.uuid4().hex[:8]
    futures: dict[str, Future] = {}
    names: dict[str, str] = {}
    for case in cases:
        key = f"ikr-case-{case.name}-{run_id}"
        names[key] = case.name
        futures[case.name] = client.submit(
            process_case, case, str(out / case.name), options, previous.get(case.name), settings.force, threads,
            key=key, pure=False,
        )  # fmt: skip
    results: dict[str, CaseResult] = {}
    with _CaseProgress(len(cases), settings.show_progress) as progress:
        while len(results) < len(cases):
            for name, future in futures.items():
                if name in results or not future.done():
                    continue
                results[name] = _collect(name, future)
                progress.finished(results[name])
                _write_record(out, record, results, previous, cases)
            if progress.shows_names:
                progress.running(_executing(client, names))
            time.sleep(POLL_S)
    return results


def _collect(name: str, future: Future) -> CaseResult:
    """The case's result, or a failed result when its worker died or the task could not run."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - a worker killed (out of memory?) or lost fails this case only
        line = (str(err).strip().splitlines() or [""])[0]
        return CaseResult(name, "failed", error=f"the worker running it failed ({type(err).__name__}: {line})")


def _executing(client: Client, names: dict[str, str]) -> list[str]:
    """The names of the cases the workers are executing now (empty when the workers cannot be asked)."""

    def executing(dask_worker: Worker) -> list[str]:
        return [str(ts.key) for ts in dask_worker.state.executing]

    try:
        keys = [k for found in client.run(executing).values() for k in found]
    except Exception:  # noqa: BLE001 - the display is best effort; a busy or dying worker must not stop the batch
        return []
    return sorted(names[k] for k in keys if k in names)


@contextlib.contextmanager
def _cluster(settings: BatchSettings, n_cases: int, peaks: dict, record: dict) -> Iterator[Client]:
    """The dask Client of this batch: a LocalCluster of worker processes, or the given scheduler's.

    The memory check comes first: before any local worker starts, or as soon as the scheduler tells
    its workers' memory limits.
    """
    import logging

    from distributed import Client, LocalCluster

    if settings.scheduler:
        try:
            client = Client(settings.scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise IkrError(f"cannot reach a dask scheduler at {settings.scheduler} ({err})") from err
        try:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError as err:
                raise IkrError(f"the dask scheduler at {settings.scheduler} has no worker after 60 s") from err
            limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
            per_worker = min(limits) / 2**20 if limits and min(limits) > 0 else None
            record.update(cluster="existing scheduler", n_workers=len(limits), scheduler_address=settings.scheduler)
            _check_memory(peaks, per_worker, len(limits), settings.force_memory, record)
            yield client
        finally:
            client.close()
        return
    from ..registration.memory import available_mb

    free = available_mb()
    peak = max((p for p in peaks.values() if p), default=None)
    workers = settings.workers or _default_workers(n_cases, peak, free)
    record.update(cluster="LocalCluster", n_workers=workers)
    _check_memory(peaks, free / workers if free else None, workers, settings.force_memory, record)
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        record["scheduler_address"] = cluster.scheduler_address
        yield client


def _default_workers(n_cases: int, peak_mb: float | None, free_mb: float | None) -> int:
    """As many workers as cases, cores and memory allow (at least one)."""
    from ..registration.memory import HEADROOM

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    fit = math.floor(free_mb / (HEADROOM * peak_mb)) if peak_mb and free_mb else cores
    return max(1, min(n_cases, cores, fit))


def _check_memory(peaks: dict, per_worker_mb: float | None, workers: int, force: bool, record: dict) -> None:
    """Refuse up front (unless `force`) when the largest case's estimated peak exceeds what each worker has."""
    from ..registration.memory import HEADROOM

    record["memory_per_worker_mb"] = None if per_worker_mb is None else round(per_worker_mb)
    known = {name: HEADROOM * p for name, p in peaks.items() if p}
    if force or per_worker_mb is None or not known:
        return
    name = max(known, key=known.get)
    if known[name] > per_worker_mb:
        raise IkrError(
            f"case {name!r} needs about {known[name] / 1024:.1f} GB but {workers} workers leave"
            f" {per_worker_mb / 1024:.1f} GB each; use fewer --workers, a coarser --spacing,"
            " or pass --force-memory to run anyway"
        )


def _estimate_peak_mb(case: Case, spacing_mm: float) -> float | None:
    """The registration's estimated peak memory from the fixed image's header (None when it cannot be read)."""
    from ..registration.memory import estimate_peak_mb

    geometry = _header_geometry(Path(case.fixed))
    return None if geometry is None else round(estimate_peak_mb(geometry, spacing_mm), 1)


def _header_geometry(path: Path) -> Geometry | None:
    """The grid of an image file or DICOM folder read from headers only (None when unreadable)."""
    import SimpleITK as sitk

    from ..core.geometry import Geometry

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = max(
                (reader.GetGDCMSeriesFileNames(str(path), uid) for uid in reader.GetGDCMSeriesIDs(str(path))),
                key=len,
            )
            info = sitk.ImageFileReader()
            info.SetFileName(series[0])
            info.ReadImageInformation()
            size = (*info.GetSize()[:2], len(series))
        else:
            info = sitk.ImageFileReader()
            info.SetFileName(str(path))
            info.ReadImageInformation()
            size = info.GetSize()
        if len(size) != 3:
            return None
        return Geometry(
            tuple(int(s) for s in size), tuple(info.GetSpacing()), tuple(info.GetOrigin()), tuple(info.GetDirection())
        )
    except (RuntimeError, ValueError, OSError):
        return None


def _threads_per_worker(client: Client) -> dict[str, int]:
    """Torch threads for each worker: its host's cores shared by the workers on that host."""

    def cores() -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    per_worker = client.run(cores)
    hosts = {a: w["host"] for a, w in client.scheduler_info()["workers"].items()}
    on_host = {h: sum(1 for a in hosts if hosts[a] == h) for h in hosts.values()}
    return {a: max(1, n // on_host.get(hosts.get(a), 1)) for a, n in per_worker.items()}


def _versions() -> dict:
    """Versions of ikr, Python and the libraries that decide the results or run the batch."""
    import dask
    import distributed
    import numpy
    import SimpleITK
    import torch

    return {
        "ikr": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "SimpleITK": SimpleITK.Version_VersionString(),
        "dask": dask.__version__, "distributed": distributed.__version__,
    }  # fmt: skip


def _previous_records(out: Path) -> dict[str, dict]:
    """The per-case records of the last batch.json in OUT (empty when none or unreadable)."""
    try:
        data = json.loads((out / BATCH_FILE).read_text(encoding="utf-8"))
        return {k: v for k, v in data.get("cases", {}).items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_record(out: Path, record: dict, results: dict, previous: dict, cases: list[Case]) -> None:
    """Rewrite batch.json: this run's results so far, and the earlier records of cases not yet redone."""
    per_case = {}
    for case in cases:
        if case.name in results:
            per_case[case.name] = results[case.name].to_dict()
        elif case.name in previous:
            per_case[case.name] = previous[case.name]
    data = dict(record)
    data["cases"] = per_case
    write_text_atomic(out / BATCH_FILE, json.dumps(data, indent=2, default=str))


class _CaseProgress:
    """A rich progress bar over the cases with the names being run (a line per case when not on a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self._progress = self._task = None
        self.print: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    def __enter__(self) -> _CaseProgress:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("cases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.description}"), console=Console(stderr=True),
            )  # fmt: skip
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total)
            console = self._progress.console
            self.print = lambda line: console.print(line, markup=False, highlight=False)
        return self

    @property
    def shows_names(self) -> bool:
        """True when a progress bar is on screen to show the names of the running cases."""
        return self._progress is not None

    def running(self, names: list[str]) -> None:
        """Show the cases being run now."""
        if self._progress is not None:
            shown = ", ".join(names[:6]) + (f" +{len(names) - 6}" if len(names) > 6 else "")
            self._progress.update(self._task, description=f"running: {shown}" if names else "")

    def finished(self, result: CaseResult) -> None:
        """Count a case as done and say how it ended."""
        self.done += 1
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
        if self.enabled:
            how = {"ok": f"ok in {result.runtime_s:.1f} s", "skipped": "skipped (finished before, inputs unchanged)"}
            self.print(f"[{self.done}/{self.total}] {result.case}: {how.get(result.status, 'failed: ' + result.error)}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
