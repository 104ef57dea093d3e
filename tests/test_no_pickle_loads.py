"""No pickle runs on any load path: a planted pickle in the tokenizer, a checkpoint's model or
state file, or the token bytes is refused with one `error:` line by the entry points that read it,
and its code never runs."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from scripts import base_train, chat_cli

MARKER = "pickle_ran"


class Payload:
    def __reduce__(self):
        return (os.mkdir, (MARKER,))


def plant(path, as_torch: bool) -> None:
    if as_torch:
        torch.save({"weight": Payload()}, path)
    else:
        path.write_bytes(pickle.dumps(Payload()))


def base_train_run(*extra: str) -> None:
    base_train.main(["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256", "--sample_every=-1",
                     "--threads=1", "--dtype=float32", "--eval_every=-1", *extra])


@pytest.mark.parametrize("where", ["tokenizer", "model", "state", "token_bytes"])
def test_a_planted_pickle_is_refused_in_one_line_and_never_runs(base_dir, tmp_path, monkeypatch, capsys, where):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.chdir(tmp_path)
    ckpt = base / "base_checkpoints" / "tiny"
    step = int(sorted(ckpt.glob("meta_*.json"))[-1].stem.split("_")[1])
    chat = ["-i", "base", "-c", "tiny", "-p", "hi", "--max_tokens=2", "--threads=1"]
    if where == "tokenizer":  # only an old-format (pickle) tokenizer is there
        for p in (base / "tokenizer").iterdir():
            if p.name.startswith("tokenizer."):
                p.unlink()
        plant(base / "tokenizer" / "tokenizer.pkl", as_torch=False)
        run = lambda: chat_cli.main(chat)  # noqa: E731
    elif where == "model":
        plant(ckpt / f"model_{step:06d}.pt", as_torch=True)
        run = lambda: chat_cli.main(chat)  # noqa: E731
    elif where == "state":
        plant(ckpt / f"state_{step:06d}_rank0.pt", as_torch=True)
        run = lambda: base_train_run("--model_tag=tiny", f"--num_iterations={step + 1}", f"--resume_from_step={step}")  # noqa: E731
    else:
        plant(base / "tokenizer" / "token_bytes.pt", as_torch=True)
        run = lambda: base_train_run("--model_tag=fresh", "--num_iterations=1")  # noqa: E731
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / MARKER).exists()
