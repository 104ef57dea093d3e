"""Checkpoints: atomic, complete-only, clear errors on corrupt or mismatched files."""

import random

import pytest
import torch

import nanochat.checkpoint as ckpt
from nanochat.checkpoint import (
    CheckpointError,
    complete_steps,
    last_step,
    load_checkpoint,
    load_model_state_strict,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def save(tmp_path, step, value=1.0, keep_last=2):
    save_checkpoint(tmp_path, step, {"w": torch.full((2, 3), value)}, {"loader": {"offset": step}}, {"val_bpb": 1.5}, keep_last=keep_last)


def test_round_trip(tmp_path):
    save(tmp_path, 5, value=3.0)
    model_state, rank_state, meta = load_checkpoint(tmp_path, 5)
    assert torch.equal(model_state["w"], torch.full((2, 3), 3.0))
    assert rank_state == {"loader": {"offset": 5}}
    assert meta["step"] == 5 and meta["val_bpb"] == 1.5
    assert not list(tmp_path.glob("*.tmp"))


def test_interrupted_save_keeps_last_good(tmp_path, monkeypatch):
    save(tmp_path, 10)
    original = torch.save

    def crash_on_state(obj, f):
        if "loader" in obj:
            raise KeyboardInterrupt("power cut")
        original(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_state)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20)
    monkeypatch.setattr(ckpt.torch, "save", original)
    assert last_step(tmp_path) == 10  # step 20 has no meta: it does not exist
    assert not list(tmp_path.glob("*.tmp"))  # no half-written temp file left behind
    assert load_checkpoint(tmp_path, 10)[2]["step"] == 10


def test_prunes_old_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert complete_steps(tmp_path) == [3, 4]
    assert not list(tmp_path.glob("*_000001*"))


def test_corrupt_file_gives_clear_error(tmp_path):
    save(tmp_path, 7)
    (tmp_path / "model_000007.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint file .*model_000007.pt"):
        load_checkpoint(tmp_path, 7)


def test_missing_step_lists_available(tmp_path):
    save(tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at step 9 .*available steps: \[3\]"):
        load_checkpoint(tmp_path, 9)


def test_mismatched_model_names_the_tensor():
    model = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(CheckpointError, match=r"weight has shape \(4, 3\), model expects \(2, 3\)"):
        load_model_state_strict(model, {"weight": torch.zeros(4, 3)}, "ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        load_model_state_strict(model, {}, "ckpt")


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    save_checkpoint(tmp_path, 1, None, {"rng": rng_state()}, {"x": 1})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(999)
    random.seed(999)
    rank_state = torch.load(tmp_path / "state_000001_rank0.pt", weights_only=True)
    set_rng_state(rank_state["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
