"""bench/gpu_check.py at tiny sizes on CPU, so that the GPU check cannot rot: every row runs and the
summary is written (file and last stdout line); a failing, slow or interrupted row costs only that
row; the autocast audit finds planted violations; the budget is the hand computation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import gpu_check
from nanochat.common import RunContext
from nanochat.memory import GiB, MiB
from tests.helpers import REPO

torch.set_num_threads(1)

GPU_CHECK_ARGS = ["--device=cpu", "--dtype=bfloat16", "--depth=1", "--seq_len=32", "--vocab_size=128", "--molegrad_rank_k=8",
                  "--steps=1", "--warmup=1", "--threads=1"]
FAST = ["--pipeline=False", "--compile_backend="]
CPU_BF16 = RunContext(torch.device("cpu"), "cpu", torch.bfloat16, False, 0, 0, 1)
PEAK = 1e9  # the MFU denominator, patched: the CPU's measured bf16 matmul takes seconds where bf16 is emulated


@pytest.fixture
def known_peak(monkeypatch):
    monkeypatch.setattr(gpu_check, "peak_flops", lambda ctx: PEAK)


def run_check(tmp_path, capsys, *argv: str) -> tuple[dict, dict, str]:
    """main's summary, the summary file, and stdout."""
    out = tmp_path / "check.json"
    summary = gpu_check.main(GPU_CHECK_ARGS + [f"--out={out}", *argv])
    stdout = capsys.readouterr().out
    return summary, json.loads(out.read_text()), stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def by_name(summary: dict) -> dict[str, dict]:
    return {row["row"]: row for row in summary["rows"]}


