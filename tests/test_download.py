"""The downloader and `python -m nanochat.dataset` (online) against the local test server.

The server misbehaves on purpose: drops the connection mid-body, lies in Content-Length, serves
bytes that are not parquet or not the file, answers 404 or 503. It also plays the hub: its
listing API with sha256s, and it counts requests (HF_HUB_OFFLINE=1 must make none). Backoff is
tiny so retries cost milliseconds.
"""

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.dataset import FINEWEB_REPO, ONLINE_DATASETS, list_parquet_files, main, read_manifest, shard_name, split_files, write_shard
from nanochat.download import DownloadError, download_file, file_lock, hf_token, hub_headers, hub_tree


def parquet_bytes(tmp_path: Path, index: int, num_docs: int = 50) -> bytes:
    path = tmp_path / "src" / shard_name(index)
    path.parent.mkdir(exist_ok=True)
    write_shard([f"document {i} of shard {index} " * 20 for i in range(num_docs)], path, row_group_docs=16)
    return path.read_bytes()


def no_partials(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith((".part", ".lock"))]


def flipped(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0x04
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# download_file

def test_download_ok_and_skip_existing(http_server, tmp_path):
    http_server.files["/a.bin"] = b"x" * 3_000_000
    dest = tmp_path / "out" / "a.bin"
    assert download_file(f"{http_server.url}/a.bin", dest, backoff=0.01) == dest
    assert dest.read_bytes() == http_server.files["/a.bin"]
    download_file(f"{http_server.url}/a.bin", dest, backoff=0.01)
    assert http_server.count("/a.bin") == 1  # dest exists: no second request
    assert no_partials(tmp_path)


@pytest.mark.parametrize("failure", ["drop", 503])
def test_download_retries_then_succeeds(http_server, tmp_path, failure):
    http_server.files["/a.parquet"] = parquet_bytes(tmp_path, 0)
    http_server.failures["/a.parquet"] = [failure]
    dest = tmp_path / "a.parquet"
    download_file(f"{http_server.url}/a.parquet", dest, validate=pq.ParquetFile, backoff=0.01)
    assert http_server.count("/a.parquet") == 2
    assert dest.read_bytes() == http_server.files["/a.parquet"]
    assert no_partials(tmp_path)


def test_interrupted_download_resumes_with_a_range_request(http_server, tmp_path):
    body = bytes(range(256)) * 12_000  # 3 MB
    http_server.files["/big.bin"] = body
    http_server.failures["/big.bin"] = ["drop"]  # half the body, then the connection closes
    dest = tmp_path / "big.bin"
    download_file(f"{http_server.url}/big.bin", dest, backoff=0.01, sha256=hashlib.sha256(body).hexdigest())
    assert dest.read_bytes() == body
    (_, _, first), (_, _, second) = http_server.requests
    assert "Range" not in first and second["Range"] == f"bytes={len(body) // 2}-"
    assert http_server.statuses == [200, 206]
    assert no_partials(tmp_path)


def test_a_part_left_by_a_killed_run_is_resumed(http_server, tmp_path):
    body = b"0123456789" * 100_000
    http_server.files["/a.bin"] = body
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(body[:400_000])  # what a kill -9 mid-download leaves
    download_file(f"{http_server.url}/a.bin", dest, backoff=0.01)
    assert dest.read_bytes() == body
    assert http_server.requests[0][2]["Range"] == "bytes=400000-" and http_server.statuses == [206]


def test_checksum_mismatch_is_fetched_again(http_server, tmp_path):
    body = b"the real file " * 10_000
    http_server.files["/a.bin"] = body
    http_server.failures["/a.bin"] = [flipped(body, 12_345)]  # same length, one bit off
    dest = tmp_path / "a.bin"
    download_file(f"{http_server.url}/a.bin", dest, backoff=0.01, sha256=hashlib.sha256(body).hexdigest())
    assert dest.read_bytes() == body and http_server.count("/a.bin") == 2
    assert all("Range" not in headers for _, _, headers in http_server.requests)  # a bad file starts over


def test_checksum_never_matching_fails_cleanly(http_server, tmp_path):
    http_server.files["/a.bin"] = b"served bytes"
    dest = tmp_path / "out" / "a.bin"
    with pytest.raises(DownloadError, match="checksum mismatch.*3 attempts"):
        download_file(f"{http_server.url}/a.bin", dest, retries=2, backoff=0.01, sha256="0" * 64)
    assert not dest.exists() and no_partials(tmp_path)


@pytest.mark.parametrize("failure, reason", [("drop", "truncated"), ("not_parquet", "validation failed")])
def test_download_gives_up_without_leaving_files(http_server, tmp_path, failure, reason):
    body = parquet_bytes(tmp_path, 0)
    http_server.files["/a.parquet"] = body
    http_server.always["/a.parquet"] = b"<html>rate limited</html>".ljust(len(body), b" ") if failure == "not_parquet" else failure
    dest = tmp_path / "out" / "a.parquet"
    with pytest.raises(DownloadError, match=reason) as info:
        download_file(f"{http_server.url}/a.parquet", dest, validate=pq.ParquetFile, retries=2, backoff=0.01)
    assert info.value.url.endswith("/a.parquet") and "3 attempts" in info.value.reason
    assert http_server.count("/a.parquet") == 3
    assert not dest.exists() and no_partials(tmp_path)


def test_download_404_fails_at_once(http_server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="404"):
        download_file(f"{http_server.url}/missing.bin", tmp_path / "missing.bin", retries=5, backoff=30)
    assert time.monotonic() - start < 5 and http_server.count("/missing.bin") == 1
    assert not (tmp_path / "missing.bin").exists() and no_partials(tmp_path)


def test_download_connection_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(DownloadError, match="2 attempts"):
        download_file(f"http://127.0.0.1:{port}/a.bin", tmp_path / "a.bin", retries=1, backoff=0.01, timeout=5)


def test_concurrent_downloads_of_one_file_fetch_it_once(http_server, tmp_path):
    body = b"y" * 20_000_000
    http_server.files["/shared.bin"] = body
    dest = tmp_path / "shared.bin"
    barrier = threading.Barrier(4)
    errors = []

    def rank() -> None:
        barrier.wait()
        try:
            download_file(f"{http_server.url}/shared.bin", dest, backoff=0.01)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and http_server.count("/shared.bin") == 1
    assert dest.read_bytes() == body and no_partials(tmp_path)


def test_a_bad_existing_file_is_replaced_once(http_server, tmp_path):
    body = b"z" * 20_000_000
    http_server.files["/shared.bin"] = body
    dest = tmp_path / "shared.bin"
    dest.write_bytes(body[:-1] + b"!")  # a flipped last byte on disk
    barrier = threading.Barrier(3)

    def rank() -> None:
        barrier.wait()
        download_file(f"{http_server.url}/shared.bin", dest, sha256=hashlib.sha256(body).hexdigest(), replace_mismatch=True)

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dest.read_bytes() == body and http_server.count("/shared.bin") == 1
    download_file(f"{http_server.url}/shared.bin", dest, sha256=hashlib.sha256(body).hexdigest(), replace_mismatch=True)
    assert http_server.count("/shared.bin") == 1  # intact: kept


def test_file_lock_excludes_and_cleans_up(tmp_path):
    lock = tmp_path / "x.lock"
    inside = []

    def hold(i: int) -> None:
        with file_lock(lock):
            inside.append(("in", i))
            time.sleep(0.02)
            inside.append(("out", i))

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [kind for kind, _ in inside] == ["in", "out"] * 3  # never two holders at once
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# Hugging Face conventions

def test_hf_token_is_sent_to_the_hub_only(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    http_server.files["/a.bin"] = b"data"
    url = f"{http_server.url}/a.bin"
    download_file(url, tmp_path / "a.bin", headers=hub_headers(url))
    assert http_server.requests[0][2]["Authorization"] == "Bearer hf_secret"
    assert hub_headers("https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip") == {}


def test_hf_token_does_not_follow_a_redirect_to_another_host(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    port = http_server.url.rsplit(":", 1)[1]
    http_server.files["/cdn/a.bin"] = b"from the cdn"
    http_server.redirects["/resolve/a.bin"] = f"http://localhost:{port}/cdn/a.bin"  # another host name
    http_server.redirects["/resolve/b.bin"] = "/cdn/a.bin"  # the same host
    url = f"{http_server.url}/resolve/a.bin"
    download_file(url, tmp_path / "a.bin", headers=hub_headers(url))
    url = f"{http_server.url}/resolve/b.bin"
    download_file(url, tmp_path / "b.bin", headers=hub_headers(url))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == b"from the cdn"
    auth = [(path, headers.get("Authorization")) for _, path, headers in http_server.requests]
    assert auth == [("/resolve/a.bin", "Bearer hf_secret"), ("/cdn/a.bin", None),
                    ("/resolve/b.bin", "Bearer hf_secret"), ("/cdn/a.bin", "Bearer hf_secret")]


def test_hf_token_from_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hf_token() is None
    (tmp_path / "token").write_text("hf_from_file\n")
    assert hf_token() == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert hf_token() == "hf_env"


def test_hf_endpoint_and_its_older_alias(http_server, monkeypatch):
    tree = [{"type": "file", "path": "a.parquet", "size": 3, "lfs": {"oid": "ab" * 32, "size": 3}},
            {"type": "file", "path": "README.md", "size": 10, "oid": "c" * 40}]
    http_server.files["/api/datasets/o/r/tree/main?recursive=true"] = json.dumps(tree).encode()
    expected = {"a.parquet": {"size": 3, "sha256": "ab" * 32}, "README.md": {"size": 10, "sha256": None}}
    monkeypatch.setenv("NANOCHAT_HF_URL", http_server.url)
    assert hub_tree("o/r") == expected
    monkeypatch.setenv("NANOCHAT_HF_URL", "http://127.0.0.1:9")  # HF_ENDPOINT wins over the alias
    monkeypatch.setenv("HF_ENDPOINT", http_server.url + "/")
    assert hub_tree("o/r") == expected


def test_hf_hub_offline_makes_no_request(http_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    http_server.files["/a.bin"] = b"data"
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download_file(f"{http_server.url}/a.bin", tmp_path / "a.bin")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        hub_tree("o/r")
    with pytest.raises(SystemExit) as info:
        main(["-n", "1", "--val_index", "2", "--source=online"])
    assert info.value.code == 1 and capsys.readouterr().err.startswith("error: HF_HUB_OFFLINE=1 and 2 of 2 shards are not in")
    main(["--target_mb=0.3", "--shard_mb=0.1"])  # auto: offline means the local corpus, no probe
    assert "HF_HUB_OFFLINE=1: building the local corpus" in capsys.readouterr().out
    assert http_server.requests == []


# ---------------------------------------------------------------------------------------------
# python -m nanochat.dataset, online

def serve_shards(server, tmp_path: Path, indices: range, prefix: str = "/data") -> None:
    for i in indices:
        server.files[f"{prefix}/{shard_name(i)}"] = parquet_bytes(tmp_path, i)


def dataset_args(server, *extra: str) -> list[str]:
    return ["-n", "2", "--val_index", "3", "--base_url", f"{server.url}/data", "--backoff", "0.01", "--retries", "2", "-w", "2", *extra]


def test_dataset_download_then_skip(http_server, tmp_path):
    serve_shards(http_server, tmp_path, range(4))
    main(dataset_args(http_server, "--source=auto"))  # the server answers: auto goes online
    files = list_parquet_files()
    assert [f.name for f in files] == [shard_name(0), shard_name(1), shard_name(3)]
    assert split_files("val") == [files[-1]]
    for f in files:
        assert f.read_bytes() == http_server.files[f"/data/{f.name}"]
    assert http_server.count() == 3 and http_server.count(f"/data/{shard_name(2)}") == 0
    manifest = json.loads((files[0].parent / "manifest.json").read_text())
    assert manifest["source"] == "online" and [e["file"] for e in manifest["shards"]] == [f.name for f in files]
    assert all(e["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() for e, f in zip(manifest["shards"], files))
    main(dataset_args(http_server, "--source=online"))
    assert http_server.count() == 3  # everything present and intact: no request at all


def test_dataset_retries_dropped_connections(http_server, tmp_path):
    serve_shards(http_server, tmp_path, range(4))
    http_server.failures = {f"/data/{shard_name(i)}": ["drop"] for i in range(4)}
    main(dataset_args(http_server, "--source=online"))
    assert [f.name for f in list_parquet_files()] == [shard_name(0), shard_name(1), shard_name(3)]
    assert [http_server.count(f"/data/{shard_name(i)}") for i in range(4)] == [2, 2, 0, 2]


@pytest.mark.parametrize("mode", ["short_always", "not_parquet", "missing"])
def test_dataset_reports_failed_shard(http_server, tmp_path, capsys, mode):
    serve_shards(http_server, tmp_path, range(4))
    path = f"/data/{shard_name(1)}"
    if mode == "missing":
        del http_server.files[path]
    elif mode == "short_always":
        http_server.always[path] = "drop"
    else:
        http_server.always[path] = b"<html>rate limited</html>".ljust(len(http_server.files[path]), b" ")
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(dataset_args(http_server, "--source=online"))
    assert info.value.code != 0
    out = capsys.readouterr()
    assert shard_name(1) in out.err and shard_name(1) in out.out
    data_dir = list_parquet_files()[0].parent
    assert sorted(p.name for p in data_dir.glob("shard_*")) == [shard_name(0), shard_name(3)]  # no partial file
    assert no_partials(data_dir)
    assert http_server.count(path) == (1 if mode == "missing" else 3)
    assert time.monotonic() - start < 10


HUB_PREFIX = f"/datasets/{FINEWEB_REPO}/resolve/main"


def serve_hub_listing(server, tmp_path: Path, indices, repo: str = FINEWEB_REPO) -> None:
    """The shards at the hub's resolve URLs, and its tree API listing them in two pages."""
    prefix = f"/datasets/{repo}/resolve/main"
    serve_shards(server, tmp_path, indices, prefix=prefix)
    entries = [{"type": "file", "path": shard_name(i), "size": len(server.files[f"{prefix}/{shard_name(i)}"]),
                "lfs": {"oid": hashlib.sha256(server.files[f"{prefix}/{shard_name(i)}"]).hexdigest()}} for i in indices]
    entries.insert(0, {"type": "file", "path": "README.md", "size": 5, "oid": "a" * 40})
    tree = f"/api/datasets/{repo}/tree/main"
    server.files[f"{tree}?recursive=true"] = json.dumps(entries[:3]).encode()
    server.headers[f"{tree}?recursive=true"] = {"Link": f'<{server.url}{tree}?recursive=true&cursor=p2>; rel="next"'}
    server.files[f"{tree}?recursive=true&cursor=p2"] = json.dumps(entries[3:]).encode()


def hub_args(*extra: str) -> list[str]:
    return ["-n", "2", "--val_index", "3", "--backoff", "0.01", "--retries", "2", "--source=online", *extra]


def test_dataset_from_the_hub_checks_its_sha256(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)  # the default base URL follows it
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    serve_hub_listing(http_server, tmp_path, range(4))
    good = http_server.files[f"{HUB_PREFIX}/{shard_name(1)}"]
    http_server.failures[f"{HUB_PREFIX}/{shard_name(1)}"] = [flipped(good, len(good) // 3)]  # still parquet
    main(hub_args())
    data_dir = list_parquet_files()[0].parent
    assert (data_dir / shard_name(1)).read_bytes() == good
    assert http_server.count(f"{HUB_PREFIX}/{shard_name(1)}") == 2  # the mismatch was fetched again
    assert http_server.count(f"/api/datasets/{FINEWEB_REPO}/tree/main?recursive=true&cursor=p2") == 1  # both pages
    assert http_server.count(f"{HUB_PREFIX}/{shard_name(2)}") == 0  # not asked for
    assert all(headers.get("Authorization") == "Bearer hf_secret" for _, _, headers in http_server.requests)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert {e["file"]: e["sha256_from"] for e in manifest["shards"]} == {shard_name(i): "hub" for i in (0, 1, 3)}


def test_climbmix_from_the_hub_and_no_mixed_corpora(http_server, tmp_path, monkeypatch, capsys):
    """--dataset=climbmix: its repo's resolve URLs and listing, its own last shard (06542) as val;
    a later FineWeb-Edu download into the same base_data is refused without --force."""
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    climbmix = ONLINE_DATASETS["climbmix"]
    assert climbmix.repo == "karpathy/climbmix-400b-shuffle" and climbmix.val_index == 6542
    serve_hub_listing(http_server, tmp_path, [0, 1, 2, climbmix.val_index], repo=climbmix.repo)
    main(["-n", "2", "--dataset=climbmix", "--source=online", "--backoff", "0.01"])
    files = list_parquet_files()
    assert [f.name for f in files] == [shard_name(0), shard_name(1), "shard_06542.parquet"]
    assert split_files("val") == [files[-1]]
    prefix = f"/datasets/{climbmix.repo}/resolve/main"
    assert all(f.read_bytes() == http_server.files[f"{prefix}/{f.name}"] for f in files)
    manifest = read_manifest(files[0].parent)
    assert manifest["dataset"] == "climbmix" and manifest["base_url"] == f"{http_server.url}{prefix}"
    assert {e["sha256_from"] for e in manifest["shards"]} == {"hub"}
    assert pq.read_table(files[-1]).column_names == ["text"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["-n", "1", "--source=online", "--backoff", "0.01"])  # default: fineweb_edu
    err = capsys.readouterr().err
    assert info.value.code == 1 and "holds climbmix shards" in err and "--force" in err and err.count("\n") == 1
    assert len(list_parquet_files()) == 3  # nothing removed
    serve_hub_listing(http_server, tmp_path, [0, ONLINE_DATASETS["fineweb_edu"].val_index])
    main(["-n", "1", "--source=online", "--force", "--backoff", "0.01"])
    assert [f.name for f in list_parquet_files()] == [shard_name(0), "shard_01822.parquet"]
    assert read_manifest(files[0].parent)["dataset"] == "fineweb_edu"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_dataset_refetches_a_shard_damaged_on_disk(http_server, tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("HF_ENDPOINT", http_server.url)
    serve_hub_listing(http_server, tmp_path, range(4))
    main(hub_args())
    path = list_parquet_files()[1]
    good = path.read_bytes()
    path.write_bytes(flipped(good, len(good) // 2) if damage == "flip" else good[: len(good) // 2])
    main(hub_args())
    assert path.read_bytes() == good
    assert http_server.count(f"{HUB_PREFIX}/{path.name}") == 2 and http_server.count(f"{HUB_PREFIX}/{shard_name(0)}") == 1
    assert f"{path.name}: sha256" in capsys.readouterr().out
