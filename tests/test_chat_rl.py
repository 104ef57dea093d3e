"""Chat RL: rewards by final answer, group advantages, the masked policy-gradient loss against a
per-token loop, rollouts decoded together vs one question at a time, and scripts.chat_rl end to
end on a tiny base model (checkpoint, exact resume, one-line errors)."""

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from scripts import chat_rl
from scripts.chat_rl import PolicyGradientLoss, group_advantages, policy_gradient_batches, scoring_task, train_task
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture
from tasks.gsm8k import GSM8K
from tests.helpers import tiny_model

RL = ["--source=base", "--source_tag=tiny", "--model_tag=tiny", "--task=arithmetic", "--max_seq_len=96",
      "--examples_per_step=2", "--num_samples=3", "--max_new_tokens=12", "--device_batch_size=4", "--eval_every=0",
      "--threads=1", "--dtype=float32", "--init_lr_frac=0.5"]


@pytest.mark.parametrize("task", [GSM8K("main", "train", source="offline"), Arithmetic(size=10, split="train")])
def test_reward_scores_the_final_answer(task):
    conversation = task[0]
    reference = conversation["messages"][-1]["content"][-1]["text"].rsplit("#### ", 1)[1].strip()
    wrong = str(int(float(reference)) + 1)
    assert task.reward(conversation, f"Some working.\n#### {reference}") == 1.0
    assert task.reward(conversation, f"Some working.\n#### {wrong}") == 0.0
    assert task.reward(conversation, f"The answer is {reference}.") == 0.0  # no "#### N" marker


@pytest.mark.parametrize("name, members", [("auto", {"GSM8K", "Arithmetic"}), ("synthetic", {"Arithmetic", "SpellingBee"})])
def test_mixture_rewards_are_scored_by_the_member_task(name, members):
    mixture = train_task(name, "offline")
    assert isinstance(mixture, TaskMixture) and {type(task).__name__ for task in mixture.tasks} == members
    assert all(task.split == "train" for task in mixture.tasks)
    held_out = chat_rl.eval_tasks(name, "offline")
    assert all(task.split == "test" for task in held_out.values()) and len(held_out) == 2
    for index in range(4):
        member, local = mixture.locate(index)
        assert scoring_task(mixture, index) is member
        conversation = mixture[index]
        answer = conversation["messages"][-1]["content"][-1]["text"].rsplit("#### ", 1)[1]
        assert scoring_task(mixture, index).reward(conversation, f"#### {answer}") == 1.0


def test_group_advantages_subtract_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # 3 of 8 right: mean 0.375
    expected = torch.tensor([0.625, -0.375, -0.375, 0.625, 0.625, -0.375, -0.375, -0.375])
    assert torch.allclose(group_advantages(rewards), expected)
    assert torch.equal(group_advantages(torch.ones(4)), torch.zeros(4))  # all agree: nothing to learn


def test_policy_gradient_loss_matches_a_per_token_loop():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).float()
    model.init_weights()
    # rollouts: prompt (mask 0), sampled tokens (1), a forced tool output (0), more sampled tokens
    rows = [([1, 5, 6, 7, 8, 9], [0, 0, 1, 1, 0, 1]),
            ([1, 5, 10, 11], [0, 0, 1, 1]),
            ([1, 5, 12, 13, 14, 15, 16], [0, 0, 1, 0, 0, 1, 1]),
            ([1, 5, 17], [0, 0, 1])]
    advantages = [0.5, -0.25, 1.0, -1.25]
    batches, num_tokens = policy_gradient_batches(rows, advantages, batch_size=3, pad_id=0, device=torch.device("cpu"))
    assert num_tokens == 3 + 2 + 3 + 1 and len(batches) == 2
    objective = PolicyGradientLoss(model)
    # train_step's accumulation: Σ over micro-batches of loss / grad_accum
    loss = sum(objective(inputs, batch) for inputs, batch in batches) / len(batches)

    reference = torch.zeros((), dtype=torch.float64)
    for (ids, mask), advantage in zip(rows, advantages):
        log_probs = torch.log_softmax(model(torch.tensor([ids])).double(), dim=-1)[0]  # (T, V)
        for t in range(1, len(ids)):
            if mask[t]:
                reference -= advantage * log_probs[t - 1, ids[t]]
    reference /= num_tokens
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


