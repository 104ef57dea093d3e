"""Chat training: assistant-only targets, packed/padded batches with exact resume, and mid_train /
chat_sft end to end on a tiny base model (loss falls, resume is bit-exact, errors are one line)."""

import shutil

import pytest
import torch

from nanochat.chat_data import PACKED, PADDED, ChatBatches, epoch_steps, render_for_training, rows_to_batch
from nanochat.checkpoint import load_meta, load_model
from nanochat.tokenizer import get_tokenizer
from scripts import chat_sft, mid_train
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture
from tasks.gsm8k import math_conversation
from tasks.identity import Identity
from tasks.spellingbee import SimpleSpelling
from tests.helpers import CHAT_TRAIN_ARGS, MID_TRAIN_ARGS, copy_checkpoint

SFT = CHAT_TRAIN_ARGS + ["--examples_per_step=8", "--eval_examples=8", "--eval_metrics_max_problems=0", "--init_lr_frac=0.5"]


def assistant_tokens(ids, tokenizer):
    """Reference, one token at a time: True for the tokens the assistant must learn: after
    <|assistant_start|> up to and including <|assistant_end|>, except <|output_start|>...<|output_end|>."""
    special = tokenizer.special_ids
    in_assistant = in_output = False
    trained = []
    for token in ids:
        if token == special["<|assistant_start|>"]:
            in_assistant = True
            trained.append(False)
            continue
        in_output = in_output or token == special["<|output_start|>"]
        trained.append(in_assistant and not in_output)
        in_output = in_output and token != special["<|output_end|>"]
        in_assistant = in_assistant and token != special["<|assistant_end|>"]
    return trained


def check_targets(inputs, targets, tokenizer):
    """targets[i] == inputs[i + 1] where that token is the assistant's, else -1, row by row (all
    but the last position, whose target token is not among the inputs)."""
    for row_in, row_tg in zip(inputs.tolist(), targets.tolist()):
        trained = assistant_tokens(row_in, tokenizer)
        for i in range(len(row_in) - 1):
            assert row_tg[i] == (row_in[i + 1] if trained[i + 1] else -1), (i, tokenizer.visualize_mask(row_in, trained))


GSM8K_STYLE = {"messages": [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "Natalia sold clips to 48 friends in April, and half as many in May. How many in total?"},
    {"role": "assistant", "content": math_conversation("q", "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
                                                            "In total 48+24 = <<48+24=72>>72 clips.\n#### 72")["messages"][1]["content"]},
    {"role": "user", "content": "And in June, twice May?"},
    {"role": "assistant", "content": [{"type": "python", "text": "24*2"}, {"type": "python_output", "text": "48"},
                                      {"type": "text", "text": "48 clips.\n#### 48"}]},
]}


def test_targets_are_exactly_the_assistant_tokens(base_dir):
    tokenizer = get_tokenizer()
    ids, mask = render_for_training(tokenizer, GSM8K_STYLE, max_tokens=10_000)
    inputs, targets = rows_to_batch([(ids, mask)], tokenizer.get_bos_token_id())
    assert inputs.tolist() == [ids[:-1]]
    trained = assistant_tokens(ids, tokenizer)
    assert targets.tolist() == [[ids[i + 1] if trained[i + 1] else -1 for i in range(len(ids) - 1)]]
    learned = tokenizer.decode([t for t in targets[0].tolist() if t >= 0])
    assert learned == ("In May she sold 48/2 = <|python_start|>48/2<|python_end|>24 clips.\n"
                       "In total 48+24 = <|python_start|>48+24<|python_end|>72 clips.\n#### 72<|assistant_end|>"
                       "<|python_start|>24*2<|python_end|>48 clips.\n#### 48<|assistant_end|>")  # no tool output, no user


def small_mixture():
    return TaskMixture([Identity(size=12), Arithmetic(size=12), SimpleSpelling(size=12)], seed=3)