def test_memory_budget_is_free_less_context_less_the_reserve():
    # 80 GiB card: the reserve is 5% (4 GiB); 16 GiB card: 2 GiB (5% would be 0.8 GiB); 40 GiB: both 2 GiB
    assert gpu_check.memory_budget(79 * GiB, GiB // 2, 80 * GiB)["budget_bytes"] == 79 * GiB - GiB // 2 - 4 * GiB
    small = gpu_check.memory_budget(15 * GiB, 400 * MiB, 16 * GiB)
    assert (small["reserve_bytes"], small["budget_bytes"]) == (2 * GiB, 13 * GiB - 400 * MiB)
    assert gpu_check.memory_budget(40 * GiB, 0, 40 * GiB)["reserve_bytes"] == 2 * GiB
    assert gpu_check.percent_error(105, 100) == pytest.approx(5.0) and gpu_check.percent_error(90, 100) == pytest.approx(-10.0)
    assert gpu_check.percent_error(90, None) is None


def test_tiny_check_runs_every_row_and_writes_the_summary(tmp_path, capsys, known_peak):
    # a "card" of 2 GiB + 8 MiB free: the 2 GiB reserve leaves 8 MiB, which some lowest depths fit
    summary, saved, stdout = run_check(tmp_path, capsys, *FAST, "--gpu_memory=2056MiB")
    assert last_json(stdout) == saved == json.loads(json.dumps(summary))
    assert summary["complete"] and summary["ok"] and summary["errors"] == 0 and summary["violations"] == 0
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu"

    rows = by_name(summary)
    env = rows["env"]
    assert env["budget"] == {"free_bytes": 2056 * MiB, "context_bytes": 0, "reserve_bytes": 2 * GiB,
                             "total_bytes": 2056 * MiB, "budget_bytes": 8 * MiB}
    assert set(env["sdpa"]) == {"bfloat16_default", "bfloat16_training", "float32_default", "float32_training"}
    assert all(choice in SDPBackend.__members__ for choice in env["sdpa"].values())

    assert list(rows) == (["env"] + [f"audit {m}" for m in gpu_check.MODES] + [f"train d1 {m} eager" for m in gpu_check.MODES]
                          + ["train deepest lowest eager"])
    cfg = gpu_check.GpuCheckConfig(depth=1, seq_len=32, vocab_size=128, molegrad_rank_k=8)
    deepest = rows["train deepest lowest eager"]
    depth = deepest["depth"]
    planned = [gpu_check.planned_peak("lowest", d, cfg, CPU_BF16) for d in (depth, depth + 1)]
    assert depth > 1 and deepest["mode"] == "lowest" and planned[0] == deepest["planned_bytes"] <= 8 * MiB < planned[1]

    for name in gpu_check.MODES:
        audit = rows[f"audit {name}"]
        assert audit["error"] is None and audit["violations"] == 0, audit
        assert audit["fp32_hidden"] == [] and audit["math_attention"] == []
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in audit["attention_kernels"]
    for row in [rows[f"train d1 {m} eager"] for m in gpu_check.MODES] + [deepest]:
        assert row["error"] is None and row["compile"] == "eager" and row["tokens_per_step"] == 2 * 32  # --grad_accum=2
        assert row["params"] > 0 and row["tok_per_s"] > 0 and row["reserved_bytes"] is None  # no allocator cache on CPU
        # the plan against the allocated peak of a real step: within the tiny models' fixed overheads
        assert row["allocated_bytes"] > 0 and abs(row["allocated_error_pct"]) < 50, row
        assert row["allocated_error_pct"] == pytest.approx(100 * (row["planned_bytes"] / row["allocated_bytes"] - 1))
        flops = gpu_check.GPT(gpu_check.mode_config(row["mode"], row["depth"], cfg)).estimate_flops()
        assert row["mfu"] == pytest.approx(100 * row["tok_per_s"] * flops / PEAK)
        assert gpu_check.format_row(row) in stdout
    assert rows["train d1 lowest eager"]["planned_bytes"] < rows["train d1 dense eager"]["planned_bytes"]
    # the precision options reach the plan: standard is recompute_block's model with bf16 weights and 8-bit states
    standard, block = rows["train d1 standard eager"], rows["train d1 recompute_block eager"]
    assert gpu_check.mode_config("standard", 1, cfg) == gpu_check.mode_config("recompute_block", 1, cfg)
    assert standard["planned_bytes"] == gpu_check.plan_memory(gpu_check.mode_config("standard", 1, cfg), 1, "bfloat16", 2, "cpu",
                                                              param_dtype="bfloat16", optim_state="int8").peak
    assert standard["planned_bytes"] != block["planned_bytes"]


def slow_or_failing_train_step(monkeypatch, fail_when, exception: BaseException) -> None:
    """gpu_check's train_step raises `exception` for a model that fail_when(model) picks."""
    real = gpu_check.train_step

    def train_step(model, *args, **kwargs):
        if fail_when(model):
            raise exception
        return real(model, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "train_step", train_step)


def test_a_failing_row_is_recorded_and_the_other_rows_run(tmp_path, capsys, monkeypatch, known_peak):
    # the error a pre-Ampere GPU raises in training attention, planted in the lowest row; and a
    # compile backend that does not exist, a real failure of the compiled row
    sdpa_error = RuntimeError("attention: no flash/memory-efficient SDPA kernel for q (1, 1, 32, 64) torch.bfloat16")
    slow_or_failing_train_step(monkeypatch, lambda model: model.config.recompute == "block", sdpa_error)
    summary, saved, stdout = run_check(tmp_path, capsys, "--modes=dense,lowest", "--audit=False", "--pipeline=False",
                                       "--compile_backend=no_such_backend", "--compile_modes=dense,lowest")
    assert last_json(stdout) == saved and saved["complete"] and not saved["ok"] and saved["errors"] == 3
    rows = by_name(saved)
    assert list(rows) == ["env", "train d1 dense eager", "train d1 lowest eager", "train d1 dense no_such_backend",
                          "train d1 lowest no_such_backend"]
    assert rows["env"]["error"] is None and rows["train d1 dense eager"]["error"] is None
    assert rows["train d1 dense eager"]["tok_per_s"] > 0
    assert rows["train d1 lowest eager"]["error"] == "RuntimeError: " + str(sdpa_error)
    for mode in ("dense", "lowest"):
        error = rows[f"train d1 {mode} no_such_backend"]["error"]
        assert error.startswith("InvalidBackend: ") and "no_such_backend" in error and len(error) <= 220
    assert f"ERROR RuntimeError: {sdpa_error}" in stdout


def test_a_row_over_its_time_limit_is_stopped_and_the_budget_skips_the_rest(tmp_path, capsys, monkeypatch, known_peak):
    slow_or_failing_train_step(monkeypatch, lambda model: time.sleep(5) or False, RuntimeError("unreachable"))
    start = time.perf_counter()
    _, saved, _ = run_check(tmp_path, capsys, "--modes=dense,low", *FAST, "--audit=False", "--row_timeout_s=0.3")
    assert time.perf_counter() - start < 4  # the two 5 s sleeps were cut short
    rows = by_name(saved)
    assert [rows[f"train d1 {m} eager"]["error"] for m in ("dense", "low")] == ["RowTimeout: over the row's 0.3 s limit"] * 2

    _, saved, stdout = run_check(tmp_path, capsys, "--modes=dense,low", *FAST, "--time_budget_s=0")
    rows = by_name(saved)
    assert rows["env"]["error"] is None  # the environment row always runs
    skipped = [row for row in saved["rows"] if row["row"] != "env"]
    assert [row["row"] for row in skipped] == ["audit dense", "audit low", "train d1 dense eager", "train d1 low eager"]
    assert all(row["skipped"].startswith("time budget: ") and row["error"] is None for row in skipped)
    assert "skipped: time budget" in stdout and saved["complete"]


def test_time_limit_gives_back_an_outer_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *args: fired.append(True))
    pytest_timeout = signal.setitimer(signal.ITIMER_REAL, 30)  # pytest-timeout's, if armed
    try:
        with pytest.raises(gpu_check.RowTimeout), gpu_check.time_limit(0.05):
            time.sleep(2)
        assert 25 < signal.getitimer(signal.ITIMER_REAL)[0] <= 30  # re-armed with what it had left
        os.kill(os.getpid(), signal.SIGALRM)
        assert fired == [True]  # and its handler is back
    finally:
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *pytest_timeout)


