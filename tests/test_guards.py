"""Training that cannot silently go wrong (issue 18): a resume trains with the LRs it is given,
non-finite numbers and a diverged loss stop the run in one line before anything bad is saved, the
named checkpoint is good, pruning keeps it, a killed save leaves no temp file, and bad files are
one line naming the file."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import complete_steps, load_meta, load_model
from nanochat.trainer import first_non_finite
from scripts import base_train
from tests.helpers import REPO, TINY_BASE_TRAIN_ARGS

RUN = TINY_BASE_TRAIN_ARGS + ["--eval_every=-1", "--warmdown_ratio=0", "--keep_checkpoints=0"]
HUGE_LRS = ["--matrix_lr=1e6", "--embedding_lr=1e6", "--unembedding_lr=1e6"]


def run_fails(argv: list[str], capsys) -> str:
    """base_train's one error line (exit != 0)."""
    with pytest.raises(SystemExit) as e:
        base_train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert "\x1b" not in err[0]
    return err[0]


def copy_run(base: Path, source: str, target: str) -> Path:
    directory = base / "base_checkpoints" / target
    shutil.copytree(base / "base_checkpoints" / source, directory)
    return directory


def weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(directory / f"model_{step:06d}.pt", weights_only=True)


def test_resume_trains_with_the_lrs_of_its_command_line(base_dir, capsys):
    """From the same step-3 state: LR 0 leaves every weight as it was, and half the LRs make an
    update of exactly half the size (AdamW's and Muon's updates are linear in the LR)."""
    full = base_train.main(RUN + ["--num_iterations=4", "--save_every=1", "--model_tag=lr"])
    directory = base_dir / "base_checkpoints" / "lr"
    zero_dir, half_dir = copy_run(base_dir, "lr", "lr_zero"), copy_run(base_dir, "lr", "lr_half")
    zero = base_train.main(RUN + ["--num_iterations=4", "--model_tag=lr_zero", "--resume_from_step=3",
                                  "--matrix_lr=0", "--embedding_lr=0", "--unembedding_lr=0"])
    assert "flags changed since step 3: --embedding_lr 0.2 -> 0.0" in capsys.readouterr().out
    assert zero["losses"] == full["losses"][3:]  # the same weights at step 3 see the same batch
    for name, value in weights(zero_dir, 4).items():
        assert torch.equal(value, weights(directory, 3)[name]), name  # LR 0: nothing moved
    assert load_meta(zero_dir, 4)["flags"]["matrix_lr"] == 0.0  # the metadata records the LR in use

    base_train.main(RUN + ["--num_iterations=4", "--model_tag=lr_half", "--resume_from_step=3",
                           "--matrix_lr=0.01", "--embedding_lr=0.1", "--unembedding_lr=0.002"])
    before, after_full, after_half = weights(directory, 3), weights(directory, 4), weights(half_dir, 4)
    moved = 0
    for name, start in before.items():
        torch.testing.assert_close(after_half[name] - start, 0.5 * (after_full[name] - start), rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(after_full[name], start))
    assert moved >= 3  # embedding, head and the block matrices all moved at the full LR
    assert load_meta(half_dir, 4)["flags"]["embedding_lr"] == 0.1


def test_non_finite_weights_are_never_saved(base_dir, capsys):
    """--embedding_lr=inf: the update of the first step makes the embedding non-finite; before,
    the step-1 checkpoint was saved with it. Now nothing is saved and the line says so."""
    line = run_fails(RUN + ["--num_iterations=4", "--save_every=1", "--model_tag=inf", "--embedding_lr=inf"], capsys)
    assert "transformer.wte.weight became non-finite in the update of step 1" in line, line
    assert "no healthy checkpoint in" in line
    assert complete_steps(base_dir / "base_checkpoints" / "inf") == []


def test_a_nan_run_names_a_good_checkpoint(base_dir, capsys):
    """Two healthy steps, then a resume with --embedding_lr=inf: stopped in the update of step 3,
    naming step 2, whose weights load finite and whose recorded loss a resume reproduces."""
    base_train.main(RUN + ["--num_iterations=2", "--save_every=1", "--model_tag=nan"])
    directory = base_dir / "base_checkpoints" / "nan"
    line = run_fails(RUN + ["--num_iterations=6", "--save_every=1", "--keep_checkpoints=1", "--model_tag=nan",
                            "--resume_from_step=2", "--embedding_lr=inf"], capsys)
    assert "became non-finite in the update of step 3" in line, line
    assert f"the last healthy checkpoint is {directory} step 2 (loss " in line and "--resume_from_step=2" in line
    assert 3 not in complete_steps(directory)
    check_named_checkpoint(directory, 2)


