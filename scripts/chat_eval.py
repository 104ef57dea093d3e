"""Evaluate a chat model: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, Arithmetic, ChatCORE.

    python -m scripts.chat_eval -i sft                         # every task
    python -m scripts.chat_eval -i sft -a ARC-Easy,GSM8K --max_problems=50
    torchrun --standalone --nproc_per_node=2 -m scripts.chat_eval -i sft

Categorical tasks are scored by the answer letters' logits (batched); generative ones by
sampling through the engine with the calculator tool (pass@--num_samples), --decode_batch_size
samples of many problems decoded together. On CUDA the model runs under autocast in --dtype (as
training evaluates); on CPU in float32. Results go to the
report card ("Chat evaluation <source>"). A hub task read from its offline stand-in (a few
handwritten rows, tasks/fixtures.py) is listed there under `smoke_tests`: it shows the stage runs,
its accuracy means nothing. SpellingBee and Arithmetic are held-out synthetic problems (test
splits, disjoint from the training ones by construction).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from nanochat.checkpoint import load_chat_model
from nanochat.common import RunContext, print0, run_main
from nanochat.config import TASK_SOURCES, CheckpointFlags, RuntimeFlags, check, parse_args
from nanochat.engine import DECODE_BATCH_SIZE, Engine
from nanochat.evaluation import RANDOM_BASELINE, chatcore, run_categorical, run_generative
from nanochat.report import log_section
from tasks.common import HubTask
from tasks.registry import make_task

ALL_TASKS = ",".join(RANDOM_BASELINE)


@dataclass
class ChatEvalConfig(RuntimeFlags, CheckpointFlags):
    """Evaluate a chat checkpoint on the chat tasks."""

    tasks: str = field(default=ALL_TASKS, metadata={"short": "-a", "help": "comma-separated task names"})
    max_problems: int = field(default=-1, metadata={"help": "problems per task (-1 = all)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass for categorical tasks"})
    num_samples: int = field(default=1, metadata={"help": "samples per generative problem (pass@k)"})
    decode_batch_size: int = field(default=DECODE_BATCH_SIZE, metadata={
        "help": "samples decoded together for generative tasks (the KV cache holds this many rows of prompt + "
                "--max_new_tokens positions)"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per generated answer"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=50, metadata={"help": "top-k sampling (0 = off)"})
    task_source: str = field(default="auto", metadata={"help": "hub tasks: online, offline stand-ins, or auto",
                                                       "choices": TASK_SOURCES})

    def validate(self) -> None:
        super().validate()
        for name in self.tasks.split(","):
            check(name in RANDOM_BASELINE, f"-a/--tasks: unknown task {name!r}, expected some of {ALL_TASKS.replace(',', '|')}")
        check(self.batch_size >= 1, f"--batch_size: expected >= 1, got {self.batch_size}")
        check(self.decode_batch_size >= 1, f"--decode_batch_size: expected >= 1, got {self.decode_batch_size}")
        check(self.num_samples >= 1, f"--num_samples: expected >= 1, got {self.num_samples}")
        check(self.max_new_tokens >= 1, f"--max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"--temperature: expected >= 0, got {self.temperature}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(ChatEvalConfig, argv, prog="python -m scripts.chat_eval")
    return run_main(evaluate, cfg)


def evaluate(cfg: ChatEvalConfig, ctx: RunContext) -> dict[str, Any]:
    model, tokenizer, meta = load_chat_model(cfg, ctx.device, "float32")  # float32 weights; on CUDA autocast computes in --dtype
    engine = Engine(model, tokenizer)
    autocast = ctx.autocast() if ctx.device_type == "cuda" else nullcontext()  # CPU: float32, as before
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    accuracies: dict[str, float] = {}
    smoke_tests: dict[str, int] = {}  # task -> rows of its offline stand-in
    with autocast:
        for name in cfg.tasks.split(","):
            t0 = time.perf_counter()
            try:
                task = make_task(name, cfg.task_source)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
            if isinstance(task, HubTask) and task.source == "offline":
                smoke_tests[name] = len(task)
                print0(f"{name}: offline stand-in of {len(task)} rows (tasks/fixtures.py): a smoke test, "
                       f"its accuracy means nothing")
            if task.eval_type == "categorical":
                accuracies[name] = run_categorical(forward, tokenizer, task, cfg.max_problems, cfg.batch_size, ctx.device,
                                                   ctx.rank, ctx.world_size)
            else:
                total = min(len(task), cfg.max_problems) if cfg.max_problems > 0 else len(task)
                bar = tqdm(total=-(-total // ctx.world_size), desc=name, disable=not ctx.master, leave=False)
                accuracies[name] = run_generative(engine, tokenizer, task, cfg.max_problems, cfg.num_samples, cfg.max_new_tokens,
                                                  cfg.temperature, cfg.top_k or None, ctx.device, ctx.rank, ctx.world_size,
                                                  on_problem=lambda i, ok: bar.update(1), batch_size=cfg.decode_batch_size)
                bar.close()
            print0(f"{name:<14} accuracy {accuracies[name]:.4f}  ({time.perf_counter() - t0:.1f}s)")
    results: dict[str, Any] = dict(accuracies)
    results["ChatCORE"] = chatcore(accuracies)
    print0(f"{'ChatCORE':<14} {results['ChatCORE']:.4f}")
    log_section(f"Chat evaluation {cfg.source}", {"checkpoint": meta["checkpoint_dir"], "step": meta["step"],
                                                  "max_problems": cfg.max_problems, "num_samples": cfg.num_samples, **results,
                                                  **({"smoke_tests": smoke_tests} if smoke_tests else {})})
    return results


if __name__ == "__main__":
    main()
