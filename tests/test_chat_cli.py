"""chat_cli on a tiny trained model: one-shot -p, the interactive loop, Ctrl-C, bad checkpoints."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import chat_cli
from tests.test_chat_web import train_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["-i", "base", "-c", "tiny", "--max_tokens=12", "--threads=1"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cli_base")
    train_tiny_chat_model(base)
    return base


@pytest.fixture
def base_dir(tiny_base, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    return tiny_base


def test_one_shot_prompt_prints_a_reply_and_exits_0(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    result = subprocess.run([sys.executable, "-m", "scripts.chat_cli", *TINY, "-p", "hello", "-t", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stdout.strip() == chat_cli.main(TINY + ["-p", "hello", "-t", "0"]).strip()  # greedy: the same reply


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
    assert chat_cli.main(TINY) == ""
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
    assert chat_cli.main(TINY) == ""
    out = capsys.readouterr().out
    assert "[stopped]" in out and out.count("Assistant: ") == 2  # the loop went on after the interrupt


def test_missing_checkpoint_is_one_clear_line(base_dir, capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-i", "sft", "-p", "hi"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no sft checkpoints" in err[0], err
