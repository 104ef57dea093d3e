"""Shard iteration (splits, ranks, resume, corrupt files), shard checks and the local corpus."""

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat.dataset import (
    CorruptShardError,
    build_local_corpus,
    iter_row_groups,
    iter_texts,
    list_parquet_files,
    main,
    shard_name,
    split_files,
    verify_shards,
    write_shard,
)
from nanochat.local_corpus import MIN_VAL_DOCS, roff_to_text, split_document

# docs per train file; with 3 docs per row group: 4 + 3 + 2 row groups
TRAIN_DOCS = (10, 7, 5)


@pytest.fixture
def shards(tmp_path) -> Path:
    """3 train shards + 1 val shard of numbered documents, 3 documents per row group."""
    data_dir = tmp_path / "shards"
    data_dir.mkdir()
    for f, n in enumerate(TRAIN_DOCS + (4,)):
        write_shard([f"file {f} doc {d}" for d in range(n)], data_dir / shard_name(f), row_group_docs=3)
    return data_dir


def all_train_docs() -> list[str]:
    return [f"file {f} doc {d}" for f, n in enumerate(TRAIN_DOCS) for d in range(n)]


# ---------------------------------------------------------------------------------------------
# listing and splits

def test_no_shards_error_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="--source=local"):
        list_parquet_files(tmp_path)


def test_splits(shards):
    assert [p.name for p in split_files("train", shards)] == [shard_name(i) for i in range(3)]
    assert [p.name for p in split_files("val", shards)] == [shard_name(3)]
    with pytest.raises(ValueError, match="'test'"):
        split_files("test", shards)
    for path in split_files("train", shards):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="at least 2 shards"):
        split_files("val", shards)


# ---------------------------------------------------------------------------------------------
# row groups: ranks, resume, corruption

def test_row_groups_one_pass_in_order(shards):
    groups = list(iter_row_groups("train", data_dir=shards))
    assert [pos for _, pos in groups] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    assert [t for texts, _ in groups for t in texts] == all_train_docs()
    assert [t for texts, _ in iter_row_groups("val", data_dir=shards) for t in texts] == [f"file 3 doc {d}" for d in range(4)]


def test_row_groups_two_ranks_are_disjoint_and_cover_everything(shards):
    per_rank = [list(iter_row_groups("train", rank=r, world_size=2, data_dir=shards)) for r in range(2)]
    positions = [{pos for _, pos in groups} for groups in per_rank]
    assert not positions[0] & positions[1]
    assert len(per_rank[0]) == 5 and len(per_rank[1]) == 4  # 9 row groups dealt round-robin
    docs = [t for groups in per_rank for texts, _ in groups for t in texts]
    assert sorted(docs) == sorted(all_train_docs())
    with pytest.raises(ValueError, match="rank"):
        next(iter_row_groups("train", rank=2, world_size=2, data_dir=shards))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_from_any_position_gives_the_same_rest(shards, world_size):
    for rank in range(world_size):
        full = list(iter_row_groups("train", rank=rank, world_size=world_size, data_dir=shards))
        for k, (_, position) in enumerate(full):
            resumed = list(iter_row_groups("train", start=position, rank=rank, world_size=world_size, data_dir=shards))
            assert resumed == full[k:]
    assert list(iter_row_groups("train", start=(3, 0), data_dir=shards)) == []  # past the end: nothing


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_corrupt_shard_names_the_file(shards, damage):
    path = shards / shard_name(1)
    data = path.read_bytes()
    path.write_bytes(b"not a parquet file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=f"corrupt parquet shard .*{shard_name(1)}"):
        list(iter_row_groups("train", data_dir=shards))


def flip_bit_in_data_page(path: Path, row_group: int = 0) -> None:
    """Flip one bit near the end of the first column chunk of `row_group`: compressed page data,
    not a page header or the footer."""
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    position = start + column.total_compressed_size - 4
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))


def test_page_checksums_catch_a_flipped_bit_when_read(shards):
    flip_bit_in_data_page(shards / shard_name(1), row_group=1)
    groups = iter_row_groups("train", data_dir=shards)
    for _ in range(5):  # shard 0's 4 row groups and shard 1's first are intact
        next(groups)
    with pytest.raises(CorruptShardError, match=f"{shard_name(1)}: row group 1: .*(CRC|checksum)"):
        next(groups)


def test_iter_texts_caps(shards):
    assert list(iter_texts("train", data_dir=shards)) == all_train_docs()
    capped = list(iter_texts("train", doc_cap=6, max_chars=20, data_dir=shards))
    assert capped == ["file 0"] * 4  # 6 chars each, stops once 20 chars were yielded


# ---------------------------------------------------------------------------------------------
# local corpus

def test_split_document_cuts_at_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "word " * (10 * (i % 7)) for i in range(30))  # each < 400
    pieces = split_document(text, max_chars=400)
    assert all(len(p) <= 400 for p in pieces) and len(pieces) > 1
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert all(p.startswith("paragraph") for p in pieces)
    assert split_document("x" * 1000, max_chars=300) == ["x" * 300] * 3 + ["x" * 100]


def test_roff_to_text():
    source = '.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.TP\n.BR \\-a , " \\-\\-all"\ndo not ignore\n'
    assert roff_to_text(source) == "NAME\n\nls - list directory contents\n\n-a, --all\ndo not ignore"


