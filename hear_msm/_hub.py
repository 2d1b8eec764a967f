"""Weights on the Hugging Face Hub: ``hf://`` addresses, the Hub cache and cached downloads.

Downloads go through ``huggingface_hub.hf_hub_download``, so they share the user's Hub cache
(``HF_HUB_CACHE`` / ``HF_HOME``) and honour ``HF_HUB_OFFLINE``; both are read when a download is
asked for, not when huggingface_hub was imported. This module turns the Hub's errors into messages
that say what is missing and what to do about it, and checks each file's SHA-256: against a
registered checksum when there is one, otherwise against the one recorded when the file was first
downloaded (the name of its blob in the cache, which is the SHA-256 the Hub announced for it).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "HubAddress", "download_file", "hub_cache_dir", "is_offline", "parse_hf_uri", "recorded_sha256", "sha256_of_file",
]

_HF_URI = re.compile(
    r"^hf://(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)"
    r"(?:/(?P<file>[\w.-]+(?:/[\w.-]+)*))?(?:@(?P<revision>[^@\s]+))?$"
)
_HF_URI_FORM = (
    "hf://<org>/<repo>, hf://<org>/<repo>/<file> (one file of a repo, e.g. a .pth), each optionally "
    "followed by @<revision> (a branch, tag or 40-hex commit)"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK_BYTES = 1 << 20
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's truthy environment values


class HubAddress(NamedTuple):
    """``hf://org/repo[/file][@revision]`` taken apart; ``filename`` and ``revision`` may be None."""

    repo_id: str
    filename: str | None
    revision: str | None


def parse_hf_uri(uri: str) -> HubAddress:
    """Split ``hf://org/repo[/path/file][@revision]`` into its parts.

    Args:
        uri: e.g. ``"hf://org/ssam-tiny"``, ``"hf://org/ssam-tiny@v1.0"`` or
            ``"hf://attentionisallyouneed369/ssamba/ssamba_tiny_400.pth@25497b5..."``.

    Returns:
        ``HubAddress("org/ssam-tiny", None, None)`` and so on; a ``None`` filename means the
        repo holds hear_msm weights (config.json + model.safetensors), a ``None`` revision the
        default branch.

    Raises:
        ValueError: ``uri`` is not of that form.
    """
    from huggingface_hub.utils import validate_repo_id

    match = _HF_URI.match(uri) if isinstance(uri, str) else None
    if match is None:
        raise ValueError(f"not a Hugging Face Hub address: {uri!r}; expected {_HF_URI_FORM}")
    repo_id = f"{match.group('org')}/{match.group('name')}"
    try:
        validate_repo_id(repo_id)  # the Hub's own rules: no "--" or "..", length, ...
    except ValueError as err:
        raise ValueError(f"not a valid Hub repo id in {uri!r} ({err}); expected {_HF_URI_FORM}") from None
    filename = match.group("file")
    if filename is not None and any(part in (".", "..") for part in filename.split("/")):
        raise ValueError(f"not a file of a Hub repo in {uri!r}: no '.' or '..' path parts; expected {_HF_URI_FORM}")
    return HubAddress(repo_id, filename, match.group("revision"))


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub would find it if it were imported now.

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(os.path.expanduser(explicit)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now or was at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def download_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    sha256: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Fetch one file of a Hub model repo into the Hub cache (or find it there) and return its path.

    Args:
        repo_id: ``"org/name"``.
        filename: path of the file inside the repo, e.g. ``"model.safetensors"``.
        revision: branch, tag or commit hash; ``None`` is the default branch (``main``).
        sha256: if given (64 hex digits), the file's SHA-256 must match, else ``ValueError``;
            if not, the file must match the SHA-256 recorded when it was first downloaded
            (``recorded_sha256``), if one was.
        endpoint: Hub URL, e.g. ``"http://127.0.0.1:8080"``; ``None`` uses ``HF_ENDPOINT`` or
            https://huggingface.co.
        cache_dir: Hub cache folder; ``None`` uses ``hub_cache_dir()`` (``HF_HUB_CACHE``, ``HF_HOME``).

    Returns:
        Path of the file inside the cache (a symlink into ``blobs/`` on most systems).

    Raises:
        FileNotFoundError: the repo, revision or file does not exist on the Hub, or the Hub
            cannot be reached (offline, no network) and the file is not in the cache.
        ValueError: ``sha256`` is malformed or does not match the file.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    what = f"{filename!r} of {repo_id!r}" + (f" at revision {revision!r}" if revision else "")

    try:
        local = Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                endpoint=endpoint,
                cache_dir=str(cache),
                local_files_only=is_offline(),
            )
        )
    # Order matters: GatedRepoError subclasses RepositoryNotFoundError, and
    # LocalEntryNotFoundError subclasses EntryNotFoundError.
    except GatedRepoError as err:
        raise FileNotFoundError(
            f"cannot download {what}: the repository is gated; accept its terms on the Hub and log in "
            "with `hf auth login` (or set HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"cannot download {what}: repository {repo_id!r} does not exist on {_endpoint_name(endpoint)} "
            "(or it is private and no valid token was given); check the repo id"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(
            f"cannot download {what}: revision {revision!r} does not exist in {repo_id!r}; use a "
            "branch, tag or commit hash of that repository"
        ) from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(_not_cached_message(repo_id, filename, revision, cache)) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"cannot download {what}: the repository has no file {filename!r} at that revision"
        ) from err

    expected, recorded = (sha256.lower(), "registered") if sha256 is not None else (recorded_sha256(local), "recorded")
    if expected is not None:
        actual = sha256_of_file(local)
        if actual != expected:
            cache_flag = f" --cache-dir {cache}" if cache_dir is not None else ""
            raise ValueError(
                f"SHA-256 mismatch for {local} ({what}): the {recorded} checksum is {expected}, the file's is "
                f"{actual}. The cached copy is corrupt or changed since it was downloaded, or the repository "
                f"changed. Delete it (remove {local.resolve()} and {local}, or run "
                f"`hf cache rm model/{repo_id}{cache_flag}`) and download again, or pin the revision the "
                "checksum belongs to."
            )
    return local