def test_packed_rows_are_full_whole_conversations(base_dir):
    tokenizer = get_tokenizer()
    mixture, T = small_mixture(), 200
    usable = sum(render_for_training(tokenizer, c, T + 1) is not None for c in mixture)
    bos, user_start = tokenizer.get_bos_token_id(), tokenizer.special_ids["<|user_start|>"]
    starts = 0
    for inputs, targets in ChatBatches(tokenizer, mixture, PACKED, 3, T, loop=False, pack_buffer=4):
        assert inputs.shape[1] == T and targets.shape == inputs.shape
        assert (inputs[:, 0] == bos).all()  # every row starts a conversation
        check_targets(inputs, targets, tokenizer)
        starts += sum(a == bos and b == user_start for row in inputs.tolist() for a, b in zip(row, row[1:]))
    assert starts == usable == len(mixture)  # one pass places each conversation exactly once
    # a conversation longer than the row is truncated to exactly one row
    inputs, targets = next(ChatBatches(tokenizer, mixture, PACKED, 2, 16))
    assert inputs.shape == (2, 16) and (targets >= 0).any()
    assert all(row.count(bos) == 1 for row in inputs.tolist())
    check_targets(inputs, targets, tokenizer)


def test_padded_rows_deal_examples_by_rank(base_dir):
    tokenizer = get_tokenizer()
    mixture = small_mixture()
    batches = ChatBatches(tokenizer, mixture, PADDED, 4, 512, rank=1, world_size=2)
    inputs, targets = next(batches)
    expected = rows_to_batch([render_for_training(tokenizer, mixture[i], 513) for i in (1, 3, 5, 7)], tokenizer.get_bos_token_id())
    assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    check_targets(inputs, targets, tokenizer)


def test_epoch_steps_is_about_one_pass(base_dir):
    tokenizer = get_tokenizer()
    mixture = small_mixture()
    assert epoch_steps(tokenizer, mixture, PADDED, 512, rows_per_step=8) == len(mixture) // 8
    rows = sum(len(inputs) for inputs, _ in ChatBatches(tokenizer, mixture, PACKED, 1, 200, loop=False))
    estimate = epoch_steps(tokenizer, mixture, PACKED, 200, rows_per_step=1)
    assert estimate <= rows <= 1.2 * estimate  # the estimate leaves out best-fit padding


@pytest.mark.parametrize("mode,seq_len,rank,world_size", [(PACKED, 96, 0, 1), (PACKED, 300, 1, 2), (PADDED, 64, 0, 1), (PADDED, 512, 1, 3)])
def test_resumed_batches_are_the_same(base_dir, mode, seq_len, rank, world_size):
    tokenizer = get_tokenizer()
    mixture = small_mixture()
    args = (tokenizer, mixture, mode, 3, seq_len)
    batches = ChatBatches(*args, rank=rank, world_size=world_size, pack_buffer=5)
    for _ in range(7):  # far enough to wrap into a second epoch on the small configurations
        next(batches)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(6)]
    resumed = ChatBatches(*args, rank=rank, world_size=world_size, pack_buffer=5, state=state)
    for want_inputs, want_targets in expected:
        inputs, targets = next(resumed)
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
    assert resumed.state_dict() == batches.state_dict()


def fixed_batch_loss(kind, tag, mixture, mode):
    tokenizer = get_tokenizer()
    model, _ = load_model(kind, tag)
    inputs, targets = next(ChatBatches(tokenizer, mixture, mode, 8, 128))
    with torch.no_grad():
        return float(model(inputs, targets))


MOLEGRAD = ["--molegrad=True", "--molegrad_rank_k=8", "--molegrad_targets=all", "--recompute=mlp"]


@pytest.mark.parametrize("name,flags", [("dense", []), ("molegrad", MOLEGRAD)])  # molegrad: from the dense base model
def test_mid_train_learns_and_resumes_bit_exactly(base_dir, name, flags):
    run = MID_TRAIN_ARGS + flags + ["--source_tag=tiny", "--num_iterations=6", "--eval_every=3", "--save_every=3", "--keep_checkpoints=0"]
    full = mid_train.main(run + [f"--model_tag={name}_full"])
    copy_checkpoint(base_dir, "mid", f"{name}_full", f"{name}_resumed", 3)
    resumed = mid_train.main(run + [f"--model_tag={name}_resumed", "--resume_from_step=3"])
    assert resumed["losses"] == full["losses"][3:]  # floats compared exactly
    assert resumed["history"] == full["history"][1:]  # val bpb at steps 3 and 6
    mixture = mid_train.train_mixture("offline")
    before, after = fixed_batch_loss("base", "tiny", mixture, PACKED), fixed_batch_loss("mid", f"{name}_full", mixture, PACKED)
    assert after < 0.7 * before, (before, after)


