"""The identity conversations say only what the model's training history shows (tasks/identity.py):
no MoleGrad or GPU for a model trained dense on a CPU, read from the checkpoints of a real run."""

from __future__ import annotations

import pytest

from scripts import chat_sft, mid_train
from tasks.identity import Identity, TrainingRun
from tests.helpers import CHAT_TRAIN_ARGS, MID_TRAIN_ARGS

TINY_CONFIG = {"sequence_len": 32, "vocab_size": 512, "n_layer": 1, "n_head": 1, "n_kv_head": 1, "n_embd": 64}


def texts(run: TrainingRun) -> str:
    """Every message of enough identity conversations to draw every answer."""
    return "\n".join(m["content"] for c in Identity(size=1000, run=run) for m in c["messages"])


def stage(name: str, device_type: str | None = "cpu", world_size: int = 1, rank_k: int = 0) -> dict:
    return {"stage": name, "model_config": {**TINY_CONFIG, "molegrad_rank_k": rank_k}, "device_type": device_type,
            "world_size": world_size}


def test_without_a_history_the_answers_claim_no_method_machine_or_stages():
    text = texts(TrainingRun())
    assert "nanochat-mole" in text
    for claim in ("MoleGrad", "GPU", "CPU", "pretrained", "single"):
        assert claim not in text, claim


def test_a_dense_cpu_run_is_described_as_such():
    run = TrainingRun.from_history([stage("base"), stage("mid")])
    assert run == TrainingRun(("base", "mid"), molegrad=False, hardware="a CPU")
    text = texts(run)
    assert "MoleGrad" not in text and "GPU" not in text
    assert "I was trained on a CPU." in text and "pretrained on a text corpus, then midtrained" in text


def test_a_molegrad_gpu_run_may_say_so():
    run = TrainingRun.from_history([stage("base", "cuda", rank_k=8), stage("mid", "cuda"), stage("sft", "cuda")])
    assert run == TrainingRun(("base", "mid", "sft"), molegrad=True, hardware="a single GPU")
    text = texts(run)
    assert "My training used MoleGrad" in text and "What is MoleGrad?" in text and "on a single GPU" in text
    assert TrainingRun.from_history([stage("base", "cuda", 8), stage("mid", "cuda", 8)]).hardware == "8 GPUs"


@pytest.mark.parametrize("history, hardware", [
    ([stage("base", None), stage("mid")], ""),  # a meta from before device_type was recorded
    ([stage("base", "cuda"), stage("mid", "cpu")], ""),  # mixed
    ([{"model_config": TINY_CONFIG}, stage("sft")], ""),  # an HF import: no stages known
])
def test_unknown_or_mixed_hardware_is_not_claimed(history, hardware):
    run = TrainingRun.from_history(history)
    assert run.hardware == hardware and (run.stages == ()) == ("stage" not in history[0])


def captured_history(monkeypatch, module, stage_owner) -> list:
    """Run with the stage's train_mixture wrapped so the history it is given is kept."""
    seen = []
    original = module.train_mixture

    def train_mixture(source, history=()):
        seen.append(list(history))
        return original(source, history)

    monkeypatch.setattr(stage_owner, "train_mixture", train_mixture)
    return seen


def test_the_chat_stages_read_the_history_of_their_checkpoints(base_dir, monkeypatch):
    """The tiny base was trained dense on the CPU: mid_train's identity data says so and names no
    MoleGrad; chat_sft on top with MoleGrad on gets the whole history and may name it."""
    seen = captured_history(monkeypatch, mid_train, mid_train.STAGE)
    mid_train.main(MID_TRAIN_ARGS + ["--source_tag=tiny", "--model_tag=dense", "--num_iterations=1", "--eval_every=0"])
    run = TrainingRun.from_history(seen[-1])
    assert run == TrainingRun(("base", "mid"), molegrad=False, hardware="a CPU")
    assert "MoleGrad" not in texts(run) and "GPU" not in texts(run)

    seen = captured_history(monkeypatch, chat_sft, chat_sft)
    sft = CHAT_TRAIN_ARGS + ["--examples_per_step=8", "--eval_examples=8", "--eval_metrics_max_problems=0"]
    chat_sft.main(sft + ["--source_tag=dense", "--model_tag=molegrad", "--num_iterations=1", "--eval_every=0",
                         "--molegrad=True", "--molegrad_rank_k=8", "--molegrad_targets=all"])
    assert TrainingRun.from_history(seen[-1]) == TrainingRun(("base", "mid", "sft"), molegrad=True, hardware="a CPU")