def test_an_interrupted_check_still_writes_its_summary(tmp_path, capsys, monkeypatch, known_peak):
    slow_or_failing_train_step(monkeypatch, lambda model: model.config.molegrad_rank_k > 0, KeyboardInterrupt())
    out = tmp_path / "check.json"
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(GPU_CHECK_ARGS + FAST + ["--modes=dense,low", "--audit=False", f"--out={out}"])
    assert exit_info.value.code == 130
    saved = json.loads(out.read_text())
    assert last_json(capsys.readouterr().out) == saved
    assert not saved["complete"] and not saved["ok"] and saved["interrupted"] == "interrupted during train d1 low eager"
    assert [row["row"] for row in saved["rows"]] == ["env", "train d1 dense eager"]
    assert saved["rows"][1]["error"] is None and saved["rows"][1]["tok_per_s"] > 0


class PlantedMLP(nn.Module):
    """relu²(x W1ᵀ) W2ᵀ whose hidden activation is made fp32 under autocast (upcast=True), as CUDA's
    autocast did to an out-of-place square."""

    def __init__(self, d: int, upcast: bool) -> None:
        super().__init__()
        self.fc, self.proj, self.upcast = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False), upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (N, 4d) bf16 under autocast
        h = h.float() if self.upcast else h
        r = F.relu(h)
        return self.proj(r * r).float().square().mean()


def attention_loss(q: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, q, q, is_causal=True).float().square().mean()


def test_the_audit_finds_an_fp32_hidden_activation_and_the_math_attention_kernel():
    torch.manual_seed(0)
    x = torch.randn(24, 16)  # N = 24 tokens, d = 16
    planted = gpu_check.autocast_audit(lambda: PlantedMLP(16, upcast=True)(x), 24, 16, CPU_BF16)
    # the upcast, and all that follows it in fp32 (relu, its square, their backward)
    assert "aten::_to_copy (24, 64)" in planted["fp32_hidden"] and all(f.endswith(" (24, 64)") for f in planted["fp32_hidden"])
    assert planted["violations"] == len(planted["fp32_hidden"]) > 1 and planted["math_attention"] == []
    clean = gpu_check.autocast_audit(lambda: PlantedMLP(16, upcast=False)(x), 24, 16, CPU_BF16)
    assert clean["fp32_hidden"] == [] and clean["violations"] == 0

    q = torch.randn(1, 2, 24, 8, requires_grad=True)
    with sdpa_kernel([SDPBackend.MATH]):
        math = gpu_check.autocast_audit(lambda: attention_loss(q), 24, 16, CPU_BF16)
    assert math["math_attention"] == ["aten::_safe_softmax"] and math["violations"] == 1
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = gpu_check.autocast_audit(lambda: attention_loss(q), 24, 16, CPU_BF16)
    assert flash["math_attention"] == [] and flash["violations"] == 0
    assert flash["attention_kernels"] == ["aten::_scaled_dot_product_flash_attention_for_cpu",
                                          "aten::_scaled_dot_product_flash_attention_for_cpu_backward"]

    with pytest.raises(ValueError, match="tokens=16: expected a count other than n_embd"):
        gpu_check.autocast_audit(lambda: PlantedMLP(16, upcast=False)(x[:16]), 16, 16, CPU_BF16)


def test_bad_mode_fails_in_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--modes=dense,fastest"])
    assert "--modes: unknown mode(s) fastest" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_pipeline_and_compiled_rows_run_as_the_command_line_runs_them(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", *GPU_CHECK_ARGS, "--modes=low", "--compile_modes=low",
                           "--compile_backend=aot_eager", f"--out={out}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    saved = json.loads(out.read_text())
    assert proc.returncode == 0, [(row["row"], row.get("error")) for row in saved["rows"]]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == saved and saved["ok"]
    rows = by_name(saved)
    assert list(rows) == ["env", "audit low", "train d1 low eager", "pipeline data", "pipeline base_train",
                          "pipeline base_train resume", "pipeline chat_sft", "pipeline chat_rl", "pipeline chat_eval",
                          "pipeline chat_cli", "train d1 low aot_eager"]
    assert all(row["error"] is None and not row.get("skipped") for row in saved["rows"])
    assert "--resume_from_step=2" in rows["pipeline base_train resume"]["command"]
    assert "--memory_mode=low" in rows["pipeline chat_sft"]["command"] and "--device=cpu" in rows["pipeline chat_cli"]["command"]
    assert rows["train d1 low aot_eager"]["tok_per_s"] > 0
