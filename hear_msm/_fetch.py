"""Registry weights that live on the authors' Google Drive: fetched on first use, converted once, then offline.

The first time such a tag is asked for, the one checkpoint file it names is downloaded (with a
progress bar) into the Hugging Face cache and converted there to hear_msm's format (config.json +
model.safetensors + a model card), with download.json recording where it came from and the
SHA-256 of the checkpoint and of the converted weights; the checkpoint is then deleted. Later
loads read the converted files, offline, and check them against the SHA-256 recorded at download:
a changed file is an error that says so. The folder is laid out like a model repo of the Hub cache,
so `hf cache ls` lists it and `hf cache rm model/hear-msm-gdrive/<arch>.<tag>` removes it:

    <hub cache>/models--hear-msm-gdrive--<arch>.<tag>/
        refs/main                     the Drive file id of the snapshot in use (written last)
        snapshots/<Drive file id>/    config.json, model.safetensors, README.md, download.json
        blobs/<Drive file id>/<name>  the checkpoint, under its name on Drive, while it downloads and converts
                                      (gdown's .part beside it)
    <hub cache>/.locks/models--hear-msm-gdrive--<arch>.<tag>/download.lock

The hub cache is `HF_HUB_CACHE` (or `HF_HOME/hub`, as huggingface_hub finds it); `HF_HUB_OFFLINE=1`
turns a missing entry into an error instead of a download. One process downloads while the others
wait on the lock and then read what it wrote; every file is written atomically, and an entry
counts only once refs/main names it, so an interrupted download or conversion is picked up again
(resumed, or restarted) by the next load.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from . import _drive, _hub
from ._files import remove_stale_temporaries, write_text_atomic

__all__ = ["DRIVE_NAMESPACE", "cache_entry", "fetch_drive_tag"]

DRIVE_NAMESPACE = "hear-msm-gdrive"
MANIFEST_NAME = "download.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_VERSION = 1

# convert(checkpoint file, snapshot folder, manifest) writes config.json, model.safetensors and README.md
# into the folder and may add facts (e.g. the epoch) to the manifest
Converter = Callable[[Path, Path, dict], None]


def cache_entry(label: str) -> Path:
    """The cache folder of a Drive tag `label` ("ssam_base.audioset_as2m_r1")."""
    return _hub.hub_cache_dir() / f"models--{DRIVE_NAMESPACE}--{label}"


def fetch_drive_tag(label: str, entry: dict, manual_route: str, convert: Converter) -> tuple[Path, dict]:
    """The snapshot folder holding `label`'s converted weights, downloading them first if needed.

    entry: the registry tag (`google_drive_folder`, `checkpoint` relative to it, optional
        `checkpoint_sha256` that the download must match).
    manual_route: appended to every "cannot get them" error: how to get the weights by hand.

    Returns:
        (snapshot folder with config.json + model.safetensors, the download.json manifest).

    Raises:
        FileNotFoundError: not cached and offline, or Drive could not give the file.
        ValueError: a checksum does not match (the message says which file and what to do).
    """
    repo = cache_entry(label)
    found = _complete_snapshot(repo)
    if found is None:
        if _hub.is_offline():
            raise FileNotFoundError(
                f"the weights {label} are not in the cache ({repo}) and HF_HUB_OFFLINE is set, so they cannot "
                f"be downloaded now (on first use they are fetched once from the authors' Google Drive and "
                f"converted; unset HF_HUB_OFFLINE for that).\n{manual_route}"
            )
        found = _download_once(repo, label, entry, manual_route, convert)
    snapshot, manifest = found
    _verify(repo, label, snapshot, manifest, entry)
    return snapshot, manifest


def _complete_snapshot(repo: Path) -> tuple[Path, dict] | None:
    """The snapshot refs/main names, if it holds its manifest and weights; None otherwise (nothing
    there yet, or an interrupted or damaged entry that the next download replaces)."""
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
    if not (snapshot / MANIFEST_NAME).is_file() or not (snapshot / WEIGHTS_NAME).is_file():
        return None
    try:
        manifest = json.loads((snapshot / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("weights_sha256"), str):
        return None
    return snapshot, manifest


def _download_once(repo: Path, label: str, entry: dict, manual_route: str, convert: Converter) -> tuple[Path, dict]:
    """Download and convert under the entry's lock; a process that waited finds the work done."""
    from filelock import FileLock, Timeout

    lock_file = repo.parent / ".locks" / repo.name / "download.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"hear_msm: waiting for another process that is downloading {label} ...", file=sys.stderr)
        lock.acquire()
    try:
        return _complete_snapshot(repo) or _download_and_convert(repo, label, entry, manual_route, convert)
    finally:
        lock.release()


