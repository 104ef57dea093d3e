"""Checkpoints: atomic, complete-only, clear errors on corrupt or mismatched files."""

import random
from pathlib import Path

import pytest
import torch

import nanochat.checkpoint as ckpt
from nanochat.checkpoint import (
    CheckpointError,
    complete_steps,
    is_checkpoint_path,
    last_step,
    load_checkpoint,
    load_model_state_strict,
    resolve_checkpoint,
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


# ---------------------------------------------------------------------------------------------
# -c: a tag, a checkpoint directory or a model_NNNNNN.pt file

@pytest.fixture
def sft_run(tmp_path, monkeypatch):
    """$NANOCHAT_BASE_DIR/sft_checkpoints/d12 with complete checkpoints at steps 5 and 10."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    directory = tmp_path / "sft_checkpoints" / "d12"
    save(directory, 5)
    save(directory, 10)
    return directory


def test_c_takes_a_tag_a_directory_or_a_model_file(sft_run, monkeypatch):
    assert resolve_checkpoint("sft", "d12") == (sft_run, 10)
    assert resolve_checkpoint("sft", "d12", 5) == (sft_run, 5)
    assert resolve_checkpoint("sft", "") == (sft_run, 10)  # the newest directory
    assert resolve_checkpoint("sft", str(sft_run)) == (sft_run, 10)
    assert resolve_checkpoint("sft", f"{sft_run}/") == (sft_run, 10)
    assert resolve_checkpoint("base", str(sft_run / "model_000005.pt")) == (sft_run, 5)  # a path needs no kind
    assert resolve_checkpoint("sft", str(sft_run / "model_000005.pt"), 5) == (sft_run, 5)  # --step agreeing
    monkeypatch.chdir(sft_run.parent)
    assert resolve_checkpoint("sft", "d12/model_000010.pt") == (Path("d12"), 10)
    assert resolve_checkpoint("sft", "./d12") == (Path("d12"), 10)
    assert [is_checkpoint_path(c) for c in ("d12", "d12/", "/abs", "~/x", ".", "model_000001.pt")] == [False] + [True] * 5


@pytest.mark.parametrize("name, step, error", [
    ("model_000005.pt", 10, r"model_000005.pt is step 5 but --step=10: give one of them"),
    ("model_000007.pt", -1, r"missing checkpoint file .*model_000007.pt"),
    ("weights.pt", -1, r"weights.pt: expected a checkpoint's model_NNNNNN.pt file"),
    ("nowhere", -1, r"no checkpoint directory .*nowhere"),
])
def test_c_names_what_is_wrong_in_one_line(sft_run, name, step, error):
    with pytest.raises(CheckpointError, match=error) as e:
        resolve_checkpoint("sft", str(sft_run / name), step)
    assert "\n" not in str(e.value)


def test_c_refuses_a_model_file_whose_checkpoint_is_incomplete(sft_run):
    (sft_run / "model_000007.pt").write_bytes(b"")  # a save that never wrote its meta
    with pytest.raises(CheckpointError, match=r"no complete checkpoint at step 7 .*available steps: \[5, 10\]"):
        resolve_checkpoint("sft", str(sft_run / "model_000007.pt"))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint \(meta_NNNNNN.json\) in"):
        resolve_checkpoint("sft", str(sft_run.parent))


def test_every_reader_takes_a_model_file(base_dir, capsys):
    """The loader of chat_cli/chat_web/chat_eval/base_eval/base_loss/export_hf (load_chat_model)
    and the chat training stages' source read -c path/to/model_NNNNNN.pt as that step."""
    from nanochat.checkpoint import load_chat_model, load_meta
    from nanochat.config import CheckpointFlags
    from scripts import chat_cli, mid_train
    from tests.helpers import MID_TRAIN_ARGS

    directory = base_dir / "base_checkpoints" / "tiny"
    file = str(directory / "model_000010.pt")
    _, _, meta = load_chat_model(CheckpointFlags(source="base", model_tag=file), torch.device("cpu"))
    assert meta["checkpoint_dir"] == str(directory) and meta["step"] == 10
    chat = ["-i", "base", "--max_tokens=8", "--threads=1", "-p", "the gradient", "-t", "0"]
    assert chat_cli.main(chat + ["-c", file]) == chat_cli.main(chat + ["-c", "tiny"])
    with pytest.raises(SystemExit):
        chat_cli.main(chat + ["-c", file, "--step=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_000010.pt is step 10 but --step=3" in err[0], err
    result = mid_train.main(MID_TRAIN_ARGS + ["-c", file, "--num_iterations=1", "--eval_every=0"])
    assert (result["source_dir"], result["source_step"]) == (str(directory), 10)
    assert result["checkpoint_dir"] == str(base_dir / "mid_checkpoints" / "tiny")  # the source directory's name
    assert load_meta(base_dir / "mid_checkpoints" / "tiny", 1)["source"]["step"] == 10


class FakeCudaRng:
    """torch.cuda's RNG functions on a machine with `visible` GPUs, this process on `device`: each
    GPU's state is a distinct tensor; set_rng_state calls are recorded as (state, device)."""

    def __init__(self, monkeypatch, visible: int, device: int):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(visible)]
        self.set_calls: list[tuple[torch.Tensor, int]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d="cuda": self.states[d])  # IndexError past `visible`
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)

    def _set(self, state: torch.Tensor, device="cuda") -> None:
        if not 0 <= device < len(self.states):
            raise IndexError(f"no CUDA device {device}")
        self.set_calls.append((state.clone(), device))


def test_cuda_rng_state_is_this_ranks_device_only(tmp_path, monkeypatch):
    saving = FakeCudaRng(monkeypatch, visible=8, device=3)  # rank 3 of an 8-GPU torchrun box
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"rng": rng_state()}, {"x": 1}, rank=3)
    _, rank_state, _ = load_checkpoint(tmp_path, 1, rank=3)
    assert torch.equal(rank_state["rng"]["cuda"], saving.states[3])  # one tensor, not eight
    resuming = FakeCudaRng(monkeypatch, visible=1, device=0)  # the same rank resumed alone on a 1-GPU machine
    set_rng_state(rank_state["rng"])
    assert len(resuming.set_calls) == 1 and resuming.set_calls[0][1] == 0
    assert torch.equal(resuming.set_calls[0][0], saving.states[3])


