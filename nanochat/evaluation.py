"""Scoring a chat model on tasks: categorical by answer-letter logits, generative by sampling.

- categorical (ARC, MMLU): the prompt is the conversation without its answer plus
  <|assistant_start|>; the model's next-token logits are compared over the example's letters only
  (so a tiny model that cannot yet "talk" is still measured); batched with right padding.
- generative (GSM8K, HumanEval, SpellingBee, Arithmetic): `num_samples` completions per problem through the
  Engine (KV cache, calculator tool); a problem counts as solved if any sample passes (pass@k).
  Many problems decode together (`batch_size` samples at a time, Engine.generate_many); problem i
  samples with seed i, so a problem's replies do not depend on the batch it decoded in.
ChatCORE = mean over tasks of accuracy centred on the task's random baseline. The tasks by name
are built by tasks/registry.py (the library does not import tasks/).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from nanochat import distributed
from nanochat.engine import DECODE_BATCH_SIZE, Engine

# task name -> accuracy of random guessing (the ChatCORE baseline)
RANDOM_BASELINE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0,
                   "Arithmetic": 0.0}


def _rank_indices(n: int, rank: int, world_size: int) -> range:
    return range(rank, n, world_size)


def _all_reduce_counts(passed: int, total: int, device: torch.device) -> tuple[int, int]:
    if distributed.is_distributed():
        counts = torch.tensor([passed, total], dtype=torch.long, device=device)
        distributed.all_reduce(counts, "eval counts").wait()
        passed, total = int(counts[0]), int(counts[1])
    return passed, total


@torch.no_grad()
def run_categorical(model: torch.nn.Module, tokenizer: Any, task: Any, max_problems: int, batch_size: int,
                    device: torch.device, rank: int = 0, world_size: int = 1) -> float:
    """Accuracy from the answer letters' logits at the position after <|assistant_start|>."""
    n = min(len(task), max_problems) if max_problems > 0 else len(task)
    indices = list(_rank_indices(n, rank, world_size))
    passed = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        pad = tokenizer.get_bos_token_id()
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, V); causal, so right padding does not change earlier positions
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
            scores = logits[row, len(prompt) - 1, letter_ids]
            answer = conversation["letters"][int(scores.argmax())]
            passed += bool(task.evaluate(conversation, answer))
    passed, total = _all_reduce_counts(passed, len(indices), device)
    return passed / max(total, 1)


def run_generative(engine: Engine, tokenizer: Any, task: Any, max_problems: int, num_samples: int, max_tokens: int,
                   temperature: float, top_k: int | None, device: torch.device, rank: int = 0, world_size: int = 1,
                   on_problem: Callable[[int, bool], None] | None = None, batch_size: int = DECODE_BATCH_SIZE) -> float:
    """pass@num_samples: a problem is solved if any sampled completion evaluates as correct.
    on_problem(i, solved) is called as each problem finishes (not in index order)."""
    n = min(len(task), max_problems) if max_problems > 0 else len(task)
    indices = list(_rank_indices(n, rank, world_size))
    conversations = [task[i] for i in indices]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
    for i, prompt in zip(indices, prompts):
        if len(prompt) >= engine.max_len:
            raise ValueError(f"{type(task).__name__} problem {i}: the prompt ({len(prompt)} tokens) does not fit the model's {engine.max_len} positions")
    passed = 0
    generations = engine.generate_many(prompts, num_samples, max_tokens, temperature, top_k, seeds=indices,
                                       batch_size=batch_size) if prompts else []
    for p, sequences, _ in generations:
        replies = [tokenizer.decode(seq[len(prompts[p]):]) for seq in sequences]
        solved = any(bool(task.evaluate(conversations[p], reply)) for reply in replies)
        passed += solved
        if on_problem is not None:
            on_problem(indices[p], solved)
    passed, total = _all_reduce_counts(passed, len(indices), device)
    return passed / max(total, 1)


def chatcore(accuracies: dict[str, float]) -> float:
    """Mean of (acc - baseline) / (1 - baseline) over the evaluated tasks."""
    centred = [(acc - RANDOM_BASELINE[name]) / (1 - RANDOM_BASELINE[name]) for name, acc in accuracies.items()]
    return sum(centred) / len(centred)
