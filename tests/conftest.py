import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The suite never reads or writes the user's artifacts or caches, whatever the environment says:
# every variable that names an artifact or cache directory points into a temporary directory.
# Each test gets its own (under its tmp_path); the session's, set in pytest_configure before any
# test module is imported, covers libraries that read them once at import (huggingface_hub),
# session fixtures (built before a test's fixtures run) and the compiler caches, which stay per
# session so that a kernel one test compiles is reused by the next. Subprocesses inherit them.
PER_TEST_DIRS = ("NANOCHAT_BASE_DIR", "HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE", "XDG_CACHE_HOME", "TORCH_HOME",
                 "MPLCONFIGDIR")
PER_SESSION_DIRS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
_caller_environment: dict[str, str | None] = {}
_session_dir: list[str] = []


def pytest_configure(config) -> None:
    root = tempfile.mkdtemp(prefix="nanochat-tests-")
    _session_dir.append(root)
    for name in (*PER_TEST_DIRS, *PER_SESSION_DIRS, "WANDB_RUN", "CUDA_VISIBLE_DEVICES"):
        _caller_environment[name] = os.environ.get(name)
    # The suite runs on the CPU also on a GPU machine (subprocesses too): it asserts bit-exact
    # resumes, and CUDA's attention backward is not deterministic. The GPU check is
    # bench/gpu_check.py.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    for name in (*PER_TEST_DIRS, *PER_SESSION_DIRS):
        os.environ[name] = os.path.join(root, name.lower())
    os.environ["WANDB_RUN"] = "dummy"


def pytest_unconfigure(config) -> None:
    for name, value in _caller_environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    for root in _session_dir:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    for name in PER_TEST_DIRS:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_RUN", "dummy")


# The tiny model, trained once per test session (a depth-1 base model, checkpoint tag "tiny", with
# its corpus and tokenizer); every module that needs it gets its own copy to write into.
@pytest.fixture(scope="session")
def trained_tiny_base(tmp_path_factory) -> Path:
    from tests.helpers import train_tiny_base

    return train_tiny_base(tmp_path_factory.mktemp("tiny_trained"), steps=10)


@pytest.fixture(scope="module")
def tiny_base(trained_tiny_base, tmp_path_factory) -> Path:
    """This module's copy of the trained tiny base dir (corpus, tokenizer, base_checkpoints/tiny)."""
    copy = tmp_path_factory.mktemp("tiny_base")
    shutil.copytree(trained_tiny_base, copy, dirs_exist_ok=True)
    return copy


@pytest.fixture
def base_dir(tiny_base, monkeypatch) -> Path:
    """tiny_base as this test's NANOCHAT_BASE_DIR."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    return tiny_base


class LocalServer:
    """The one HTTP server of the tests, on 127.0.0.1 (`url`), for downloads and hub look-alikes.

    `files` maps a URL path (with its query, or without: both are tried) to its bytes; other
    paths answer 404. `Range: bytes=N-` is honoured with 206 (416 past the end). A path can
    misbehave: `failures[path]` is a list used up one per request, `always[path]` applies to every
    request; a mode is an HTTP status (int), replacement bytes (served with their true length), or
    "drop" (full Content-Length, half the body, then the connection closes). `headers[path]` adds
    response headers; `redirects[path]` answers 302 to that URL. `requests` lists every
    (method, path, headers) seen, with the Host header telling 127.0.0.1 from localhost;
    `statuses` the status of each GET answered; `count(path)` counts GETs.
    """

    def __init__(self) -> None:
        import http.server
        import socket
        import threading

        self.files: dict[str, bytes] = {}
        self.failures: dict[str, list] = {}
        self.always: dict[str, object] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                server._record(self)
                self.send_response(200 if server._lookup(self.path) is not None else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                server._record(self)
                if self.path in server.redirects:
                    server.statuses.append(302)
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                key = server._lookup(self.path)
                if key is None:
                    server.statuses.append(404)
                    self.send_error(404)
                    return
                with server._lock:
                    queue = server.failures.get(key) or []
                    mode = queue.pop(0) if queue else server.always.get(key)
                if isinstance(mode, int):
                    server.statuses.append(mode)
                    self.send_error(mode)
                    return
                body = mode if isinstance(mode, bytes) else server.files[key]
                status, start = 200, 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and ranged.endswith("-"):
                    start = int(ranged[len("bytes="):-1])
                    if start >= len(body):
                        server.statuses.append(416)
                        self.send_error(416)
                        return
                    status = 206
                server.statuses.append(status)
                self.send_response(status)
                for name, value in server.headers.get(key, {}).items():
                    self.send_header(name, value)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if mode == "drop":
                    self.wfile.write(part[: len(part) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _record(self, handler) -> None:
        with self._lock:
            self.requests.append((handler.command, handler.path, dict(handler.headers.items())))

    def _lookup(self, path: str) -> str | None:
        for key in (path, path.split("?", 1)[0]):
            if key in self.files:
                return key
        return None

    def count(self, path: str | None = None) -> int:
        """GETs of `path` (with or without its query), or of anything when None."""
        return sum(1 for method, p, _ in self.requests if method == "GET" and (path is None or path in (p, p.split("?", 1)[0])))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(monkeypatch):
    """A started LocalServer; no proxy sees 127.0.0.1 and no HF_* variable of the caller applies."""
    monkeypatch.setenv("no_proxy", "*")
    for name in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "NANOCHAT_HF_URL", "NANOCHAT_DATA_URL", "NANOCHAT_EVAL_BUNDLE_URL"):
        monkeypatch.delenv(name, raising=False)
    server = LocalServer()
    yield server
    server.close()