def test_an_older_checkpoint_with_every_gpus_rng_resumes_on_fewer_gpus(tmp_path, monkeypatch, capsys):
    """Checkpoints saved before the fix hold torch.cuda.get_rng_state_all(): a list over the GPUs
    visible then. Each rank takes its own device's entry; with none, one line, never an IndexError."""
    old = FakeCudaRng(monkeypatch, visible=2, device=0)
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {"rng": {**rng_state(), "cuda": torch.cuda.get_rng_state_all()}}, {"x": 1})
    _, rank_state, _ = load_checkpoint(tmp_path, 1)
    own = FakeCudaRng(monkeypatch, visible=4, device=1)
    set_rng_state(rank_state["rng"])
    assert [device for _, device in own.set_calls] == [1] and torch.equal(own.set_calls[0][0], old.states[1])
    capsys.readouterr()
    beyond = FakeCudaRng(monkeypatch, visible=4, device=3)
    set_rng_state(rank_state["rng"])
    assert beyond.set_calls == []
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "CUDA RNG states for 2 GPU(s), none for cuda:3" in out[0], out


def test_checkpoints_are_read_through_a_file_mapping(tmp_path):
    """torch.load(mmap=True): the tensors stay backed by the file (shown in /proc/self/maps) and
    reach their device without a whole copy in host RAM first."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    save(tmp_path, 4, value=2.0)
    model_state, _, _ = load_checkpoint(tmp_path, 4)
    assert str(tmp_path / "model_000004.pt") in maps.read_text()
    assert torch.equal(model_state["w"], torch.full((2, 3), 2.0))


def test_load_model_builds_on_the_target_device(base_dir):
    """No tensor of the model is made on the CPU first: building on `device` directly (here meta,
    which allocates nothing) is what keeps a large model out of host RAM on its way to a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nanochat.checkpoint import load_model

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.update(t.device.type for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Devices() as devices:
        model, meta = load_model("base", "tiny", device="meta", weights=False)
    assert devices.seen == {"meta"}, devices.seen
    assert all(p.is_meta for p in model.parameters()) and meta["step"] == 10
