"""Chat with a trained model in the terminal, streaming the reply token by token.

    python -m scripts.chat_cli                      # newest sft checkpoint, interactive
    python -m scripts.chat_cli -i mid -c d6 -t 0.8  # mid checkpoint d6, temperature 0.8
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one reply, then exit

Interactive: `clear` starts a new conversation, `quit` / `exit` / Ctrl-D ends. Ctrl-C during a
reply stops the reply (what was printed stays in the conversation); Ctrl-C at the prompt exits.
Tool calls print as their special tokens: <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from nanochat.checkpoint import load_chat_model
from nanochat.common import RunContext, print0, run_main
from nanochat.config import CheckpointFlags, RuntimeFlags, check, parse_args
from nanochat.engine import NO_COMPILE, Engine
from nanochat.tokenizer import StreamDecoder, chat_prompt


@dataclass
class ChatCliConfig(RuntimeFlags, CheckpointFlags):
    """Chat with a checkpoint in the terminal."""

    compile_refused: ClassVar[str] = NO_COMPILE

    prompt: str = field(default="", metadata={"short": "-p", "help": "answer this one message and exit"})
    temperature: float = field(default=0.6, metadata={"short": "-t", "help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=50, metadata={"short": "-k", "help": "sample from the k most likely tokens (0 = all)"})
    max_tokens: int = field(default=512, metadata={"help": "longest reply in tokens"})
    seed: int = field(default=-1, metadata={"help": "sampling seed of the first reply, +1 per reply (-1 = random)"})

    def validate(self) -> None:
        super().validate()
        check(self.temperature >= 0, f"--temperature: expected >= 0, got {self.temperature}")
        check(self.top_k >= 0, f"--top_k: expected >= 0 (0 = off), got {self.top_k}")
        check(self.max_tokens >= 1, f"--max_tokens: expected >= 1, got {self.max_tokens}")


def stream_reply(engine: Engine, messages: list[dict[str, Any]], cfg: ChatCliConfig, seed: int,
                 write: Callable[[str], None]) -> str:
    """Generate the assistant's reply to `messages`, writing it piece by piece; return its text.
    KeyboardInterrupt stops the reply and returns what was written so far."""
    tokens = chat_prompt(engine.tokenizer, messages)
    max_tokens = min(cfg.max_tokens, engine.max_len - len(tokens))
    if max_tokens < 1:
        raise ValueError(f"the conversation ({len(tokens)} tokens) fills the model's {engine.max_len} positions: type `clear`")
    decoder = StreamDecoder(engine.tokenizer)
    pieces: list[str] = []
    generation = engine.generate(tokens, max_tokens=max_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None, seed=seed)
    try:
        for column, _ in generation:
            if column[0] in engine.stop_ids:
                break
            pieces.append(decoder.push(column[0]))
            write(pieces[-1])
        pieces.append(decoder.flush())
        write(pieces[-1])
    except KeyboardInterrupt:
        write(" [stopped]")
    finally:
        generation.close()
    return "".join(pieces)


def main(argv: list[str] | None = None) -> str:
    """Returns the reply with -p (for tests), else "" after the interactive session."""
    cfg = parse_args(ChatCliConfig, argv, prog="python -m scripts.chat_cli")
    return run_main(chat, cfg)


def chat(cfg: ChatCliConfig, ctx: RunContext) -> str:
    model, tokenizer, meta = load_chat_model(cfg, ctx.device, cfg.dtype)
    engine = Engine(model, tokenizer)
    seed = cfg.seed if cfg.seed >= 0 else random.randrange(2**31)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if cfg.prompt:
        reply = stream_reply(engine, [{"role": "user", "content": cfg.prompt}], cfg, seed, write)
        write("\n")
        return reply

    print0(f"chatting with {meta['checkpoint_dir']} step {meta['step']} ({cfg.source}); "
           "`clear` = new conversation, `quit` / Ctrl-D = exit, Ctrl-C stops a reply")
    messages: list[dict[str, Any]] = []
    while True:
        try:
            user = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return ""
        if user in ("quit", "exit"):
            return ""
        if user == "clear":
            messages = []
            print0("(new conversation)")
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        write("\nAssistant: ")
        try:
            reply = stream_reply(engine, messages, cfg, seed, write)
        except ValueError as e:
            messages.pop()
            print0(f"\nerror: {e}")
            continue
        messages.append({"role": "assistant", "content": reply})
        seed += 1
        write("\n")


if __name__ == "__main__":
    main()
