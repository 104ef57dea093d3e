"""chat_eval: letter scoring against a hand count, generative pass@k, the script end to end."""

import json

import pytest
import torch

from nanochat.evaluation import chatcore, run_categorical, run_generative
from scripts import base_train, chat_eval
from tasks import fixtures
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tests.helpers import build_tiny_base_dir


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

        def generate_batch(self, prompt, num_samples, max_tokens, temperature, top_k, seed):
            # sample 0 is wrong, the last sample is right for even problems only
            right = tokenizer.encode(answers[seed]) if seed % 2 == 0 else tokenizer.encode("#### -1")
            wrong = tokenizer.encode("#### -1")
            return [prompt + wrong] * (num_samples - 1) + [prompt + right], None

    assert run_generative(ScriptedEngine(), tokenizer, task, 3, 1, 16, 0.0, None, torch.device("cpu")) == pytest.approx(2 / 3)
    assert run_generative(ScriptedEngine(), tokenizer, task, 3, 3, 16, 0.0, None, torch.device("cpu")) == pytest.approx(2 / 3)


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