def test_chat_sft_learns_and_resumes_bit_exactly(base_dir):
    mid_train.main(MID_TRAIN_ARGS + ["--source_tag=tiny", "--model_tag=for_sft", "--num_iterations=2", "--eval_every=0"])
    run = SFT + ["--source_tag=for_sft", "--num_iterations=6", "--eval_every=3", "--save_every=3", "--keep_checkpoints=0"]
    full = chat_sft.main(run + ["--model_tag=sft_full"])
    assert full["source_dir"].endswith("mid_checkpoints/for_sft")  # --source=mid is the default
    copy_checkpoint(base_dir, "sft", "sft_full", "sft_resumed", 3)
    resumed = chat_sft.main(run + ["--model_tag=sft_resumed", "--resume_from_step=3"])
    assert resumed["losses"] == full["losses"][3:]
    assert resumed["history"] == full["history"][1:]
    mixture = chat_sft.train_mixture("offline")
    before, after = fixed_batch_loss("mid", "for_sft", mixture, PADDED), fixed_batch_loss("sft", "sft_full", mixture, PADDED)
    assert after < before, (before, after)


def test_a_resumed_chat_stage_trains_with_its_new_lrs_and_keeps_its_shapes(base_dir, capsys):
    """LR 0 on resume leaves the weights of step 3 untouched (the saved optimizer state used to
    bring its old LRs back); turning MoleGrad on at resume is refused in one line."""
    run = MID_TRAIN_ARGS + ["--source_tag=tiny", "--num_iterations=5", "--eval_every=0", "--save_every=3", "--keep_checkpoints=0"]
    mid_train.main(run + ["--model_tag=lr_full"])
    copy_checkpoint(base_dir, "mid", "lr_full", "lr_zero", 3)
    mid_train.main(run + ["--model_tag=lr_zero", "--resume_from_step=3", "--matrix_lr=0", "--embedding_lr=0",
                          "--unembedding_lr=0"])
    directory = base_dir / "mid_checkpoints" / "lr_zero"
    before, after = (torch.load(directory / f"model_00000{step}.pt", weights_only=True) for step in (3, 5))
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert load_meta(directory, 5)["flags"]["matrix_lr"] == 0.0
    with pytest.raises(SystemExit) as e:
        mid_train.main(run + MOLEGRAD + ["--model_tag=lr_full", "--resume_from_step=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert "--molegrad/--molegrad_rank_k/--memory_mode: the checkpoint at step 3" in err[0], err


def test_chat_sft_reports_categorical_accuracy(base_dir):
    out = chat_sft.main(SFT + ["--eval_metrics_max_problems=4", "--source=base", "--source_tag=tiny", "--model_tag=metrics",
                               "--num_iterations=1", "--eval_every=-1"])
    final = out["history"][-1]
    assert final["MMLU_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0) and final["ARC-Easy_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize(
    "script,argv,message",
    [
        (mid_train, ["--source_tag=nothing"], "no complete base checkpoint in"),
        (chat_sft, ["--model_tag=nothing"], "(or start from an earlier stage with --source=base)"),
        (chat_sft, ["--examples_per_step=6"], "--examples_per_step: expected a positive multiple of"),
        (mid_train, ["--total_batch_size=1000"], "--total_batch_size: expected a positive multiple of"),
        (mid_train, ["--source=mid"], "--source: expected one of base"),
        (mid_train, ["--eval_every=-2"], "--eval_every: expected >= -1, got -2"),
        (chat_sft, ["--num_iterations=-3"], "--num_iterations: expected >= 1 (or -1 = about one epoch), got -3"),
    ],
)
def test_bad_input_is_one_clear_line(base_dir, capsys, script, argv, message):
    with pytest.raises(SystemExit) as e:
        script.main((MID_TRAIN_ARGS if script is mid_train else SFT) + ["--num_iterations=1"] + argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_no_base_checkpoint_at_all_is_one_clear_line(tiny_base, tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_base / "tokenizer", tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        mid_train.main(MID_TRAIN_ARGS + ["--num_iterations=1"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no base checkpoints under" in err[0] and "scripts.base_train" in err[0], err
