"""Hub downloads through a real loopback HTTP server (tests/hub_server.py) and a temp cache.

``HF_HUB_OFFLINE`` is read when ``huggingface_hub`` is imported, so offline behaviour is tested
in a subprocess started with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=<tmp>``.
"""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from hear_msm._hub import download_file, parse_hf_uri, sha256_of_file


REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = b"\x00weights-v2\x01" * 4096  # 49 KiB, binary
OLD_WEIGHTS = b"weights-v1" * 100


@pytest.fixture
def hub(fake_hub):
    fake_hub.add("hear-msm/ssam-tiny", "main", {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    fake_hub.add("hear-msm/ssam-tiny", "v1", {"model.safetensors": OLD_WEIGHTS})
    return fake_hub


def _run_offline(cache: Path, *call_args: str) -> dict:
    """Call download_file in a fresh interpreter with HF_HUB_OFFLINE=1; returns its result or error."""
    script = (
        "import json, sys\n"
        "from hear_msm._hub import download_file\n"
        "try:\n"
        "    path = download_file(*json.loads(sys.argv[1]))\n"
        "    print(json.dumps({'path': str(path), 'data': path.read_bytes().hex()}))\n"
        "except Exception as err:\n"
        "    print(json.dumps({'error': type(err).__name__, 'message': str(err)}))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(call_args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_parse_hf_uri():
    assert parse_hf_uri("hf://hear-msm/ssam-tiny") == ("hear-msm/ssam-tiny", None, None)
    assert parse_hf_uri("hf://hear-msm/ssam_tiny.v2@v1.0") == ("hear-msm/ssam_tiny.v2", None, "v1.0")
    commit = "a" * 40
    assert parse_hf_uri(f"hf://org/repo@{commit}") == ("org/repo", None, commit)
    # one file of a repo of several (SSAMBA's layout), optionally in a sub-folder
    address = parse_hf_uri(f"hf://attentionisallyouneed369/ssamba/ssamba_tiny_400.pth@{commit}")
    assert address == ("attentionisallyouneed369/ssamba", "ssamba_tiny_400.pth", commit)
    assert (address.repo_id, address.filename, address.revision) == tuple(address)
    nested = parse_hf_uri("hf://org/repo/weights/v2/model.safetensors")
    assert nested == ("org/repo", "weights/v2/model.safetensors", None)
    assert parse_hf_uri("hf://org/repo/file.bin@refs/pr/1") == ("org/repo", "file.bin", "refs/pr/1")
    for bad in ("hear-msm/ssam-tiny", "hf://ssam-tiny", "hf://org/repo/", "hf://org/repo//file.pth",
                "hf://org/repo/../file.pth", "hf://org/repo@", "https://huggingface.co/org/repo",
                "hf://org/re--po", "hf://org/repo@a@b", "hf://org/repo/file.pth@"):
        with pytest.raises(ValueError, match=r"hf://<org>/<repo>"):
            parse_hf_uri(bad)


def test_download_then_offline_from_cache(hub, tmp_path):
    cache = tmp_path / "cache"
    path = download_file("hear-msm/ssam-tiny", "model.safetensors", endpoint=hub.endpoint, cache_dir=cache)
    assert path.read_bytes() == WEIGHTS
    assert cache in path.parents
    commit = hub.commit_of("hear-msm/ssam-tiny", "main")
    assert (cache / "models--hear-msm--ssam-tiny" / "refs" / "main").read_text() == commit
    assert ("HEAD", "/hear-msm/ssam-tiny/resolve/main/model.safetensors") in hub.requests
    assert any(method == "GET" for method, _ in hub.requests)

    served = len(hub.requests)
    result = _run_offline(cache, "hear-msm/ssam-tiny", "model.safetensors", None, hashlib.sha256(WEIGHTS).hexdigest())
    assert "error" not in result, result
    assert bytes.fromhex(result["data"]) == WEIGHTS
    assert Path(result["path"]) == path
    assert len(hub.requests) == served  # nothing asked of the server


def test_offline_with_empty_cache_explains_what_to_do(tmp_path):
    cache = tmp_path / "empty"
    result = _run_offline(cache, "hear-msm/ssam-tiny", "model.safetensors", "v1")
    assert result["error"] == "FileNotFoundError"
    message = result["message"]
    assert "not in the Hugging Face cache" in message and str(cache) in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download hear-msm/ssam-tiny model.safetensors --revision v1" in message
    assert "local weights file" in message


def test_unreachable_hub_with_empty_cache(tmp_path, fake_hub, monkeypatch):
    # huggingface_hub retries refused connections with exponential back-off (~23 s in all);
    # skip the waiting, not the retries.
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    endpoint = fake_hub.endpoint
    fake_hub.close()  # the port now refuses connections
    with pytest.raises(FileNotFoundError, match="could not be reached") as info:
        download_file("hear-msm/ssam-tiny", "model.safetensors", endpoint=endpoint, cache_dir=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_repo_revision_and_file(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="repository 'hear-msm/nope' does not exist"):
        download_file("hear-msm/nope", "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="revision 'v9' does not exist in 'hear-msm/ssam-tiny'"):
        download_file("hear-msm/ssam-tiny", "model.safetensors", revision="v9", endpoint=hub.endpoint,
                      cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="has no file 'weights.pt'"):
        download_file("hear-msm/ssam-tiny", "weights.pt", endpoint=hub.endpoint, cache_dir=tmp_path)


def test_sha256_is_checked(hub, tmp_path):
    good = hashlib.sha256(WEIGHTS).hexdigest()
    path = download_file("hear-msm/ssam-tiny", "model.safetensors", sha256=good.upper(), endpoint=hub.endpoint,
                         cache_dir=tmp_path)
    assert sha256_of_file(path) == good

    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ValueError, match="SHA-256 mismatch") as info:
        download_file("hear-msm/ssam-tiny", "model.safetensors", sha256=wrong, endpoint=hub.endpoint,
                      cache_dir=tmp_path)
    message = str(info.value)
    assert wrong in message and good in message and str(path) in message and "hf cache rm" in message
    assert path.read_bytes() == WEIGHTS  # the cache is left alone

    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        download_file("hear-msm/ssam-tiny", "model.safetensors", sha256="abc", endpoint=hub.endpoint,
                      cache_dir=tmp_path)


def test_pinned_commit(hub, tmp_path):
    v1_commit = hub.commit_of("hear-msm/ssam-tiny", "v1")
    repo_id, _, revision = parse_hf_uri(f"hf://hear-msm/ssam-tiny@{v1_commit}")
    path = download_file(repo_id, "model.safetensors", revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path)
    assert path.read_bytes() == OLD_WEIGHTS
    assert path.parent.name == v1_commit  # snapshots/<commit>/model.safetensors

    # A commit hash already in the cache is served without asking the Hub.
    served = len(hub.requests)
    again = download_file(repo_id, "model.safetensors", revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path)
    assert again == path and len(hub.requests) == served

    result = _run_offline(tmp_path, repo_id, "model.safetensors", v1_commit)
    assert bytes.fromhex(result["data"]) == OLD_WEIGHTS
    latest = download_file(repo_id, "model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert latest.read_bytes() == WEIGHTS