def recorded_sha256(local: Path) -> str | None:
    """The SHA-256 recorded for a cached file when it was downloaded, if the cache recorded one.

    The Hub cache keeps every file as ``blobs/<etag>`` behind a symlink in ``snapshots/``; for
    files stored with Git LFS (weights) the etag is the file's SHA-256, as the Hub announced it
    in the download's headers. Small files kept in git (config.json) have a 40-hex git hash
    there instead, and caches without symlinks (Windows) no blob name: then ``None``.
    """
    if not local.is_symlink():
        return None
    name = local.resolve().name
    return name if _SHA256.match(name) else None


def sha256_of_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks so large weights never sit in memory at once."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _endpoint_name(endpoint: str | None) -> str:
    if endpoint is not None:
        return endpoint
    from huggingface_hub import constants

    return constants.ENDPOINT


def _not_cached_message(repo_id: str, filename: str, revision: str | None, cache: Path) -> str:
    download = f"hf download {repo_id} {filename}" + (f" --revision {revision}" if revision else "")
    if is_offline():
        why = "HF_HUB_OFFLINE is set, so the Hub was not contacted"
        online = "unset HF_HUB_OFFLINE (or set it to 0) to download on first use, or run"
    else:
        why = "the Hub could not be reached"
        online = "check the network connection, or on a machine that is online run"
    return (
        f"the weights {filename!r} of {repo_id!r}"
        + (f" at revision {revision!r}" if revision else "")
        + f" are not in the Hugging Face cache at {cache}, and {why}. To fix: {online} "
        f"`{download}` (older huggingface_hub: `huggingface-cli download ...`) with the same "
        "HF_HUB_CACHE; or pass the path of a local weights file instead of the hf:// address."
    )
