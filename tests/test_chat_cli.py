"""chat_cli on a tiny trained model (conftest's tiny_base): one-shot -p, the interactive loop, Ctrl-C,
bad checkpoints and devices."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import chat_cli

REPO = Path(__file__).resolve().parents[1]
CHAT_CLI_ARGS = ["-i", "base", "-c", "tiny", "--max_tokens=12", "--threads=1"]


@pytest.mark.multiprocess
def test_one_shot_prompt_prints_a_reply_and_exits_0(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    # (the tiny model's greedy reply to "hello" is empty; to this prompt it is not)
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", *CHAT_CLI_ARGS, "-p", "the gradient", "-t", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stdout.strip() == chat_cli.main(CHAT_CLI_ARGS + ["-p", "the gradient", "-t", "0"]).strip()  # greedy: the same reply


def scripted_input(monkeypatch, answers: list) -> None:
    """input() returns the answers in turn; an exception class in the list is raised instead."""
    queue = list(answers)

    def fake_input(prompt: str = "") -> str:
        answer = queue.pop(0)
        if isinstance(answer, type) and issubclass(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(builtins, "input", fake_input)


@pytest.mark.parametrize("ending", ["quit", "exit", EOFError, KeyboardInterrupt])
def test_interactive_loop_clears_and_ends_cleanly(base_dir, monkeypatch, capsys, ending):
    scripted_input(monkeypatch, ["hello", "", "clear", "again", ending])
    assert chat_cli.main(CHAT_CLI_ARGS) == ""
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2
    assert "(new conversation)" in out


def test_ctrl_c_stops_the_reply_not_the_program(base_dir, monkeypatch, capsys):
    calls = {"n": 0}
    original = chat_cli.StreamDecoder.push

    def interrupted_push(self, token: int) -> str:  # Ctrl-C arrives during the third token
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, token)

    monkeypatch.setattr(chat_cli.StreamDecoder, "push", interrupted_push)
    scripted_input(monkeypatch, ["hello", "and then?", "quit"])
    assert chat_cli.main(CHAT_CLI_ARGS) == ""
    out = capsys.readouterr().out
    assert "[stopped]" in out and out.count("Assistant: ") == 2  # the loop went on after the interrupt


def test_missing_checkpoint_is_one_clear_line(base_dir, capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-i", "sft", "-p", "hi"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sft checkpoints" in err[0], err


@pytest.mark.parametrize("device,message", [
    ("tpu", "--device: expected one of cuda|mps|cpu"),
    ("cuda", "is a CPU-only build: install the CUDA build"),
])
def test_bad_device_is_one_line_before_any_model_loads(base_dir, capsys, monkeypatch, device, message):
    if device == "cuda":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr(chat_cli, "load_chat_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        chat_cli.main([*CHAT_CLI_ARGS, f"--device={device}", "-p", "hi"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
