"""Several processes (gloo on CPU): two ranks equal one with the same global batch, MoleGrad sends
only its small factors and statistics with Q bitwise equal on every rank, the optimizer state is
sharded, base_train under torchrun resumes exactly and refuses another world size in one line,
and a dead or stuck rank ends the run with a clear error instead of a hang.

The equality tests run bench.ddp's harness (two spawned gloo processes against this one) on a tiny
float64 model with Newton–Schulz in float64, so "equal" means equal to rounding; the end-to-end
tests run torchrun as a subprocess on conftest's tiny corpus."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from bench.ddp import BenchConfig, run_all, summarize
from nanochat.distributed import TIMEOUT_ENV, timeout_seconds
from nanochat.optim import assign_owners
from scripts import base_train
from tests.helpers import REPO, TINY_BASE_TRAIN_ARGS, same_tensors

ARMS = ("dense", "molegrad", "molegrad_lowrank")
TINY_MODEL = BenchConfig(n_embd=32, n_layer=2, n_head=4, n_kv_head=2, vocab_size=97, seq_len=16, batch_size=4,
                         steps=3, molegrad_rank_k=4, molegrad_targets="all", dtype="float64", arms=",".join(ARMS))


@pytest.fixture(scope="module")
def two_vs_one():
    """Every arm trained 3 steps in this process and in two gloo processes: paid once per module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TIMEOUT_ENV, "60")
        torch.set_num_threads(1)
        return run_all(TINY_MODEL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("arm", ARMS)
def test_two_processes_equal_one_and_ranks_agree_bitwise(two_vs_one, arm):
    single, (rank0, rank1) = two_vs_one[arm]["single"], two_vs_one[arm]["ranks"]
    assert rank0["losses"] == pytest.approx(single["losses"], rel=1e-12)
    for name, value in single["model"].items():
        torch.testing.assert_close(rank0["model"][name], value, rtol=1e-10, atol=1e-12, msg=name)
        assert torch.equal(rank0["model"][name], rank1["model"][name]), name  # Q, sketch, weights: every bit
    if arm != "dense":
        assert any(name.endswith(".Q") for name in single["model"])


@pytest.mark.multiprocess
def test_molegrad_sends_only_factors_and_statistics(two_vs_one):
    """No (out, in) tensor of a MoleGrad layer crosses; its bytes are those of (out, k) + (in, k+e)."""
    result = two_vs_one["molegrad"]["ranks"][0]
    weights = [tuple(shape) for shape in result["molegrad_weights"]]  # (out, in) per MoleGrad layer
    assert weights and not set(weights) & {tuple(shape) for shape in result["shapes"]}
    k, explore, itemsize = TINY_MODEL.molegrad_rank_k, 4, 8  # float64; w = 2: an all-reduce sends n bytes per rank
    factors = sum(out * k * itemsize for out, _ in weights)
    sketches = sum(inp * (k + explore) * itemsize for _, inp in weights)
    energy_and_tokens = 2 * 8 * len(weights)
    row = summarize("molegrad", two_vs_one["molegrad"])
    assert row["bytes_by_tag"]["molegrad factor"] == factors
    assert row["bytes_by_tag"]["molegrad statistics"] == sketches + energy_and_tokens
    dense = summarize("dense", two_vs_one["dense"])  # the same model, dense: (out, in) reduced + broadcast
    dense_weights = sum(out * inp * itemsize for out, inp in weights)
    assert dense["bytes_per_step"] - row["bytes_per_step"] == dense_weights - factors - sketches - energy_and_tokens


@pytest.mark.multiprocess
def test_optimizer_state_is_sharded(two_vs_one):
    """Dense: AdamW and Muon state split between the ranks. MoleGrad: Muon state replicated."""
    for arm, replicated_muon in (("dense", False), ("molegrad", True)):
        single, ranks = two_vs_one[arm]["single"], two_vs_one[arm]["ranks"]
        adamw, muon = zip(*(r["optimizer_state_entries"] for r in ranks))
        assert sum(adamw) == single["optimizer_state_entries"][0] and all(n > 0 for n in adamw)
        if replicated_muon:
            assert muon == (single["optimizer_state_entries"][1],) * 2
        else:
            assert sum(muon) == single["optimizer_state_entries"][1] and all(n > 0 for n in muon)


def test_owners_are_balanced_and_deterministic():
    params = [torch.empty(n) for n in (4, 16, 16, 4, 8, 8)]
    assert assign_owners(params, 2) == [0, 0, 1, 1, 0, 1]  # 16, 16, 8, 8, 4, 4 dealt in turn
    assert assign_owners(params, 1) == [0] * 6


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert timeout_seconds() == 2.5
    monkeypatch.delenv(TIMEOUT_ENV)
    assert timeout_seconds() == 300
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}='soon': expected a number of seconds > 0"):
        timeout_seconds()


