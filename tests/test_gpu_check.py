"""bench/gpu_check.py at tiny sizes on CPU, so that the GPU check cannot rot: every mode runs, the
table and the JSON line agree, the deepest-depth search follows the budget, compiled runs work."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check
from nanochat.common import RunContext

torch.set_num_threads(1)

GPU_CHECK_ARGS = ["--device=cpu", "--dtype=bfloat16", "--depth=1", "--seq_len=32", "--vocab_size=128", "--molegrad_rank_k=8",
                  "--steps=1", "--warmup=1", "--threads=1"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_every_mode_runs_eager_and_the_deepest_depth_follows_the_budget(capsys):
    summary = gpu_check.main(GPU_CHECK_ARGS + ["--compile_backend=", "--gpu_memory=4MiB", "--reserve=0B"])
    out = capsys.readouterr().out
    assert last_json(out)["runs"] == json.loads(json.dumps(summary["runs"]))
    deepest = summary["deepest_lowest_depth"]
    cfg = gpu_check.GpuCheckConfig(depth=1, seq_len=32, vocab_size=128, molegrad_rank_k=8)
    cpu = RunContext(torch.device("cpu"), "cpu", torch.bfloat16, False, 0, 0, 1)
    planned = [gpu_check.planned_peak(gpu_check.mode_config("lowest", depth, cfg), cpu) for depth in (deepest, deepest + 1)]
    assert deepest > 1 and planned[0] <= 4 * 2**20 < planned[1]
    modes = [(run["depth"], run["mode"]) for run in summary["runs"]]
    assert modes == [(1, name) for name in gpu_check.MODES] + [(deepest, "lowest")]
    for run in summary["runs"]:
        assert run["compile"] == "eager" and run["error"] is None and run["measured_bytes"] is None  # no CUDA
        assert run["tok_per_s"] > 0 and run["mfu"] > 0 and run["planned_bytes"] > 0 and run["params"] > 0
        assert f"{run['depth']:>5} {run['mode']:<18}" in out
    lowest, dense = (next(r for r in summary["runs"] if r["mode"] == m and r["depth"] == 1) for m in ("lowest", "dense"))
    assert lowest["planned_bytes"] < dense["planned_bytes"]


def test_compiled_runs_and_the_time_budget(capsys):
    summary = gpu_check.main(GPU_CHECK_ARGS + ["--modes=lowest", "--compile_backend=aot_eager", "--deepest=False"])
    assert [run["compile"] for run in summary["runs"]] == ["eager", "aot_eager"]
    capsys.readouterr()
    summary = gpu_check.main(GPU_CHECK_ARGS + ["--modes=dense", "--compile_backend=", "--deepest=False", "--time_budget_s=0"])
    assert summary["runs"] == [] and summary["skipped"] == ["d1 dense eager: time budget"]
    assert "skipped: d1 dense eager: time budget" in capsys.readouterr().out


def test_bad_mode_fails_in_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--modes=dense,fastest"])
    assert "--modes: unknown mode(s) fastest" in capsys.readouterr().err