def _download_and_convert(repo: Path, label: str, entry: dict, manual_route: str,
                          convert: Converter) -> tuple[Path, dict]:
    folder, checkpoint = entry["google_drive_folder"], entry["checkpoint"]
    print(f"hear_msm: {label} is not cached yet; downloading {checkpoint} once from the authors' Google Drive "
          f"({folder}) into {repo}", file=sys.stderr)
    try:
        file_id = _drive.find_file(folder, checkpoint)
        blob = repo / "blobs" / file_id / Path(checkpoint).name  # its own name: Flax runs are found by it
        checkpoint_sha256 = _drive.download(file_id, blob, label)
    except _drive.DriveError as error:
        raise FileNotFoundError(
            f"cannot download the weights {label} from Google Drive: {error}.\n{manual_route}") from None
    registered = (entry.get("checkpoint_sha256") or "").lower()
    if registered and checkpoint_sha256 != registered:
        blob.unlink()
        raise ValueError(
            f"the checkpoint downloaded for {label} ({checkpoint} on Google Drive) has SHA-256 {checkpoint_sha256}, "
            f"the registry expects {registered}: the file on Drive changed. It was deleted.\n{manual_route}"
        )
    snapshot = repo / "snapshots" / file_id
    snapshot.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(snapshot)  # left by a conversion that was killed
    manifest = {
        "format_version": MANIFEST_VERSION, "tag": label, "source": "google_drive", "folder": folder,
        "file": checkpoint, "drive_file_id": file_id, "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_bytes": blob.stat().st_size, "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        convert(blob, snapshot, manifest)
    except ValueError as error:
        blob.unlink()
        raise ValueError(f"the checkpoint downloaded for {label} ({checkpoint}) cannot be used: {error}. "
                         f"The Drive folder may have changed; the file was deleted.\n{manual_route}") from None
    manifest["weights_sha256"] = _hub.sha256_of_file(snapshot / WEIGHTS_NAME)
    write_text_atomic(snapshot / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    (repo / "refs").mkdir(exist_ok=True)
    write_text_atomic(repo / "refs" / "main", file_id)  # the entry counts from here on
    blob.unlink()
    print(f"hear_msm: {label} converted and cached in {snapshot} "
          f"(checkpoint SHA-256 {checkpoint_sha256}, recorded)", file=sys.stderr)
    return snapshot, manifest


def _verify(repo: Path, label: str, snapshot: Path, manifest: dict, entry: dict) -> None:
    """The converted weights must be those written at download, from the checkpoint the registry names."""
    again = f"delete {repo} (or run `hf cache rm model/{DRIVE_NAMESPACE}/{label}`) and load them again to re-download"
    actual = _hub.sha256_of_file(snapshot / WEIGHTS_NAME)
    if actual != manifest["weights_sha256"]:
        raise ValueError(
            f"the cached weights {snapshot / WEIGHTS_NAME} ({label}) changed since they were downloaded on "
            f"{manifest.get('downloaded', 'an unknown date')}: their SHA-256 is {actual}, {manifest['weights_sha256']} "
            f"was recorded then. The file is damaged or was modified; {again}."
        )
    registered = (entry.get("checkpoint_sha256") or "").lower()
    if registered and manifest.get("checkpoint_sha256") != registered:
        raise ValueError(
            f"the cached weights {label} were converted from a checkpoint with SHA-256 "
            f"{manifest.get('checkpoint_sha256')}, but the registry now expects {registered}; {again}."
        )
