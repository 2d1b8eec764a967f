"""A loopback stand-in for Google Drive, reached by the real gdown through an HTTPS proxy.

gdown builds its URLs on https://drive.google.com itself (no endpoint setting), so the test
points `requests` (which gdown uses) at a proxy on 127.0.0.1 with the standard variables,
``HTTPS_PROXY`` and ``REQUESTS_CA_BUNDLE``: the proxy accepts ``CONNECT`` only for Drive's three
hosts, answers the TLS handshake itself with a certificate for them signed by a CA made for the
test session (openssl), and serves the pages gdown 6.5 reads (see its download_folder.py and
download.py):

* ``GET drive.google.com/embeddedfolderview?id=<folder>``: the folder view, ``<title>`` = folder
  name, one ``<a href="https://drive.google.com/drive/folders/<id>">`` per sub-folder and one
  ``<a href="https://drive.google.com/file/d/<id>/view?usp=drive_web">`` per file;
* ``GET drive.google.com/uc?id=<file>``: 303 to ``drive.usercontent.google.com/download``;
* ``GET drive.usercontent.google.com/download?id=..&export=download``: Drive's "cannot scan this
  file for viruses" page, whose one-line ``<form id="download-form">`` carries ``confirm`` and
  ``uuid``; with them, the file (``Content-Disposition: attachment``, ``ETag``, ``Accept-Ranges``),
  or ``206 Partial Content`` for ``Range: bytes=N-`` when ``If-Range`` matches the ETag.

Failure modes for the tests: a refused folder view, Drive's quota page, a transfer that stops
after some bytes, a server that ignores ranges, a slow transfer. Nothing leaves the machine: the
client never resolves Drive's names (the proxy does, by answering itself), and the proxy refuses
every other host.
"""
from __future__ import annotations

import hashlib
import html
import shutil
import socket
import ssl
import subprocess
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

DRIVE_HOSTS = ("drive.google.com", "drive.usercontent.google.com", "docs.google.com")
CHUNK = 64 * 1024


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for Drive's hosts signed by it: (ca.pem, server.pem, server.key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the loopback Drive's TLS certificate")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    extensions = folder / "server.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=" + ",".join(f"DNS:{h}" for h in DRIVE_HOSTS) + "\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    commands = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=hear_msm loopback test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=drive.google.com"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", extensions],
    ]
    for command in commands:
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


def drive_id(text: str) -> str:
    """A Drive-like id (33 characters of [-\\w]) derived from `text`."""
    return "1" + hashlib.sha1(text.encode()).hexdigest()[:32]


