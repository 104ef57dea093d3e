"""The downloader and `python -m nanochat.dataset` (online) against a real HTTP server on 127.0.0.1.

The server misbehaves on purpose: drops the connection mid-body, lies in Content-Length, serves
bytes that are not parquet, answers 404 or 503. Backoff is tiny so retries cost milliseconds.
"""

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.dataset import list_parquet_files, main, shard_name, split_files, write_shard
from nanochat.download import DownloadError, download_file


class FlakyServer:
    """Serves `files` ({name: bytes}); `modes[name]` picks a failure:

    ok (default) | drop_first: close mid-body on the first request, then ok | short_always: a
    Content-Length larger than the body, every time | not_parquet: garbage of the right length |
    status_first: HTTP 503 once, then ok. Names not in `files` get 404. `requests` counts GETs.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                body, mode, first = server.files[name], server.modes.get(name, "ok"), server.requests[name] == 1
                if mode == "status_first" and first:
                    self.send_error(503)
                    return
                if mode == "not_parquet":
                    body = b"<html>rate limited</html>".ljust(len(body), b" ")
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "short_always" or (mode == "drop_first" and first):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # a proxy from the environment must not see 127.0.0.1
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    srv = FlakyServer()
    yield srv
    srv.close()


def parquet_bytes(tmp_path: Path, index: int, num_docs: int = 50) -> bytes:
    path = tmp_path / "src" / shard_name(index)
    path.parent.mkdir(exist_ok=True)
    write_shard([f"document {i} of shard {index} " * 20 for i in range(num_docs)], path, row_group_docs=16)
    return path.read_bytes()


def no_partials(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------------
# download_file

def test_download_ok_and_skip_existing(server, tmp_path):
    server.files["a.bin"] = b"x" * 3_000_000
    dest = tmp_path / "out" / "a.bin"
    assert download_file(f"{server.url}/a.bin", dest, backoff=0.01) == dest
    assert dest.read_bytes() == server.files["a.bin"]
    download_file(f"{server.url}/a.bin", dest, backoff=0.01)
    assert server.requests["a.bin"] == 1  # dest exists: no second request
    assert no_partials(tmp_path)


@pytest.mark.parametrize("mode", ["drop_first", "status_first"])
def test_download_retries_then_succeeds(server, tmp_path, mode):
    server.files["a.parquet"] = parquet_bytes(tmp_path, 0)
    server.modes["a.parquet"] = mode
    dest = tmp_path / "a.parquet"
    download_file(f"{server.url}/a.parquet", dest, validate=pq.ParquetFile, backoff=0.01)
    assert server.requests["a.parquet"] == 2
    assert dest.read_bytes() == server.files["a.parquet"]
    assert no_partials(tmp_path)


@pytest.mark.parametrize("mode, reason", [("short_always", "truncated"), ("not_parquet", "validation failed")])
def test_download_gives_up_without_leaving_files(server, tmp_path, mode, reason):
    server.files["a.parquet"] = parquet_bytes(tmp_path, 0)
    server.modes["a.parquet"] = mode
    dest = tmp_path / "out" / "a.parquet"
    with pytest.raises(DownloadError, match=reason) as info:
        download_file(f"{server.url}/a.parquet", dest, validate=pq.ParquetFile, retries=2, backoff=0.01)
    assert info.value.url.endswith("/a.parquet") and "3 attempts" in info.value.reason
    assert server.requests["a.parquet"] == 3
    assert not dest.exists() and no_partials(tmp_path)


def test_download_404_fails_at_once(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{server.url}/missing.bin", tmp_path / "missing.bin", retries=5, backoff=30)
    assert time.monotonic() - start < 5 and server.requests["missing.bin"] == 1
    assert not (tmp_path / "missing.bin").exists() and no_partials(tmp_path)


def test_download_connection_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(DownloadError, match="2 attempts"):
        download_file(f"http://127.0.0.1:{port}/a.bin", tmp_path / "a.bin", retries=1, backoff=0.01, timeout=5)


# ---------------------------------------------------------------------------------------------
# python -m nanochat.dataset, online

def serve_shards(server: FlakyServer, tmp_path: Path, indices: range) -> None:
    for i in indices:
        server.files[shard_name(i)] = parquet_bytes(tmp_path, i)


def dataset_args(server: FlakyServer, *extra: str) -> list[str]:
    return ["-n", "2", "--val_index", "3", "--base_url", server.url, "--backoff", "0.01", "--retries", "2", "-w", "2", *extra]


def test_dataset_download_then_skip(server, tmp_path):
    serve_shards(server, tmp_path, range(4))
    main(dataset_args(server, "--source=auto"))  # the server answers: auto goes online
    files = list_parquet_files()
    assert [f.name for f in files] == [shard_name(0), shard_name(1), shard_name(3)]
    assert split_files("val") == [files[-1]]
    for f in files:
        assert f.read_bytes() == server.files[f.name]
    assert sum(server.requests.values()) == 3 and shard_name(2) not in server.requests
    main(dataset_args(server, "--source=online"))
    assert sum(server.requests.values()) == 3  # everything present: no request at all


def test_dataset_retries_dropped_connections(server, tmp_path):
    serve_shards(server, tmp_path, range(4))
    server.modes = {shard_name(i): "drop_first" for i in range(4)}
    main(dataset_args(server, "--source=online"))
    assert [f.name for f in list_parquet_files()] == [shard_name(0), shard_name(1), shard_name(3)]
    assert server.requests == Counter({shard_name(0): 2, shard_name(1): 2, shard_name(3): 2})


@pytest.mark.parametrize("mode", ["short_always", "not_parquet", "missing"])
def test_dataset_reports_failed_shard(server, tmp_path, capsys, mode):
    serve_shards(server, tmp_path, range(4))
    if mode == "missing":
        del server.files[shard_name(1)]
    else:
        server.modes[shard_name(1)] = mode
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(dataset_args(server, "--source=online"))
    assert info.value.code != 0
    out = capsys.readouterr()
    assert shard_name(1) in out.err and shard_name(1) in out.out
    data_dir = list_parquet_files()[0].parent
    assert sorted(p.name for p in data_dir.iterdir()) == [shard_name(0), shard_name(3)]  # no partial file
    assert server.requests[shard_name(1)] == (1 if mode == "missing" else 3)
    assert time.monotonic() - start < 10
