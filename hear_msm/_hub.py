"""Weights on the Hugging Face Hub: ``hf://org/repo[@revision]`` addresses and cached downloads.

Downloads go through ``huggingface_hub.hf_hub_download``, so they share the user's Hub cache
(``HF_HUB_CACHE``) and honour ``HF_HUB_OFFLINE``.  This module only turns the Hub's errors into
messages that say what is missing and what to do about it, and optionally checks a SHA-256.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["download_file", "parse_hf_uri", "sha256_of_file"]

_HF_URI = re.compile(r"^hf://(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?$")
_HF_URI_FORM = "hf://<org>/<repo> or hf://<org>/<repo>@<revision> (a branch, tag or 40-hex commit)"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK_BYTES = 1 << 20


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """Split ``hf://org/repo[@revision]`` into ``(repo_id, revision)``.

    Args:
        uri: e.g. ``"hf://org/ssam-tiny"`` or ``"hf://org/ssam-tiny@v1.0"``.

    Returns:
        ``("org/ssam-tiny", None)`` or ``("org/ssam-tiny", "v1.0")``; ``None`` means the
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
    return repo_id, match.group("revision")


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
        sha256: if given (64 hex digits), the file's SHA-256 must match, else ``ValueError``.
        endpoint: Hub URL, e.g. ``"http://127.0.0.1:8080"``; ``None`` uses ``HF_ENDPOINT`` or
            https://huggingface.co.
        cache_dir: Hub cache folder; ``None`` uses ``HF_HUB_CACHE``.

    Returns:
        Path of the file inside the cache (a symlink into ``blobs/`` on most systems).

    Raises:
        FileNotFoundError: the repo, revision or file does not exist on the Hub, or the Hub
            cannot be reached (offline, no network) and the file is not in the cache.
        ValueError: ``sha256`` is malformed or does not match the file.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    what = f"{filename!r} of {repo_id!r}" + (f" at revision {revision!r}" if revision else "")

    try:
        local = Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                endpoint=endpoint,
                cache_dir=cache_dir,
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

    if sha256 is not None:
        actual = sha256_of_file(local)
        if actual != sha256.lower():
            cache_flag = f" --cache-dir {cache}" if cache_dir is not None else ""
            raise ValueError(
                f"SHA-256 mismatch for {local} ({what}): expected {sha256.lower()}, got {actual}. The "
                "cached copy is corrupt or the repository changed. Delete it (remove "
                f"{local.resolve()} and {local}, or run `hf cache rm model/{repo_id}{cache_flag}`) and download "
                "again, or pin the revision the checksum belongs to."
            )
    return local


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
    from huggingface_hub import constants

    download = f"hf download {repo_id} {filename}" + (f" --revision {revision}" if revision else "")
    if constants.HF_HUB_OFFLINE:
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