def shard_digests(data_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_dir.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus_a")
    build_local_corpus(out, target_mb=1.5, shard_mb=0.5, show_progress=False)
    return out


def test_local_corpus_is_deterministic(corpus, tmp_path):
    build_local_corpus(tmp_path / "b", target_mb=1.5, shard_mb=0.5, show_progress=False)
    assert shard_digests(corpus) == shard_digests(tmp_path / "b")


def test_local_corpus_layout_and_val_split(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    files = list_parquet_files(corpus)
    assert [s["file"] for s in manifest["shards"]] == [f.name for f in files] and len(files) >= 3
    assert [s["split"] for s in manifest["shards"]] == ["train"] * (len(files) - 1) + ["val"]
    assert manifest["num_docs"] == sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert 1.5e6 <= sum(s["chars"] for s in manifest["shards"]) < 1.5e6 + 16_000  # overshoot: one document
    train = [t for texts, _ in iter_row_groups("train", data_dir=corpus) for t in texts]
    val = [t for texts, _ in iter_row_groups("val", data_dir=corpus) for t in texts]
    assert len(val) >= MIN_VAL_DOCS and len(train) > len(val)
    assert not set(train) & set(val)
    assert all(100 <= len(t) <= 16_000 for t in train + val)


# ---------------------------------------------------------------------------------------------
# verify_shards: footers, and sizes and sha256 against the manifest

@pytest.fixture
def corpus_copy(corpus, tmp_path) -> Path:
    return Path(shutil.copytree(corpus, tmp_path / "corpus"))


def test_manifest_records_size_and_sha256(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    for entry in manifest["shards"]:
        data = (corpus / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_shards(corpus) == list_parquet_files(corpus)


def test_verify_refuses_a_truncated_later_shard(corpus_copy):
    path = list_parquet_files(corpus_copy)[-2]  # the last train shard: read last
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CorruptShardError, match=f"{path.name}.*--source=local --force") as info:
        verify_shards(corpus_copy)
    assert "\n" not in str(info.value)


def test_verify_refuses_a_flipped_bit_in_a_later_shard(corpus_copy):
    verify_shards(corpus_copy)  # digests cached now: the change must still be seen
    path = list_parquet_files(corpus_copy)[1]
    flip_bit_in_data_page(path)
    with pytest.raises(CorruptShardError, match=f"{path.name} fails its checksum.*--source=local --force"):
        verify_shards(corpus_copy)


def test_digest_cache_is_used_and_skips_fresh_files(corpus_copy, monkeypatch):
    import nanochat.dataset as dataset

    for shard in list_parquet_files(corpus_copy):  # as if built a minute ago
        os.utime(shard, (time.time() - 60, time.time() - 60))
    path = list_parquet_files(corpus_copy)[0]
    verify_shards(corpus_copy)
    cache = json.loads((corpus_copy / ".verified.json").read_text())
    assert cache[path.name][3] == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(dataset, "sha256_file", lambda p: pytest.fail(f"{p} hashed again"))
    verify_shards(corpus_copy)  # unchanged files: digests from the cache
    monkeypatch.undo()
    fresh = corpus_copy / shard_name(99)
    write_shard(["a just-written shard"], fresh)
    dataset.cached_sha256(fresh)
    assert fresh.name not in json.loads((corpus_copy / ".verified.json").read_text())  # too new to trust its mtime


def test_verify_refuses_a_shard_the_manifest_does_not_know(corpus_copy):
    write_shard(["stray document"], corpus_copy / shard_name(99))
    with pytest.raises(CorruptShardError, match=f"{shard_name(99)} is not in .*manifest.json"):
        verify_shards(corpus_copy)


def test_verify_without_manifest_checks_footers(shards):
    assert len(verify_shards(shards)) == 4
    path = shards / shard_name(2)
    path.write_bytes(path.read_bytes()[:-20])  # the footer is gone
    with pytest.raises(CorruptShardError, match=f"corrupt parquet shard .*{shard_name(2)}"):
        verify_shards(shards)


def test_iter_texts_verifies_first(corpus_copy):
    path = list_parquet_files(corpus_copy)[-1]  # val: iter_texts("train") never reads it
    flip_bit_in_data_page(path)
    with pytest.raises(CorruptShardError, match="fails its checksum"):
        next(iter_texts("train", data_dir=corpus_copy))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the block ends


def test_cli_auto_falls_back_to_local_then_skips(monkeypatch, capsys):
    monkeypatch.setenv("no_proxy", "*")
    main(["--base_url", closed_port_url(), "--target_mb=0.5", "--shard_mb=0.2"])
    out = capsys.readouterr().out
    assert "unreachable" in out and "local corpus:" in out
    digests = shard_digests(list_parquet_files()[0].parent)
    main(["--source=local"])
    assert "already" in capsys.readouterr().out
    assert shard_digests(list_parquet_files()[0].parent) == digests
    with pytest.raises(SystemExit) as info:
        main(["--source=online", "--base_url", closed_port_url()])  # would mix two corpora
    assert info.value.code == 1 and "local corpus" in capsys.readouterr().err


def test_cli_rejects_bad_flags(capsys):
    for argv in (["--source=cloud"], ["-n", "5000"], ["--val_fraction=1.5"], ["--bogus=1"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1
