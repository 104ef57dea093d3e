"""torchrun --nnodes=2 on one machine (two "nodes" of one gloo process each, rendezvous on
127.0.0.1) trains bit for bit as one node with two processes: the two nodes resume the one-node
run at its step 2 and end with its step-4 model, optimizer shards and loader positions, and the
same logged losses (the data is dealt by global rank, the collectives span the nodes).

Each node has its own NANOCHAT_BASE_DIR (a copy of the step-2 checkpoint in each), so that what
each one writes can be told apart: node 1 (LOCAL_RANK 0, RANK 1) writes only its rank's
optimizer/loader state, never the model or the meta file (writes go by global rank, not per
node), and it logs nothing. On real machines the checkpoint directory must be shared."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, TINY_BASE_TRAIN_ARGS, same_tensors

pytestmark = pytest.mark.multiprocess

ARGS = TINY_BASE_TRAIN_ARGS + ["--total_batch_size=256", "--eval_every=-1", "--num_iterations=4", "--save_every=2", "--keep_checkpoints=0"]
FILES = ("model_000004.pt", "state_000004_rank0.pt", "state_000004_rank1.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(base: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(base)}


def one_node(base: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "scripts.base_train", *args], cwd=REPO, env=environment(base),
                          capture_output=True, text=True, timeout=180)


def two_nodes(bases: tuple[Path, Path], args: list[str]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of node 0 and node 1, started together."""
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "scripts.base_train", *args], cwd=REPO, env=environment(base),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, base in enumerate(bases)]
    results = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=180)
        finally:
            node.kill()
        results.append((node.returncode, out, err))
    return results


def loss_lines(stdout: str) -> list[str]:
    return [line.split("|")[1].strip() for line in stdout.splitlines() if line.startswith("step ") and "| loss " in line]


def load(directory: Path, name: str):
    return torch.load(directory / name, weights_only=True)


def test_two_nodes_resume_and_train_as_one_node_with_two_ranks(tiny_base, tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(tiny_base, node0)
    reference = one_node(node0, ARGS + ["--model_tag=one"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    one = node0 / "base_checkpoints" / "one"
    uninterrupted = [load(one, name) for name in FILES]
    shutil.copytree(node0, node1)
    two = [base / "base_checkpoints" / "two" for base in (node0, node1)]
    for directory in two:
        directory.mkdir()
        for path in one.glob("*_000002*"):
            shutil.copy(path, directory / path.name)

    (code0, out0, err0), (code1, out1, err1) = two_nodes((node0, node1), ARGS + ["--model_tag=two", "--resume_from_step=2"])
    assert code0 == 0 and code1 == 0, (err0[-3000:], err1[-3000:])
    assert "4 x 32 x 2 ranks x 1 accum" in out0 and loss_lines(out0) == loss_lines(reference.stdout)[2:]
    assert "step 0" not in out1  # only global rank 0 logs
    written_by_node1 = {p.name for p in two[1].iterdir()} - {p.name for p in one.glob("*_000002*")}
    assert written_by_node1 == {"state_000004_rank1.pt"}
    assert not (two[0] / "state_000004_rank1.pt").exists()
    resumed = [load(two[0], FILES[0]), load(two[0], FILES[1]), load(two[1], FILES[2])]
    assert same_tensors(resumed[0], uninterrupted[0])  # the model, bit for bit
    for before, after in zip(uninterrupted[1:], resumed[1:]):
        assert same_tensors(after["optimizers"], before["optimizers"]) and after["loader"] == before["loader"]
