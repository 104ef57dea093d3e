"""chat_eval: letter scoring against a hand count, generative pass@k, problems decoded together
vs one at a time, the script end to end."""

import json

import pytest
import torch

from nanochat.engine import Engine
from nanochat.evaluation import chatcore, run_categorical, run_generative
from scripts import base_train, chat_eval
from tasks import fixtures
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.gsm8k import GSM8K
from tests.helpers import build_tiny_base_dir, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = build_tiny_base_dir(tmp_path_factory.mktemp("evalbase"))
    return base


class AlwaysLetter(torch.nn.Module):
    """Logits that favour one token id everywhere."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., self.token] = 1.0
        return logits


def test_categorical_matches_hand_count(tiny, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny))
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    task = ARC("ARC-Easy", "test", source="offline")
    for letter in ("A", "B"):
        model = AlwaysLetter(tokenizer.get_vocab_size(), tokenizer.encode(letter)[0])
        # examples labelled 1-4 tie on every letter: the first one wins
        chosen = [letter if letter in task[i]["letters"] else task[i]["letters"][0] for i in range(len(task))]
        expected = sum(task[i]["messages"][-1]["content"] == c for i, c in enumerate(chosen)) / len(task)
        for batch_size in (1, 4):
            assert run_categorical(model, tokenizer, task, -1, batch_size, torch.device("cpu")) == pytest.approx(expected)


def test_generative_pass_at_k_with_scripted_engine(tiny, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny))
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    task = GSM8K("main", "test", source="offline")
    answers = [task[i]["messages"][-1]["content"][-1]["text"] for i in range(3)]  # the text part with "#### N"

    class ScriptedEngine:
        max_len = 4096

        def generate_many(self, prompts, num_samples, max_tokens, temperature, top_k, seeds, batch_size):
            # sample 0 is wrong, the last sample is right for even problems only; last problem first
            for p in reversed(range(len(prompts))):
                seed = seeds[p]
                right = tokenizer.encode(answers[seed]) if seed % 2 == 0 else tokenizer.encode("#### -1")
                wrong = tokenizer.encode("#### -1")
                yield p, [prompts[p] + wrong] * (num_samples - 1) + [prompts[p] + right], None

    assert run_generative(ScriptedEngine(), tokenizer, task, 3, 1, 16, 0.0, None, torch.device("cpu")) == pytest.approx(2 / 3)
    assert run_generative(ScriptedEngine(), tokenizer, task, 3, 3, 16, 0.0, None, torch.device("cpu")) == pytest.approx(2 / 3)


class RecordingTask:
    """Arithmetic's held-out problems, scored by a rule a tiny model meets about half the time
    (an even-length reply); every reply is recorded per problem."""

    def __init__(self, size: int) -> None:
        self.problems = Arithmetic(size=size, split="test")
        self.replies: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int):
        return self.problems[index]

    def evaluate(self, conversation, reply: str) -> bool:
        self.replies.setdefault(conversation["messages"][0]["content"], []).append(reply)
        return len(reply) % 2 == 0


@pytest.mark.parametrize("num_samples, temperature", [(1, 0.0), (3, 1.0)])
def test_generative_batches_of_problems_match_one_at_a_time(tiny, monkeypatch, num_samples, temperature):
    """run_generative decodes 4 rows at a time across problems; the replies and the score equal the
    old one-problem-at-a-time loop (engine.generate_batch per problem with seed = its index)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny))
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    model = tiny_model(torch.float32, vocab_size=tokenizer.get_vocab_size(), sequence_len=64)
    engine = Engine(model.eval(), tokenizer)
    max_tokens, top_k = 10, 20

    reference = RecordingTask(7)
    solved = 0
    for i in range(len(reference)):
        prompt = tokenizer.render_for_completion(reference[i])
        sequences, _ = engine.generate_batch(prompt, num_samples, max_tokens, temperature, top_k, seed=i)
        solved += any(reference.evaluate(reference[i], tokenizer.decode(s[len(prompt):])) for s in sequences)

    batched = RecordingTask(7)
    finished = []
    accuracy = run_generative(engine, tokenizer, batched, -1, num_samples, max_tokens, temperature, top_k, torch.device("cpu"),
                              on_problem=lambda i, ok: finished.append(i), batch_size=4)
    assert batched.replies == reference.replies
    assert accuracy == pytest.approx(solved / 7) and 0 < solved < 7
    assert sorted(finished) == list(range(7))


def test_chatcore_centering():
    assert chatcore({"ARC-Easy": 0.25, "GSM8K": 0.5}) == pytest.approx((0.0 + 0.5) / 2)
    assert chatcore({"MMLU": 1.0}) == pytest.approx(1.0)


def test_script_end_to_end_on_a_tiny_model(tiny, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny))
    base_train.main(["--depth=1", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=256", "--num_iterations=3",
                     "--eval_every=-1", "--sample_every=-1", "--threads=1", "--dtype=float32", "--model_tag=e"])
    results = chat_eval.main(["-i", "base", "-c", "e", "-a", "ARC-Easy,GSM8K,SpellingBee,Arithmetic", "--max_problems=2",
                              "--max_new_tokens=4", "--task_source=offline"])
    assert set(results) == {"ARC-Easy", "GSM8K", "SpellingBee", "Arithmetic", "ChatCORE"}
    assert all(0.0 <= v <= 1.0 for k, v in results.items() if k != "ChatCORE")
    section = (tiny / "report" / "chat-evaluation-base.md").read_text()
    assert "ChatCORE" in section
    # the offline hub stand-ins are marked as smoke tests with their sizes; the synthetic tasks are not
    logged = json.loads((tiny / "report" / "chat-evaluation-base.json").read_text())["data"]
    assert logged["smoke_tests"] == {"ARC-Easy": len(fixtures.ARC_EASY), "GSM8K": len(fixtures.GSM8K_MAIN)}


def test_unknown_task_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        chat_eval.main(["-a", "Nope"])
    assert e.value.code == 2 and "unknown task 'Nope'" in capsys.readouterr().err