def test_rollouts_decode_all_questions_together_as_one_at_a_time(monkeypatch):
    """rollouts decodes 5 questions x 3 samples, 4 rows at a time; rows, rewards and advantages
    equal the old loop: engine.generate_batch per question with its seed."""
    monkeypatch.setattr(Arithmetic, "reward", lambda self, conversation, response: float(len(response) % 2))
    tokenizer = Tokenizer.train_from_iterator(["Sam has 12 apples and buys 3 bags with 4 apples in each."] * 20, vocab_size=300)
    model = tiny_model(torch.float32, vocab_size=tokenizer.get_vocab_size(), sequence_len=128)
    engine = Engine(model.eval(), tokenizer)
    task = Arithmetic(size=10, split="train")
    cfg = chat_rl.parse_args(chat_rl.ChatRLConfig, ["--examples_per_step=5", "--num_samples=3", "--max_new_tokens=9",
                                                    "--decode_batch_size=4", "--seed=3"])
    rows, rewards, advantages = chat_rl.rollouts(engine, tokenizer, task, 1, cfg, 0, 1)

    reference_rows, reference_rewards, reference_advantages = [], [], []
    for position in range(5, 10):  # step 1's questions
        conversation = task[position % len(task)]
        prompt = tokenizer.render_for_completion(conversation)
        sequences, masks = engine.generate_batch(prompt, 3, 9, cfg.temperature, cfg.top_k, seed=3 + position * 3)
        group = [task.reward(conversation, tokenizer.decode(seq[len(prompt):])) for seq in sequences]
        reference_rows += list(zip(sequences, masks))
        reference_rewards += group
        reference_advantages += group_advantages(torch.tensor(group)).tolist()
    assert rows == reference_rows
    assert rewards == reference_rewards and 0 < sum(rewards) < len(rewards)
    assert advantages == reference_advantages


def test_rl_runs_saves_and_resumes_exactly(base_dir, monkeypatch):
    # an untrained model never writes the right "#### N": reward the parity of the reply's length
    # instead, so that advantages, the loss and the updates are not all zero
    monkeypatch.setattr(Arithmetic, "reward", lambda self, conversation, response: float(len(response) % 2))
    full = chat_rl.main(RL + ["--num_iterations=3", "--save_every=2", "--keep_checkpoints=0", "--eval_every=-1",
                              "--eval_examples=2"])
    assert len(full["losses"]) == 3 and all(0.0 < r < 1.0 for r in full["rewards"])
    assert all(loss != 0.0 for loss in full["losses"])
    assert set(full["scores"]) == {"arithmetic_pass@3"}
    ckpt = base_dir / "rl_checkpoints" / "tiny"
    assert (ckpt / "meta_000002.json").exists() and (ckpt / "meta_000003.json").exists()
    assert (ckpt / "state_000003_rank0.pt").exists()  # optimizer state, for --resume_from_step

    resumed = chat_rl.main(RL + ["--num_iterations=3", "--resume_from_step=2"])
    assert resumed["losses"] == full["losses"][2:]
    assert resumed["rewards"] == full["rewards"][2:]


def test_missing_source_is_one_clear_line(base_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_rl.main(RL[1:] + ["--source=sft", "--source_tag=nope", "--num_iterations=1"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: rl: no complete sft checkpoint") and "nope" in err


def test_rl_runs_with_molegrad(base_dir, monkeypatch):
    monkeypatch.setattr(Arithmetic, "reward", lambda self, conversation, response: float(len(response) % 2))
    result = chat_rl.main(RL + ["--num_iterations=2", "--molegrad", "--molegrad_rank_k=4", "--model_tag=tiny_mole"])
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert (base_dir / "rl_checkpoints" / "tiny_mole" / "meta_000002.json").exists()