def test_a_bad_timeout_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setenv(TIMEOUT_ENV, "-1")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and err == [f"error: {TIMEOUT_ENV}='-1': expected a number of seconds > 0"], err


# ---------------------------------------------------------------------------------------------
# end to end under torchrun

# base_train, with rank 1 dying (os._exit) or getting stuck at its Nth train_step: a test-only hook
FAULTY_BASE_TRAIN = """
import os, sys, time
from scripts import base_train
how, at = os.environ["TEST_FAULT"].split("@")
real_train_step, calls = base_train.train_step, [0]
def train_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(at) and os.environ["RANK"] == "1":
        if how == "die":
            os._exit(3)
        time.sleep(600)
    return real_train_step(*args, **kwargs)
base_train.train_step = train_step
base_train.main(sys.argv[1:])
"""


def torchrun(args: list[str], timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


TORCHRUN_TINY = TINY_BASE_TRAIN_ARGS + ["--total_batch_size=256", "--eval_every=-1", "--num_iterations=4",
                                       "--save_every=2", "--keep_checkpoints=0", "--model_tag=ddp"]
MOLEGRAD = ["--molegrad=True", "--molegrad_rank_k=8", "--molegrad_momentum=lowrank"]


@pytest.mark.multiprocess
def test_torchrun_base_train_resumes_exactly_and_refuses_another_world_size(base_dir, capsys):
    """Two ranks x 4 rows x 32 tokens = 256 tokens/step, no accumulation; save at 2 and 4. MoleGrad
    on the MLP, so that Q, its statistics and the low-rank momentum resume too."""
    proc, _ = torchrun(["-m", "scripts.base_train", *TORCHRUN_TINY, *MOLEGRAD])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 x 32 x 2 ranks x 1 accum" in proc.stdout and proc.stdout.count("step 00004/4") == 1  # rank 0 logs
    assert "MoleGrad: rank 8 on 2 Linears" in proc.stdout
    directory = base_dir / "base_checkpoints" / "ddp"
    load = lambda name: torch.load(directory / name, weights_only=True)  # noqa: E731
    uninterrupted = [load(name) for name in ("model_000004.pt", "state_000004_rank0.pt", "state_000004_rank1.pt")]
    proc, _ = torchrun(["-m", "scripts.base_train", *TORCHRUN_TINY, *MOLEGRAD, "--resume_from_step=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [load(name) for name in ("model_000004.pt", "state_000004_rank0.pt", "state_000004_rank1.pt")]
    assert same_tensors(resumed[0], uninterrupted[0])  # the model, bit for bit
    for before, after in zip(uninterrupted[1:], resumed[1:]):
        assert same_tensors(after["optimizers"], before["optimizers"]) and after["loader"] == before["loader"]
    # each rank's optimizer file holds the state of the parameters it owns, not all of them
    adamw_entries = [len(state["optimizers"][0]["state"]) for state in resumed[1:]]
    assert adamw_entries == [1, 1]

    with pytest.raises(SystemExit) as e:
        base_train.main(TORCHRUN_TINY + MOLEGRAD + ["--resume_from_step=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert "saved with world size 2, this run has world size 1" in err[0], err


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault", ["die@2", "stall@2"])
def test_a_dead_or_stuck_rank_ends_the_run_with_a_clear_error(base_dir, tmp_path, fault):
    """die: rank 1 exits; torchrun stops rank 0. stall: rank 1 hangs; rank 0's collective times out
    after NANOCHAT_DIST_TIMEOUT seconds, it says so in one line and exits, and torchrun stops rank 1."""
    script = tmp_path / "faulty_base_train.py"
    script.write_text(FAULTY_BASE_TRAIN)
    proc, seconds = torchrun([str(script), *TORCHRUN_TINY, "--num_iterations=6"], timeout=90,
                             TEST_FAULT=fault, **{TIMEOUT_ENV: "3"})
    assert proc.returncode != 0 and seconds < 60, (proc.returncode, seconds)
    output = proc.stdout + proc.stderr
    assert "step 00001/6" in output and "step 00002/6" not in output
    if fault == "die@2":
        assert "exitcode  : 3" in output, output[-3000:]  # torchrun's report names the dead rank's exit
    else:
        lines = [line for line in output.splitlines() if "lost contact with the process group" in line]
        assert len(lines) == 1 and lines[0].startswith("error: rank 0 lost contact with the process group (a peer died?)"), output[-3000:]
        assert "timeout 3 s" in lines[0]
