"""A loopback stand-in for the Hugging Face Hub file endpoint, for download tests without network.

Serves ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{path}`` the way huggingface.co answers
``hf_hub_download`` (see ``huggingface_hub.file_download.get_hf_file_metadata`` and
``huggingface_hub.utils._http.hf_raise_for_status``):

* 200 with ``X-Repo-Commit`` (the 40-hex commit the revision resolves to), ``ETag`` (quoted;
  here the file's SHA-256, as the Hub sends for LFS files) and ``Content-Length``;
* 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the last
  with ``X-Repo-Commit``, which the client uses to cache the file's absence).

Revisions resolve by name (``"main"``, a tag) or by the commit hash the server derived for it.
Usage in a test::

    def test_x(fake_hub):
        fake_hub.add("org/repo", "main", {"model.safetensors": b"..."})
        download_file("org/repo", "model.safetensors", endpoint=fake_hub.endpoint, cache_dir=...)
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest


class FakeHub:
    """Repos held in memory and served on ``127.0.0.1:<random port>``.

    Attributes:
        endpoint: base URL to pass as ``endpoint=`` (e.g. ``"http://127.0.0.1:40123"``).
        requests: ``(method, path)`` of every request received, in order.
    """

    def __init__(self) -> None:
        # {repo_id: {revision name: (commit, {filename: bytes})}}
        self._repos: dict[str, dict[str, tuple[str, dict[str, bytes]]]] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    def add(self, repo_id: str, revision: str, files: dict[str, bytes]) -> str:
        """Publish ``files`` as ``repo_id`` at ``revision``; returns the revision's commit hash (the
        revision itself when it is a 40-hex commit hash, as a pinned registry entry names one)."""
        is_commit = re.fullmatch(r"[0-9a-f]{40}", revision) is not None
        commit = revision if is_commit else hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        with self._lock:
            self._repos.setdefault(repo_id, {})[revision] = (commit, dict(files))
        return commit

    def commit_of(self, repo_id: str, revision: str) -> str:
        """The commit hash ``revision`` (a name given to :meth:`add`) resolves to."""
        with self._lock:
            return self._repos[repo_id][revision][0]

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def resolve(self, repo_id: str, revision: str, filename: str) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body the Hub would answer for one file (body ignored for HEAD)."""
        with self._lock:
            revisions = self._repos.get(repo_id)
            if revisions is None:
                return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
            found = revisions.get(revision) or next(
                (entry for entry in revisions.values() if entry[0] == revision), None
            )
        if found is None:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        commit, files = found
        if filename not in files:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit}
            return 404, headers, b""
        body = files[filename]
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Length": str(len(body)),
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, send_body: bool) -> None:
                path = urlsplit(self.path).path
                hub.requests.append((self.command, path))
                # /{org}/{name}/resolve/{revision}/{file...}; the client percent-encodes the
                # revision (so "refs/pr/1" arrives as one segment).
                parts = path.lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    status, headers, body = 404, {"X-Error-Message": "Not a resolve URL"}, b""
                else:
                    repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
                    filename = "/".join(unquote(p) for p in parts[4:])
                    status, headers, body = hub.resolve(repo_id, unquote(parts[3]), filename)
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(body)) if status == 200 else "0")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if send_body and status == 200:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                # Requests are recorded in hub.requests; keep pytest output clean.
                pass

        return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    """A running :class:`FakeHub`; loopback traffic bypasses any configured proxy."""
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)
    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.close()