def test_a_diverged_run_stops_and_pruning_keeps_the_last_healthy_checkpoint(base_dir, capsys):
    """Three healthy steps, then every LR at 1e6: the model collapses to a uniform guess, the loss
    sits at ln(vocab); after --divergence_patience=2 steps the run stops naming the last healthy
    checkpoint, which --keep_checkpoints=1 kept although newer, diverged ones were saved."""
    base_train.main(RUN + ["--num_iterations=3", "--save_every=1", "--model_tag=div"])
    directory = base_dir / "base_checkpoints" / "div"
    line = run_fails(RUN + ["--num_iterations=20", "--save_every=1", "--keep_checkpoints=1", "--model_tag=div",
                            "--resume_from_step=3", "--divergence_patience=2", *HUGE_LRS], capsys)
    assert "the loss diverged: 2 steps in a row at ln(vocab) = " in line and "a uniform guess" in line, line
    match = re.search(rf"the last healthy checkpoint is {re.escape(str(directory))} step (\d+) \(loss ", line)
    assert match, line
    named, newest = int(match.group(1)), complete_steps(directory)[-1]
    assert named >= 3 and newest > named and complete_steps(directory) == [named, newest]
    assert load_meta(directory, newest)["healthy"] is False
    check_named_checkpoint(directory, named)


def test_a_loss_far_above_its_best_stops_the_run(base_dir, capsys):
    """Every LR at 1e6 from the start: the loss jumps from ln(vocab) to above 20 and stays there."""
    line = run_fails(RUN + ["--num_iterations=20", "--model_tag=far", "--divergence_patience=2", *HUGE_LRS], capsys)
    assert "the loss diverged: 2 steps in a row above --divergence_factor=3 x its best" in line, line
    assert "no healthy checkpoint in" in line


def check_named_checkpoint(directory: Path, step: int) -> None:
    model, meta = load_model(directory=directory, step=step)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert meta["healthy"] is True and 0 < meta["loss"] < 10
    resumed = base_train.main(RUN + ["--num_iterations=" + str(step + 1), f"--model_tag={directory.name}",
                                     f"--resume_from_step={step}"])
    assert resumed["losses"][0] == meta["loss"]  # the recorded loss is that of these weights, exactly


def test_first_non_finite_names_the_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    assert first_non_finite(model) is None
    with torch.no_grad():
        model[1].running_mean[2] = float("inf")  # a buffer
    assert first_non_finite(model) == "1.running_mean"
    with torch.no_grad():
        model[0].weight[0, 1] = float("nan")
    assert first_non_finite(model) == "0.weight"


def test_guard_defaults_stay_quiet_on_a_healthy_run(base_dir):
    out = base_train.main(RUN + ["--num_iterations=12", "--save_every=4", "--keep_checkpoints=2", "--model_tag=calm"])
    directory = base_dir / "base_checkpoints" / "calm"
    assert len(out["losses"]) == 12 and complete_steps(directory) == [8, 12]
    assert load_meta(directory, 8)["healthy"] is True and load_meta(directory, 8)["loss"] == out["losses"][8]
    assert "healthy" not in load_meta(directory, 12)  # nothing measured its weights yet


# a base_train killed (os._exit) in the middle of writing its KILL_AT_SAVE-th torch.save file
KILLED_MID_SAVE = """
import os, sys, torch
real_save, calls = torch.save, [0]
def save(obj, f):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_SAVE"]):
        f.write(b"half a checkpoint")
        f.flush()
        os._exit(9)
    real_save(obj, f)
torch.save = save
from nanochat.trainer import first_non_finite
from scripts import base_train
base_train.main(sys.argv[1:])
"""


@pytest.mark.multiprocess
def test_a_save_killed_midway_leaves_no_temp_file_after_resume(base_dir, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_SAVE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KILL_AT_SAVE": "3"}  # model_000002.pt
    argv = RUN + ["--num_iterations=3", "--save_every=1", "--model_tag=killed"]
    proc = subprocess.run([sys.executable, str(script), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    directory = base_dir / "base_checkpoints" / "killed"
    assert complete_steps(directory) == [1] and len(list(directory.glob(".model_000002.pt.*.tmp"))) == 1
    base_train.main(argv + ["--resume_from_step=1"])
    assert complete_steps(directory) == [1, 2, 3] and not list(directory.glob("*.tmp")), sorted(os.listdir(directory))


def test_a_non_utf8_meta_file_is_named(base_dir, capsys):
    directory = copy_run(base_dir, "tiny", "latin1")
    (directory / "meta_000010.json").write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
    line = run_fails(RUN + ["--num_iterations=12", "--model_tag=latin1", "--resume_from_step=10"], capsys)
    assert f"corrupt checkpoint metadata {directory / 'meta_000010.json'}: not UTF-8 text" in line, line


class NotATensor:
    pass


@pytest.mark.parametrize("content", ["garbage", "a pickled class", "a dict"])
def test_a_bad_token_bytes_file_is_one_line(tiny_base, tmp_path, monkeypatch, capsys, content):
    base = tmp_path / "copy"
    shutil.copytree(tiny_base, base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    path = base / "tokenizer" / "token_bytes.pt"
    buffer = io.BytesIO()
    if content != "garbage":
        torch.save(NotATensor() if content == "a pickled class" else {"bytes": [1, 2]}, buffer)
    path.write_bytes(buffer.getvalue() or b"\x80\x04garbage")
    line = run_fails(RUN + ["--num_iterations=1", "--model_tag=tb"], capsys)
    assert str(path) in line and "retrain: python -m scripts.tok_train --force" in line, line

