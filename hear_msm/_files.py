"""Files written for a user: atomically, with the permissions their umask allows.

Every file hear_msm writes on a user's behalf (embeddings, converted or exported weights, results
tables, checkpoints, logs rewritten in place) goes through `atomic_write`: the bytes go to a
temporary file in the destination's folder, are flushed to disk, and only then renamed over the
destination. A failed write (disk full, quota, a killed process) leaves the old file untouched and
no partial file behind; a killed process can leave only a `.<name>.tmp-<pid>` file, which
`remove_stale_temporaries` clears on the next start.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import IO, Iterator

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no other thread writes files here)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_path(path: Path) -> Path:
    """The temporary sibling `atomic_write` uses for `path` in this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; on success fsync it and rename it over `path`.

    The file gets mode 0o666 minus the umask, as `open()` would give it (tempfile's 0o600 would hide
    weights from the user's group). On any exception the temporary is removed, `path` is unchanged
    and the exception propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing only ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when writing failed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete `.<name>.tmp-<pid>` files in `folder` whose writer process is gone; return them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and entry.is_file() and not _process_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
