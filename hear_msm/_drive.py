"""The authors' checkpoints on Google Drive, fetched with gdown: one file, never the whole folder.

The authors publish each family as one public Drive folder of run folders
(`<run>/checkpoints/checkpoint-<epoch>.pth` inside). `find_file` lists that folder through gdown
(Drive's folder view, one page per sub-folder; no file is fetched) and returns the Drive id of the
one file asked for; `download` fetches that file with a progress bar. gdown follows Drive's
redirect and its "cannot scan this file for viruses" confirmation page, keeps the bytes in a
`<name><8 characters>.part` file beside the target until the last one has arrived, resumes that
file after an interruption and retries a transfer that broke off. Every failure is a `DriveError`
that says in words what went wrong.

Network settings are those of `requests`, which gdown uses: HTTPS_PROXY / NO_PROXY and
REQUESTS_CA_BUNDLE are honoured (the tests point gdown at a loopback server that way). gdown's
cookie jar (~/.cache/gdown/cookies.txt) is neither read nor written: Drive's confirmation step
needs only the cookies of the session itself.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path, PurePosixPath

__all__ = ["DriveError", "download", "find_file", "partial_files"]

TIMEOUT = (20, 120)  # seconds to connect, and at most between two reads of the body
RETRIES = 2  # a transfer that breaks off is resumed this many times within one download
_PARTIAL_SUFFIX = ".part"
_PARTIAL_RANDOM_CHARS = 8  # gdown names partial files <name><8 random characters>.part


class DriveError(Exception):
    """Google Drive did not give us the file; the message says why in words."""


def find_file(folder_url: str, path: str) -> str:
    """The Drive id of the file at `path` (e.g. "run/checkpoints/checkpoint-99.pth") in a public folder.

    Raises:
        DriveError: the folder cannot be listed (Drive unreachable, refused, not public), or it
            does not hold `path` (the message lists what it holds instead).
    """
    import gdown
    import requests

    try:
        entries = gdown.download_folder(url=folder_url, skip_download=True, quiet=True, use_cookies=False,
                                          timeout=TIMEOUT)
    except gdown.exceptions.DownloadError as error:
        raise DriveError(f"Google Drive refused to list the folder {folder_url}: {_one_line(error)}") from error
    except requests.RequestException as error:
        raise DriveError(f"Google Drive could not be reached to list the folder {folder_url} "
                         f"({type(error).__name__}: {_one_line(error)})") from error
    wanted = PurePosixPath(path)
    listed = [(PurePosixPath(Path(entry.path).as_posix()), entry.id) for entry in entries]
    for listed_path, file_id in listed:
        if listed_path == wanted:
            return file_id
    same_run = sorted(str(p) for p, _ in listed if p.parts[:1] == wanted.parts[:1])
    runs = sorted({p.parts[0] for p, _ in listed if p.parts})
    holds = (f"its folder {wanted.parts[0]} holds {same_run[:6]}" if same_run else
             f"it holds {runs[:12]}" if runs else "it lists no files")
    raise DriveError(f"the Drive folder {folder_url} no longer holds {path}; the folder changed ({holds})")


def download(file_id: str, target: Path, label: str) -> str:
    """Fetch the Drive file `file_id` into `target` and return its SHA-256 (hex).

    `target` appears only once complete (gdown renames its `.part` file). A partial file left by
    an earlier, interrupted call is resumed, its bytes hashed first; if Drive does not honour the
    byte range (or several partial files are left), they are deleted and the download restarts.
    A progress bar named `label` goes to stderr.

    Raises:
        DriveError: Drive unreachable, a refusal (quota, permissions: Drive's own words are
            quoted), or a transfer that kept breaking off (its bytes are kept for the next call).
    """
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    if target.is_file():  # gdown would skip it without hashing it
        from ._hub import sha256_of_file

        return sha256_of_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if len(partial_files(target)) > 1:  # gdown refuses to choose; none of them can be trusted more
        remove_partial_files(target)
    for attempt in ("first", "restart"):
        resumed = bool(partial_files(target))
        hasher = hashlib.sha256()
        try:
            with _ProgressBar(label) as bar:
                gdown.download(id=file_id, output=str(target), quiet=True, resume=True, hasher=hasher, use_cookies=False,
                               progress=bar.update_to, retries=RETRIES, timeout=TIMEOUT)
            return hasher.hexdigest()
        except FileURLRetrievalError as error:  # Drive answered a page instead of the file
            raise DriveError(f"Google Drive refused the file {file_id}: {_refusal(error)}") from error
        except DownloadError as error:
            if resumed and attempt == "first" and "byte range" in str(error):
                remove_partial_files(target)  # Drive sent the whole file again: start over
                continue
            raise DriveError(_broken_transfer(file_id, target, error)) from error
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else "an error"
            raise DriveError(f"Google Drive answered HTTP {status} for the file {file_id}") from error
        except requests.RequestException as error:
            raise DriveError(f"Google Drive could not be reached ({type(error).__name__}: {_one_line(error)}); "
                             + _kept(target)) from error
    raise AssertionError("unreachable: the restart attempt returns or raises")


def partial_files(target: Path) -> list[Path]:
    """gdown's partial files for `target`: `<name><8 characters>.part` in the same folder."""
    if not target.parent.is_dir():
        return []
    length = len(target.name) + _PARTIAL_RANDOM_CHARS + len(_PARTIAL_SUFFIX)
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith(target.name) and p.name.endswith(_PARTIAL_SUFFIX) and len(p.name) == length)


def remove_partial_files(target: Path) -> None:
    for partial in partial_files(target):
        partial.unlink(missing_ok=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _refusal(error: BaseException) -> str:
    """Drive's own reason, without gdown's advice about its command line."""
    text = _one_line(error)
    reason = text.split("Failed to retrieve file url:", 1)[-1].split("You may still be able to access", 1)[0].strip()
    return reason or text


def _kept(target: Path) -> str:
    partial = partial_files(target)
    if not partial:
        return "nothing was kept"
    return (f"the {partial[0].stat().st_size:,} bytes received are kept in {partial[0]} "
            "and the next attempt resumes from there")


def _broken_transfer(file_id: str, target: Path, error: BaseException) -> str:
    return (f"the download of the Drive file {file_id} did not complete after {RETRIES + 1} attempts "
            f"({_one_line(error).split(' The received bytes')[0].rstrip('.')}); {_kept(target)}")


class _ProgressBar:
    """A tqdm byte counter on stderr fed by gdown's `progress(bytes_so_far, bytes_total)` callback."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self.bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)

    def update_to(self, done: int, total: int | None) -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()
