"""Guards on an `ikr register` output folder: a lock, a write journal, stale temporaries, input fingerprints.

- One writer at a time: `folder_lock` holds an exclusive lock file beside the folder (`.NAME.lock`, so
  that it survives the folder being replaced) while a command reads and rewrites the folder; a second
  command waits for it (saying so), then reads what the first one wrote, so no clicked pair is lost.
- A refine rewrites the folder file by file; it first writes a journal (`.ikr-journal.json`, naming
  the generation it is writing and the new correspondences' checksum) and removes it when every file
  is in place. A journal left behind means a run was killed mid-way: the next refine rebuilds every
  output from session.json (which is written last, so it holds only committed pairs) and says so.
- Temporary files of killed runs (`.NAME.XXXX.tmp*` inside, `.OUT.XXXX.tmp/` beside) are removed by
  the next run that holds the lock.
- `fingerprint` ties a session to its input files (path, size, SHA-256) so a session is never used
  with other images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import filelock

from ..core.errors import IkrError
from .atomic import write_text_atomic

JOURNAL = ".ikr-journal.json"
LOCK_WAIT_S = 600.0


def lock_path(outdir: Path) -> Path:
    """The lock file of an output folder: a hidden file beside it."""
    outdir = Path(outdir).resolve()
    return outdir.parent / f".{outdir.name}.lock"


@contextlib.contextmanager
def folder_lock(outdir: str | os.PathLike, wait_s: float = LOCK_WAIT_S, command: str = "ikr") -> Iterator[None]:
    """Hold the output folder's lock; wait for another ikr (saying so) up to `wait_s`, then refuse."""
    outdir = Path(outdir)
    path = lock_path(outdir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"{command}: {outdir} is busy (another ikr is writing it); waiting", file=sys.stderr, flush=True)
            try:
                lock.acquire(timeout=wait_s)
            except filelock.Timeout as err:
                raise IkrError(f"busy: another ikr has been writing this folder for over {wait_s:g} s", outdir) from err
    except OSError as err:
        raise IkrError(f"cannot lock the folder for writing ({err.strerror or err})", outdir) from err
    try:
        yield
    finally:
        lock.release()


def check_writable(outdir: str | os.PathLike) -> None:
    """Refuse an output folder (or, when it does not exist yet, its nearest parent) this process cannot write."""
    outdir = Path(outdir).resolve()
    probe = outdir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise IkrError("the output path lies under a file, not a folder", outdir)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise IkrError(f"cannot write here: {probe} is not writable", outdir)
    if probe == outdir and not os.access(outdir.parent, os.W_OK | os.X_OK):
        raise IkrError(f"cannot write here: its parent {outdir.parent} is not writable", outdir)


def remove_stale_temporaries(outdir: str | os.PathLike) -> int:
    """Remove temporaries of killed runs (inside the folder and beside it); return how many. Call under the lock."""
    outdir = Path(outdir)
    removed = 0
    if outdir.is_dir():
        for item in outdir.iterdir():
            if item.name.startswith(".") and ".tmp" in item.name:
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
                removed += 1
    if outdir.parent.is_dir():
        for item in outdir.parent.glob(f".{outdir.name}.*.tmp"):
            if item.is_dir():
                shutil.rmtree(item)
                removed += 1
        old = outdir.parent / f".{outdir.name}.old"
        if old.is_dir():
            if outdir.exists():
                shutil.rmtree(old)
            else:
                os.replace(old, outdir)  # killed between the two renames of atomic_directory: put it back
            removed += 1
    return removed


def read_journal(outdir: str | os.PathLike) -> dict | None:
    """The journal an interrupted refine left (None when the last write finished)."""
    path = Path(outdir) / JOURNAL
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def start_journal(outdir: str | os.PathLike, generation: int, correspondences_sha256: str) -> None:
    """Record that generation `generation` is being written (before the first output file is replaced)."""
    data = {"writing_generation": generation, "correspondences_sha256": correspondences_sha256}
    write_text_atomic(Path(outdir) / JOURNAL, json.dumps(data))


def end_journal(outdir: str | os.PathLike) -> None:
    """Remove the journal: every output file of the new generation is in place."""
    with contextlib.suppress(FileNotFoundError):
        (Path(outdir) / JOURNAL).unlink()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike) -> dict:
    """Path, size and SHA-256 of an input file, or of every file in an input folder (a DICOM series)."""
    path = Path(path).resolve()
    if path.is_dir():
        digest = hashlib.sha256()
        size = 0
        for item in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_file(item).encode())
            size += item.stat().st_size
        return {"path": str(path), "size_bytes": size, "sha256": digest.hexdigest()}
    return {"path": str(path), "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def check_fingerprint(role: str, recorded: dict) -> None:
    """Refuse an input that is gone or changed since the registration recorded its fingerprint."""
    path = Path(recorded["path"])
    if not path.exists():
        raise IkrError(f"the {role} image of this registration is gone (moved or deleted)", path)
    found = fingerprint(path)
    if found["size_bytes"] != recorded.get("size_bytes") or found["sha256"] != recorded.get("sha256"):
        raise IkrError(
            f"the {role} image changed since this registration (size or SHA-256 differs): register again", path
        )
