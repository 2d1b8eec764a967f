"""A pretraining run folder: marked as a run of hear-msm pretrain, locked while a run writes to it.

`pretrain --out RUN` accepts RUN only if it is new, empty, or marked as a run by `MARKER` (the
first file a run writes). Any other folder is refused before a byte is written, so a run can never
overwrite or append to unrelated files; `--resume` accepts marked folders only.

While a run writes to RUN, its main process holds an exclusive advisory lock (`fcntl.flock`) on
`LOCK`, so a second run on the same folder is refused with the holder's pid. The operating system
releases the lock when the holder exits, however it exits (kill -9 included): the lock file a dead
run leaves behind is simply taken over by the next one, never mistaken for a live run. Without
`fcntl` (Windows) the folder is not locked.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from .._files import remove_stale_temporaries, write_text_atomic

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

MARKER = ".hear_msm_run.json"
LOCK = ".hear_msm_run.lock"
FORMAT = "hear_msm pretraining run"
VERSION = 1


class RunFolderInUse(FileExistsError):
    """Another live process holds the run folder's lock."""


def _listing(folder: Path, limit: int = 6) -> str:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir() if entry.name != LOCK)
    shown = ", ".join(names[:limit])
    return f"{len(names)} entries ({shown}{', ...' if len(names) > limit else ''})"


def read_marker(folder: Path) -> dict | None:
    """The folder's marker, None if it has none; ValueError if the file is not ours or is damaged."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a hear_msm run marker (not valid JSON: {error})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("version"), int):
        raise ValueError(f"{path} is not a hear_msm run marker (expected format {FORMAT!r} and an integer version)")
    if marker["version"] > VERSION:
        raise ValueError(f"{path}: run folder format version {marker['version']} was written by a newer hear_msm "
                         f"(this one reads up to {VERSION}); upgrade hear_msm")
    return marker


def _in_use(folder: Path, fd: int) -> RunFolderInUse:
    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
    return RunFolderInUse(f"{folder} is in use by another run (process {holder}); wait for it to end or stop it, "
                          "or choose another --out")


def _probe_lock(folder: Path) -> None:
    """RunFolderInUse if a live process holds the folder's lock; takes nothing, creates nothing."""
    if fcntl is None or not (folder / LOCK).is_file():
        return
    fd = os.open(folder / LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock conflicts only with a holder's exclusive one
    except BlockingIOError:
        raise _in_use(folder, fd) from None
    finally:
        os.close(fd)  # also drops the shared lock


def check(folder: str | os.PathLike, resume: bool, probe_lock: bool = True) -> None:
    """Refuse a folder that a run may not write to; writes nothing.

    New run: the folder must not exist, be empty, or be marked. Resume: it must be marked. Either
    way no live run may hold it (`probe_lock`).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {folder} is a file, not a run folder")
    if probe_lock and folder.is_dir():
        _probe_lock(folder)
    if resume:
        if not folder.is_dir():
            raise FileNotFoundError(f"no run to resume: {folder} does not exist")
        if read_marker(folder) is None:
            raise ValueError(f"refusing to resume {folder}: it is not a run of hear-msm pretrain (no {MARKER}); "
                             f"it holds {_listing(folder)}")
        return
    if folder.is_dir() and read_marker(folder) is None and any(e.name != LOCK for e in folder.iterdir()):
        raise FileExistsError(
            f"--out {folder} is not empty and not a run of hear-msm pretrain (no {MARKER}): it holds "
            f"{_listing(folder)}. A run writes train_config.json, checkpoint.pt, log.csv and final/ into "
            "its folder: choose a new or empty folder"
        )


class RunFolder:
    """A claimed run folder: the lock is held until `release()`."""

    def __init__(self, path: Path, lock_fd: int | None):
        self.path, self._lock_fd = path, lock_fd

    @property
    def marker(self) -> dict:
        return read_marker(self.path)

    def start_new_run(self) -> None:
        """A new run in this folder (the previous one stopped before its first checkpoint): a fresh marker."""
        _write_marker(self.path)

    def record_resume(self, step: int, changed: dict[str, tuple]) -> None:
        """Append a resume (step, time, settings changed as [old, new]) to the marker's history."""
        marker = self.marker
        marker.setdefault("resumes", []).append(
            {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": {name: list(values) for name, values in changed.items()}})
        write_text_atomic(self.path / MARKER, json.dumps(marker, indent=2) + "\n")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def _write_marker(folder: Path) -> None:
    from .. import __version__

    marker = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "hear_msm": __version__}
    write_text_atomic(folder / MARKER, json.dumps(marker, indent=2) + "\n")


def _lock(folder: Path) -> int | None:
    """Take the folder's lock without waiting; RunFolderInUse names the holder's pid."""
    if fcntl is None:
        return None
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        error = _in_use(folder, fd)
        os.close(fd)
        raise error from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


@contextlib.contextmanager
def claim(folder: str | os.PathLike, resume: bool) -> Iterator[RunFolder]:
    """Check, create, lock and mark `folder` for the life of the `with` block.

    Temporary files left by killed writers (`.<name>.tmp-<pid>`, in the folder and its subfolders
    such as final/) are removed once the lock is held.
    """
    folder = Path(folder)
    check(folder, resume)
    folder.mkdir(parents=True, exist_ok=True)
    run = RunFolder(folder, _lock(folder))
    try:
        check(folder, resume, probe_lock=False)  # again under the lock: another process may have written meanwhile
        if read_marker(folder) is None:
            _write_marker(folder)
        for sub in [folder, *(entry for entry in folder.iterdir() if entry.is_dir())]:
            remove_stale_temporaries(sub)
        yield run
    finally:
        run.release()