class FakeDrive:
    """Public folders and files served as Drive serves them, behind a loopback HTTPS proxy.

    Attributes:
        proxy: the proxy URL for HTTPS_PROXY; ca_file: the CA bundle for REQUESTS_CA_BUNDLE.
        requests: (host, method, path?query, Range header or "") of every request, in order.
        refused: the CONNECT targets refused (anything but Drive's hosts).
        Failure knobs (set by tests): refuse_listing (an HTTP status for every folder view),
        quota (file ids answered with Drive's quota page), cuts (file id -> list of byte counts:
        each of the next transfers of that file stops after that many bytes), ignore_range,
        throttle (seconds to sleep per 64 KiB sent).
    """

    def __init__(self, certificates: tuple[Path, Path, Path]):
        self.ca_file, cert, key = certificates
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(str(cert), str(key))
        self.folders: dict[str, tuple[str, list[tuple[str, str, str]]]] = {}  # id -> (name, [(kind, id, name)])
        self.files: dict[str, tuple[str, bytes]] = {}
        self.requests: list[tuple[str, str, str, str]] = []
        self.refused: list[str] = []
        self.refuse_listing: int | None = None
        self.quota: set[str] = set()
        self.cuts: dict[str, list[int]] = {}
        self.ignore_range = False
        self.throttle = 0.0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._proxy_handler())
        self._server.daemon_threads = True
        self.proxy = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-drive", daemon=True)

    # ---------------------------------------------------------------- content
    def add_folder(self, folder_id: str, name: str, tree: dict) -> dict[str, str]:
        """Publish `tree` ({name: bytes | sub-tree}) as the folder `folder_id`; returns {path: file id}."""
        ids: dict[str, str] = {}
        self._add(folder_id, name, tree, "", ids)
        return ids

    def _add(self, folder_id: str, name: str, tree: dict, prefix: str, ids: dict[str, str]) -> None:
        children = []
        for child, value in tree.items():
            path = f"{prefix}{child}"
            child_id = drive_id(f"{folder_id}/{path}")
            if isinstance(value, dict):
                children.append(("folder", child_id, child))
                self._add(child_id, child, value, path + "/", ids)
            else:
                children.append(("file", child_id, child))
                self.files[child_id] = (child, bytes(value))
                ids[path] = child_id
        self.folders[folder_id] = (name, children)

    def file_requests(self, file_id: str) -> list[tuple[str, str, str, str]]:
        """Requests for the bytes of `file_id` (the confirmed downloads, not the pages before them)."""
        return [r for r in self.requests if r[0] == "drive.usercontent.google.com" and f"id={file_id}" in r[2]
                and "confirm=" in r[2]]

    # ---------------------------------------------------------------- life cycle
    def start(self) -> FakeDrive:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def env(self) -> dict[str, str]:
        """Environment that sends a process's HTTPS to this server (and trusts its certificate)."""
        return {"HTTPS_PROXY": self.proxy, "https_proxy": self.proxy, "REQUESTS_CA_BUNDLE": str(self.ca_file)}

    # ---------------------------------------------------------------- HTTP
    def _proxy_handler(self) -> type[BaseHTTPRequestHandler]:
        drive = self

        class Proxy(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_CONNECT(self) -> None:
                host, _, port = self.path.rpartition(":")
                if host not in DRIVE_HOSTS or port != "443":
                    drive.refused.append(self.path)
                    self.send_error(403, "this test proxy only reaches the loopback Drive")
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                try:
                    tls = drive._tls.wrap_socket(self.connection, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                try:
                    drive._drive_handler()(tls, self.client_address, self.server)
                except (ConnectionError, ssl.SSLError, OSError):
                    pass
                finally:
                    tls.close()

            def do_GET(self) -> None:  # plain-HTTP proxying: never
                drive.refused.append(self.path)
                self.send_error(403, "this test proxy only tunnels to the loopback Drive")

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Proxy

    def _drive_handler(self) -> type[BaseHTTPRequestHandler]:
        drive = self

        class Drive(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                host = self.headers.get("Host", "").split(":")[0]
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with drive._lock:
                    drive.requests.append((host, "GET", self.path, self.headers.get("Range", "")))
                if host == "drive.google.com" and url.path == "/embeddedfolderview":
                    self._folder_view(query.get("id", ""))
                elif host == "drive.google.com" and url.path == "/uc":
                    target = "https://drive.usercontent.google.com/download?" + urlencode(
                        {"id": query.get("id", ""), "export": "download"})
                    self._send(303, b"", {"Location": target, "Content-Type": "text/html"})
                elif host == "drive.usercontent.google.com" and url.path == "/download":
                    self._download(query)
                else:
                    self._send(404, b"not found", {"Content-Type": "text/html"})

            def _folder_view(self, folder_id: str) -> None:
                if drive.refuse_listing is not None:
                    self._send(drive.refuse_listing, b"<html><title>Error</title></html>", {"Content-Type": "text/html"})
                    return
                if folder_id not in drive.folders:
                    self._send(404, b"<html><title>Not Found</title></html>", {"Content-Type": "text/html"})
                    return
                name, children = drive.folders[folder_id]
                links = []
                for kind, child_id, child in children:
                    href = (f"https://drive.google.com/drive/folders/{child_id}" if kind == "folder"
                            else f"https://drive.google.com/file/d/{child_id}/view?usp=drive_web")
                    links.append(f'<div class="flip-entry"><a href="{href}" target="_blank">'
                                 f'<div class="flip-entry-title">{html.escape(child)}</div></a></div>')
                page = (f"<!DOCTYPE html><html><head><title>{html.escape(name)}</title></head><body>"
                        f'<div class="flip-entries">{"".join(links)}</div></body></html>')
                self._send(200, page.encode(), {"Content-Type": "text/html; charset=utf-8"})

            def _download(self, query: dict[str, str]) -> None:
                file_id = query.get("id", "")
                if file_id not in drive.files:
                    self._send(404, b"<html><title>Not Found</title></html>", {"Content-Type": "text/html"})
                elif file_id in drive.quota:
                    page = ('<html><head><title>Google Drive - Quota exceeded</title></head><body>'
                            '<p class="uc-error-caption">Sorry, you can\'t view or download this file at this time.</p>'
                            '<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. '
                            "Please try accessing the file again later.</p></body></html>")
                    self._send(403, page.encode(), {"Content-Type": "text/html; charset=utf-8"})
                elif query.get("confirm") != "t":
                    form = ('<form id="download-form" action="https://drive.usercontent.google.com/download" '
                            'method="get"><input type="submit" value="Download anyway"/>'
                            f'<input type="hidden" name="id" value="{file_id}">'
                            '<input type="hidden" name="export" value="download">'
                            '<input type="hidden" name="confirm" value="t">'
                            '<input type="hidden" name="uuid" value="0b5e3c1d-loopback"></form>')
                    page = ("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
                            f"<body><p>Google Drive can't scan this file for viruses.</p>{form}</body></html>")
                    self._send(200, page.encode(), {"Content-Type": "text/html; charset=utf-8"})
                else:
                    self._file(file_id)

            def _file(self, file_id: str) -> None:
                name, body = drive.files[file_id]
                etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
                headers = {"Content-Type": "application/octet-stream", "ETag": etag, "Accept-Ranges": "bytes",
                           "Content-Disposition": f'attachment; filename="{name}"',
                           "Last-Modified": formatdate(1_700_000_000, usegmt=True)}
                start = 0
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes=") and not drive.ignore_range and self.headers.get("If-Range", etag) == etag:
                    start = int(wanted[len("bytes="):].split("-")[0])
                    headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                status = 206 if start else 200
                with drive._lock:
                    cuts = drive.cuts.get(file_id) or []
                    stop_after = cuts.pop(0) if cuts else None
                self._send(status, body[start:], headers, stop_after=stop_after)

            def _send(self, status: int, body: bytes, headers: dict[str, str], stop_after: int | None = None) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                limit = len(body) if stop_after is None else min(stop_after, len(body))
                for offset in range(0, limit, CHUNK):
                    self.wfile.write(body[offset:min(offset + CHUNK, limit)])
                    if drive.throttle:
                        time.sleep(drive.throttle)
                if limit < len(body):  # the transfer breaks off: close without the rest
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Drive


@pytest.fixture(scope="session")
def drive_certificates(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("drive-tls"))


@pytest.fixture
def fake_drive(drive_certificates, monkeypatch):
    """A running FakeDrive; this process's HTTPS goes to it (gdown included), loopback stays direct."""
    drive = FakeDrive(drive_certificates).start()
    for name, value in drive.env().items():
        monkeypatch.setenv(name, value)
    import requests.utils

    assert requests.utils.get_environ_proxies("https://drive.google.com/uc")["https"] == drive.proxy, \
        "HTTPS_PROXY is not honoured: refusing to run a Drive test that could leave the machine"
    try:
        yield drive
    finally:
        drive.close()

