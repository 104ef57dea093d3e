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


def test_a_save_removes_the_temp_files_of_killed_saves(tmp_path):
    save(tmp_path, 1)
    stale = [tmp_path / ".model_000002.pt.k3j2h1.tmp", tmp_path / ".state_000002_rank1.pt.a.tmp", tmp_path / ".meta_000002.json.b.tmp"]
    other = tmp_path / ".notes.txt.tmp"  # not a checkpoint temp name: not ours to delete
    for path in stale + [other]:
        path.write_bytes(b"half written")
    save(tmp_path, 2)
    assert not any(path.exists() for path in stale) and other.exists()
    assert complete_steps(tmp_path) == [1, 2]


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    for step, healthy in ((1, True), (2, True), (3, False), (4, False), (5, None)):
        meta = {"val_bpb": 1.5} if healthy is None else {"healthy": healthy, "loss": 3.0}
        save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {}, meta, keep_last=2)
    assert complete_steps(tmp_path) == [2, 4, 5]  # the newest two, and step 2: the last healthy one
    assert not list(tmp_path.glob("*_000001*")) and not list(tmp_path.glob("*_000003*"))


def test_non_finite_weights_do_not_load(tmp_path):
    save(tmp_path, 1, value=float("nan"))
    model = torch.nn.Linear(3, 2, bias=False)
    model_state, _, _ = load_checkpoint(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"has non-finite values in w: it was saved after the run diverged"):
        ckpt.load_weights(model, model_state, "ckpt")
    with pytest.raises(CheckpointError, match=r"has non-finite values in w"):
        load_model_state_strict(model, model_state, "ckpt")


class Foreign:
    pass


def test_an_unreadable_file_is_one_line_without_escapes(tmp_path):
    """torch's own message for a pickled class spans lines with terminal bold codes."""
    save(tmp_path, 1)
    torch.save({"w": Foreign()}, tmp_path / "model_000001.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path, 1)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "UnpicklingError: Weights only load failed" in str(e.value)
