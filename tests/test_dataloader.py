"""Dataloader: exact resume, rank disjointness, contiguous token stream, epochs, shard checks."""

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DataLoader
from nanochat.dataset import CorruptShardError, record_shards


class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte, BOS = 256."""

    def get_bos_token_id(self) -> int:
        return 256

    def encode(self, texts, prepend=None, num_threads=1):
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


def make_shards(data_dir, n_train_files=2, row_groups=3, docs_per_group=4):
    data_dir.mkdir(parents=True, exist_ok=True)
    doc_id = 0
    for f in range(n_train_files + 1):  # the last one is val
        docs = []
        for _ in range(row_groups * docs_per_group):
            docs.append(f"doc{doc_id:03d} " + "x" * (doc_id % 7) + " ünïcode")
            doc_id += 1
        pq.write_table(pa.table({"text": docs}), data_dir / f"shard_{f:05d}.parquet", row_group_size=docs_per_group)
    return data_dir


def stream_reference(data_dir, split="train"):
    """The token stream an uninterrupted single-rank loader must produce (one epoch)."""
    files = sorted(data_dir.glob("shard_*.parquet"))
    files = files[:-1] if split == "train" else files[-1:]
    out = []
    for path in files:
        for text in pq.read_table(path).column("text").to_pylist():
            out += [256] + list(text.encode("utf-8"))
    return out


def test_batches_are_contiguous_shifted_stream(tmp_path):
    data_dir = make_shards(tmp_path / "data")
    ref = stream_reference(data_dir)
    loader = DataLoader(ByteTokenizer(), 2, 16, "train", data_dir=data_dir)
    x, y = loader.next_batch()
    assert x.shape == (2, 16) and x.dtype == torch.long
    assert x.flatten().tolist() == ref[:32] and y.flatten().tolist() == ref[1:33]
    x2, _ = loader.next_batch()
    assert x2.flatten().tolist() == ref[32:64]  # no token skipped between batches


@pytest.mark.parametrize("stop_after", [1, 3, 7, 20])
def test_resume_gives_the_same_next_batches(tmp_path, stop_after):
    data_dir = make_shards(tmp_path / "data")
    full = DataLoader(ByteTokenizer(), 3, 10, "train", data_dir=data_dir)
    expected = [full.next_batch() for _ in range(stop_after + 5)]
    first = DataLoader(ByteTokenizer(), 3, 10, "train", data_dir=data_dir)
    for _ in range(stop_after):
        first.next_batch()
    state = first.state_dict()
    resumed = DataLoader(ByteTokenizer(), 3, 10, "train", data_dir=data_dir, state=state)
    for x_exp, y_exp in expected[stop_after:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp)


def test_train_loops_over_epochs_and_val_stops(tmp_path):
    data_dir = make_shards(tmp_path / "data", n_train_files=1, row_groups=1)
    ref = stream_reference(data_dir)
    loader = DataLoader(ByteTokenizer(), 1, len(ref), "train", data_dir=data_dir)
    _, y = loader.next_batch()
    assert y.flatten().tolist()[-1] == ref[0]  # the +1 target token comes from the second epoch
    x, _ = loader.next_batch()
    assert x.flatten().tolist() == ref  # the whole second epoch, then the next batch starts epoch 3
    assert loader.state_dict() == {"epoch": 2, "file_idx": 0, "rg_idx": 0, "offset": 0}
    val = DataLoader(ByteTokenizer(), 1, len(stream_reference(data_dir, "val")), "val", data_dir=data_dir)
    with pytest.raises(StopIteration):
        val.next_batch()  # one pass: there is not one full batch + 1 token


def test_two_ranks_read_disjoint_documents(tmp_path):
    data_dir = make_shards(tmp_path / "data", n_train_files=2, row_groups=3)
    seen = []
    for rank in range(2):
        loader = DataLoader(ByteTokenizer(), 1, 64, "train", rank=rank, world_size=2, data_dir=data_dir, loop=False)
        tokens = []
        try:
            while True:
                tokens += loader.next_batch()[0].flatten().tolist()
        except StopIteration:
            pass
        text = bytes(t for t in tokens if t < 256).decode("utf-8", errors="ignore")
        seen.append({w for w in text.split() if w.startswith("doc")})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_bad_batch_shape(tmp_path):
    with pytest.raises(ValueError, match="batch_size and seq_len must be >= 1"):
        DataLoader(ByteTokenizer(), 0, 8, "train", data_dir=make_shards(tmp_path / "d"))


def with_manifest(data_dir, source="local"):
    """Record every shard's size and sha256, as the local build and the downloader do."""
    entries = [{"file": p.name, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
               for p in sorted(data_dir.glob("shard_*.parquet"))]
    record_shards(data_dir, entries, source=source)
    return data_dir


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("source, command", [("local", "--source=local --force"), ("online", "--source=online -n 2")])
def test_a_bad_later_shard_is_refused_before_the_first_batch(tmp_path, damage, source, command):
    data_dir = with_manifest(make_shards(tmp_path / "data", n_train_files=2), source)
    DataLoader(ByteTokenizer(), 2, 16, "train", data_dir=data_dir)  # intact: fine
    path = data_dir / "shard_00001.parquet"  # the second train shard: a run would reach it late
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"shard_00001.parquet.*{command}") as info:
        DataLoader(ByteTokenizer(), 2, 16, "train", data_dir=data_dir)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_base_train_refuses_a_bad_later_shard_before_step_1(tiny_base, tmp_path, monkeypatch, capsys, damage):
    import shutil

    from scripts import base_train

    base = Path(shutil.copytree(tiny_base, tmp_path / "copy"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with_manifest(base / "base_data")
    path = base / "base_data" / "shard_00001.parquet"  # the second train shard
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 3000]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as info:
        base_train.main(["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256", "--num_iterations=2",
                         "--eval_every=-1", "--sample_every=-1", "--threads=1", "--dtype=float32", "--model_tag=bad"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert info.value.code != 0 and len(err) == 1 and "shard_00001.parquet" in err[0] and "--source=local --force" in err[0], err
    assert not (base / "base_checkpoints" / "bad").exists() or not list((base / "base_checkpoints" / "bad").iterdir())
    assert "step 00001" not in captured.out and "step 1/" not in captured.out


def test_a_bad_downloaded_shard_is_fetched_again_when_the_loader_starts(tmp_path, http_server, monkeypatch):
    data_dir = make_shards(tmp_path / "data", n_train_files=2)
    for path in data_dir.glob("shard_*.parquet"):
        http_server.files[f"/data/{path.name}"] = path.read_bytes()
    with_manifest(data_dir, "online")
    record_shards(data_dir, [], base_url=f"{http_server.url}/data")
    ref = stream_reference(data_dir)
    path = data_dir / "shard_00001.parquet"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated on disk
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: refused in one line, no request
    with pytest.raises(CorruptShardError, match="shard_00001.parquet has .* bytes.*--source=online -n 2"):
        DataLoader(ByteTokenizer(), 2, 16, "train", data_dir=data_dir)
    assert http_server.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    loaders = [DataLoader(ByteTokenizer(), 2, 16, "train", data_dir=data_dir) for _ in range(2)]  # the second finds it good
    assert path.read_bytes() == good and http_server.count("/data/shard_00001.parquet") == 1
    assert loaders[1].next_batch()[0].flatten().tolist() == ref[:32]
