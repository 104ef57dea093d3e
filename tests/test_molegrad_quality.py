"""bench/molegrad_quality.py at tiny sizes: every arm runs, the JSON holds what its docstring says,
the LR is chosen on the selection split and reported on the held-out one (a disjoint split),
GaLore's projector comes from a non-zero gradient, and a rerun resumes instead of retraining."""

from __future__ import annotations

import json

import pytest
import torch

from bench import molegrad_quality as quality
from bench import runner
from nanochat.common import compute_init
from nanochat.gpt import GPT
from nanochat.trainer import train_step
from tests.helpers import TINY_BENCH_ARGS, needs_extra

QUALITY_ARGS = TINY_BENCH_ARGS + ["--tokens_per_param=0.03", "--budget_fractions=0.25,0.5", "--lr_multipliers=0.5,4",
                                  "--energy_probes=1", "--dtype=float32"]
ARMS = "dense_muon,dense_adamw,galore_k2,molegrad_k2,flagship_k2"


# the bench run of every test that takes `result` (marked slow): about a minute on 2 CPU cores
@pytest.fixture(scope="module")
def result(trained_tiny_base, tmp_path_factory):
    needs_extra("galore_torch", "bench")  # the galore arm
    needs_extra("matplotlib", "plot")  # the picture
    out = tmp_path_factory.mktemp("quality") / "q.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(trained_tiny_base))
        quality.main(QUALITY_ARGS + [f"--arms={ARMS}", f"--out={out}"])
    return out


@pytest.mark.slow
def test_every_arm_runs_and_the_json_has_the_documented_fields(result):
    saved = json.loads(result.read_text())
    for key in ("command", "git_revision", "git_diff_stat", "machine", "software", "load_average_at_start", "config",
                "budgets_steps", "block_params", "runs", "arms", "goals"):
        assert key in saved, key
    assert saved["command"].startswith("python -m bench.molegrad_quality ")
    assert saved["budgets_steps"] == [3, 6, 12]
    assert set(saved["arms"]) == set(ARMS.split(","))
    for arm, entry in saved["arms"].items():
        assert entry["lr"] is not None, arm
        assert sorted(entry["budgets"], key=int) == ["3", "6", "12"], arm
        assert len(entry["budgets"]["12"]["seeds"]) == 2, arm  # --seeds=2 at the largest budget
        for point in entry["budgets"].values():
            assert point["heldout_bpb"] > 0 and point["gap_pct"] is not None
        assert entry["flops_per_token"] > 0 and entry["state_bytes"] > 0
    assert saved["arms"]["dense_muon"]["budgets"]["12"]["gap_pct"] == 0.0
    assert saved["arms"]["flagship_k2"]["energy"] is not None and saved["arms"]["dense_muon"]["energy"] is None
    # the compressed arms need fewer FLOPs per token; low-rank momentum the least state
    flops = {arm: e["flops_per_token"] for arm, e in saved["arms"].items()}
    assert flops["flagship_k2"] < flops["molegrad_k2"] < flops["dense_muon"]
    state = {arm: e["state_bytes"] for arm, e in saved["arms"].items()}
    assert state["flagship_k2"] < state["dense_muon"] < state["dense_adamw"]
    assert (result.with_suffix(".png")).stat().st_size > 0


@pytest.mark.slow
def test_the_lr_is_chosen_on_the_selection_split_and_reported_on_the_held_out_one(result):
    saved = json.loads(result.read_text())
    runs = {r["key"]: r for r in saved["runs"]}
    for arm, entry in saved["arms"].items():
        sweep = entry["lr_sweep"]
        best_on_selection = min(sweep, key=lambda lr: sweep[lr]["selection_bpb"])
        assert float(best_on_selection) == pytest.approx(entry["lr"])
        # a best LR at an edge of the grid gets the grid extended past it (up to MAX_EDGE_EXTENSIONS)
        assert not entry["lr_at_edge_of_sweep"] or len(sweep) == 2 + quality.MAX_EDGE_EXTENSIONS, (arm, sweep)
        smallest = runs[quality.RunSpec(arm, 3, entry["lr"], 0).key]
        assert entry["budgets"]["3"]["heldout_bpb"] == smallest["heldout_bpb"] != smallest["selection_bpb"]


def test_held_out_and_selection_splits_are_disjoint(trained_tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained_tiny_base))
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS + ["--eval_tokens=256"])
    data = runner.prepare_data(cfg, tmp_path / "cache.pt", quality.budgets(cfg)[-1])
    selection = {tuple(row.tolist()) for batch in data.selection for row in batch}
    heldout = {tuple(row.tolist()) for batch in data.heldout for row in batch}
    assert selection and heldout and not selection & heldout
    train = {tuple(row.tolist()) for batch in data.train for row in batch}
    assert not train & (selection | heldout)  # val shard vs train shards


def test_galore_builds_its_projector_from_the_first_non_zero_gradient():
    needs_extra("galore_torch", "bench")
    torch.manual_seed(0)
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS)
    config = quality.model_config(cfg, "galore_k2", vocab_size=64)
    model = GPT(config)
    optimizers = quality.make_optimizers(model, "galore_k2", 0.01, steps=8, cfg=cfg)
    galore = optimizers[1]
    ctx = compute_init(device="cpu", dtype="float32", threads=1)
    batch = (torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    c_fc, c_proj = model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_proj.weight
    seen: dict[int, torch.Tensor] = {}
    original_step = type(galore).step

    def recording_step(self, closure=None):
        for p in (c_fc, c_proj):
            if p.grad is not None and p not in self.state:
                seen[id(p)] = p.grad.detach().clone()
        return original_step(self, closure)

    galore.step = recording_step.__get__(galore)
    train_step(model, optimizers, iter([batch]), 1, ctx, 1.0, None, 0.0)
    assert c_proj in galore.state and c_fc not in galore.state  # c_fc's first gradient is exactly 0: skipped
    train_step(model, optimizers, iter([batch]), 1, ctx, 1.0, None, 0.0)
    assert c_fc in galore.state
    first = seen[id(c_fc)]
    assert first.abs().sum() > 0
    # its projector spans the top-2 singular directions of that first non-zero gradient
    ortho = galore.state[c_fc]["projector"].ortho_matrix.float()
    u = torch.linalg.svd(first.float(), full_matrices=False)[0][:, :2] if first.shape[0] < first.shape[1] else \
        torch.linalg.svd(first.float(), full_matrices=False)[2][:2].t()
    basis = ortho.t() if ortho.shape[0] == 2 else ortho
    assert torch.linalg.matrix_norm(basis @ basis.t() @ u - u) < 1e-3


@pytest.mark.slow
def test_a_rerun_resumes_from_the_results_file(result, trained_tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained_tiny_base))
    before = json.loads(result.read_text())["runs"]
    quality.main(QUALITY_ARGS + [f"--arms={ARMS}", f"--out={result}"])
    assert json.loads(result.read_text())["runs"] == before
    assert f"{len(before)} runs found in {result}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        quality.main(QUALITY_ARGS + ["--n_embd=64", f"--out={result}"])
    assert e.value.code == 1 and "holds results of other settings" in capsys.readouterr().err


def test_bad_arm_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--arms=dense_muon,lora_k4"])
    assert e.value.code == 2 and "unknown arm 'lora_k4'" in capsys.readouterr().err
