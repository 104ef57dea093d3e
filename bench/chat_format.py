"""Does a chat model follow the conversation format? Rates over N arithmetic prompts.

    python -m bench.chat_format -i sft --num_prompts=50

Per prompt (a held-out synthetic arithmetic word problem), one greedy reply through the engine:
- ends_turn: the reply stops with <|assistant_end|> within --max_tokens;
- python_call: the reply contains <|python_start|> ... <|python_end|> whose body the calculator
  evaluates (a well-formed tool call);
- correct: the final `#### N` matches the reference.
Table per stage, then one JSON line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nanochat.calculator import CalculatorError, calculate
from nanochat.checkpoint import load_chat_model
from nanochat.common import RunContext, run_main
from nanochat.config import CheckpointFlags, RuntimeFlags, parse_args
from nanochat.engine import Engine
from nanochat.report import log_section
from tasks.arithmetic import Arithmetic


@dataclass
class FormatConfig(RuntimeFlags, CheckpointFlags):
    """Rate how well a chat checkpoint follows the conversation and tool-call format."""

    num_prompts: int = field(default=50, metadata={"help": "arithmetic prompts to sample"})
    max_tokens: int = field(default=128, metadata={"help": "tokens per reply"})
    seed: int = field(default=12345, metadata={"help": "seed of the held-out problems (not the training seed)"})


def well_formed_call(expression: str) -> bool:
    try:
        calculate(expression)
    except CalculatorError:
        return False
    return True


def measure(engine: Engine, tokenizer, num_prompts: int, max_tokens: int, seed: int) -> dict[str, float]:
    task = Arithmetic(size=num_prompts, split="test", seed=seed)
    end_id = tokenizer.encode_special("<|assistant_end|>")
    py_start, py_end = tokenizer.encode_special("<|python_start|>"), tokenizer.encode_special("<|python_end|>")
    counts = {"ends_turn": 0, "python_call": 0, "correct": 0}
    for i in range(num_prompts):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        reply: list[int] = []
        for column, _ in engine.generate(prompt, max_tokens=min(max_tokens, engine.max_len - len(prompt)), temperature=0.0, seed=i):
            reply.append(column[0])
        counts["ends_turn"] += end_id in reply
        if py_start in reply and py_end in reply[reply.index(py_start):]:
            start = reply.index(py_start)
            body = reply[start + 1 : reply.index(py_end, start)]
            counts["python_call"] += well_formed_call(tokenizer.decode(body))
        text = tokenizer.decode([t for t in reply if t != end_id])
        counts["correct"] += bool(task.evaluate(conversation, text))
    return {name: count / num_prompts for name, count in counts.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_args(FormatConfig, argv, prog="python -m bench.chat_format")
    return run_main(run, cfg)


def run(cfg: FormatConfig, ctx: RunContext) -> dict[str, float]:
    model, tokenizer, meta = load_chat_model(cfg, ctx.device, "float32")
    engine = Engine(model, tokenizer)
    rates = measure(engine, tokenizer, cfg.num_prompts, cfg.max_tokens, cfg.seed)
    print(f"{'stage':<6}{'prompts':>8}{'ends turn':>11}{'python call':>13}{'correct':>9}")
    print(f"{cfg.source:<6}{cfg.num_prompts:>8}{rates['ends_turn']:>11.0%}{rates['python_call']:>13.0%}{rates['correct']:>9.0%}")
    log_section(f"Chat format {cfg.source}", {"checkpoint": meta["checkpoint_dir"], "num_prompts": cfg.num_prompts, **rates})
    print(json.dumps({"bench": "chat_format", "source": cfg.source, "checkpoint": meta["checkpoint_dir"],
                      "num_prompts": cfg.num_prompts, **rates}))
    return rates


if __name__ == "__main__":
    main()
