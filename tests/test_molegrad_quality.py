"""bench/molegrad_quality.py at tiny sizes: every arm runs, the JSON holds what its docstring says,
the LR is chosen on the selection split and reported on the held-out one (a disjoint split),
GaLore's projector comes from a non-zero gradient, a rerun resumes instead of retraining (also from
a file written before a config field existed), and the subspace diagnostics (bench/runner.py) are
right on known matrices and present and in range for every MoleGrad arm."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench import molegrad_quality as quality
from bench import runner
from nanochat.common import compute_init
from nanochat.config import UserError
from nanochat.gpt import GPT
from nanochat.molegrad import MoleGradLinear
from nanochat.trainer import train_step
from tests.helpers import TINY_BENCH_ARGS, needs_extra

QUALITY_ARGS = TINY_BENCH_ARGS + ["--tokens_per_param=0.03", "--budget_fractions=0.25,0.5", "--lr_multipliers=0.5,4",
                                  "--energy_probes=1", "--dtype=float32"]
ARMS = "dense_muon,dense_adamw,galore_k2,molegrad_k2,flagship_k2,ffnv_k2,unbiased_k2,gradient_k2"
NEW_ARMS = ("ffnv_k2", "unbiased_k2", "gradient_k2")  # issue 26's
# the layer types each MoleGrad arm compresses (bench/runner.py LAYER_TYPES)
ARM_LAYER_TYPES = {"flagship_k2": {"q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"}, "ffnv_k2": {"v", "mlp_fc", "mlp_proj"},
                   "unbiased_k2": {"q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"},
                   "gradient_k2": {"q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"}}


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
    # the subspace diagnostics: every MoleGrad arm's largest-budget series, and their picture
    for arm in ("flagship_k2", *NEW_ARMS):
        diagnostics = saved["arms"][arm]["diagnostics"]
        assert (diagnostics["steps"], diagnostics["seed"]) == (12, 0)
        check_diagnostics(diagnostics["probes"], ARM_LAYER_TYPES[arm], n_head=2)
    assert saved["arms"]["dense_muon"]["diagnostics"] is None and saved["arms"]["galore_k2"]["diagnostics"] is None
    assert result.with_name(result.stem + "_diagnostics.png").stat().st_size > 0


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


# ---------------------------------------------------------------------------------------------
# subspace diagnostics

def check_diagnostics(probes: list[dict], kinds: set[str], n_head: int) -> None:
    """Every probe logs each compressed layer type once the gradients reach it; every share and
    overlap is in [0, 1] (to rounding), no subspace captures more than the gradient's own top-k,
    and attention c_proj's head shares add up to 1."""
    assert probes and all(probe["delta"] >= 1 for probe in probes[1:])
    assert set(probes[-1]["layers"]) == kinds
    eps = 1e-5
    for probe in probes:
        for kind, m in probe["layers"].items():
            assert kind in kinds
            for metric in ("captured", "captured_principal", "optimal", "topk_overlap", "self_overlap", "q_max_row"):
                assert -eps <= m[metric] <= 1 + eps, (kind, metric, m[metric])
            assert m["captured_principal"] <= m["captured"] + eps and m["captured"] <= m["optimal"] + eps, m
            if kind == "attn_proj":
                assert len(m["head_share"]) == len(m["head_captured"]) == n_head
                assert sum(m["head_share"]) == pytest.approx(1.0, abs=eps)
                assert all(-eps <= c <= 1 + eps for c in m["head_captured"] if c is not None)


def test_layer_diagnostics_on_known_matrices():
    """D = U diag(4, 2, 1, 0.5) Vᵀ on 8 inputs (2 heads of 4 columns each). Q = D's top-2 right singular
    vectors: captured = optimal = 20/21.25, topk_overlap 1; Q in D's null space: all 0; the self
    overlap of Q with its first column alone and another: 1/2."""
    generator = torch.Generator().manual_seed(0)
    u = runner_orthonormal(6, 4, generator)
    v = runner_orthonormal(8, 8, generator)
    grad = u @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ v[:, :4].T   # (6, 8)
    layer = MoleGradLinear(8, 6, rank_k=2).double()
    layer.Q.copy_(v[:, :2])
    earlier = torch.cat([v[:, :1], v[:, 5:6]], dim=1)
    m = runner.layer_diagnostics(grad, layer, earlier, n_head=2)
    assert m["captured"] == pytest.approx(20 / 21.25) and m["optimal"] == pytest.approx(20 / 21.25)
    assert m["topk_overlap"] == pytest.approx(1.0) and m["self_overlap"] == pytest.approx(0.5)
    assert m["q_max_row"] == pytest.approx(float(v[:, :2].square().sum(dim=1).max()))
    heads = grad.view(6, 2, 4).square().sum(dim=(0, 2))
    kept = (grad @ v[:, :2] @ v[:, :2].T).view(6, 2, 4).square().sum(dim=(0, 2))
    assert m["head_share"] == pytest.approx((heads / heads.sum()).tolist())
    assert m["head_captured"] == pytest.approx((kept / heads).tolist())
    layer.Q.copy_(v[:, 4:6])  # D's null space
    m = runner.layer_diagnostics(grad, layer, None, n_head=None)
    assert m["captured"] == pytest.approx(0.0, abs=1e-12) and m["topk_overlap"] == pytest.approx(0.0, abs=1e-12)
    assert m["self_overlap"] is None and "head_share" not in m


def runner_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def synthetic_data(cfg: quality.QualityConfig, steps: int, vocab: int = 64) -> runner.TokenData:
    """Random tokens in the bench's shapes: enough to train a few steps and probe them."""
    generator = torch.Generator().manual_seed(0)

    def rows(count: int) -> torch.Tensor:
        return torch.randint(0, vocab, (count, cfg.batch_size, cfg.seq_len + 1), generator=generator, dtype=torch.int32)

    return runner.TokenData(rows(steps), rows(1), rows(1), torch.randint(1, 4, (vocab,), generator=generator), vocab)


@pytest.mark.parametrize("arm", ["dense_muon", "flagship_k2", *NEW_ARMS])
def test_every_molegrad_arm_logs_sane_diagnostics(arm):
    """A 9-step run of each arm (random tokens, 3 probes, overlap against 2 steps earlier): MoleGrad
    arms log diagnostics at every probe, in range (check_diagnostics); dense arms log none."""
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS + ["--energy_probes=3", "--overlap_delta=2"])
    ctx = compute_init(device="cpu", dtype="float32", threads=1)
    result = quality.train_run(quality.RunSpec(arm, 9, 0.02, 0), synthetic_data(cfg, 9), cfg, ctx)
    assert result["heldout_bpb"] > 0
    if arm == "dense_muon":
        assert "diagnostics" not in result and result["energy"] is None
        return
    assert [probe["step"] for probe in result["diagnostics"]] == [2, 5, 8]
    assert [probe["delta"] for probe in result["diagnostics"]] == [2, 2, 2]
    check_diagnostics(result["diagnostics"], ARM_LAYER_TYPES[arm], cfg.n_head)
    assert 0 < result["energy"] <= 1


def test_new_arms_are_the_flagship_with_one_change():
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS)
    flagship = quality.model_config(cfg, "flagship_k2", vocab_size=64)
    changed = {arm: {name: value for name, value in quality.model_config(cfg, arm, 64).memory_options().items()
                     if value != flagship.memory_options()[name]} for arm in NEW_ARMS}
    assert changed == {"ffnv_k2": {"molegrad_targets": "ffn_v"}, "unbiased_k2": {"molegrad_subspace": "unbiased"},
                       "gradient_k2": {"molegrad_subspace": "gradient"}}
    # the gradient variant's probes are state (out x t per layer) and FLOPs; unbiased tracks fewer columns
    state = {arm: quality.state_bytes(quality.model_config(cfg, arm, 64), "muon", 2) for arm in ("flagship_k2", *NEW_ARMS)}
    assert state["unbiased_k2"] < state["flagship_k2"] < state["gradient_k2"]
    flops = {arm: quality.training_flops_per_token(quality.model_config(cfg, arm, 64)) for arm in ("flagship_k2", *NEW_ARMS)}
    assert flops["unbiased_k2"] < flops["flagship_k2"] < flops["gradient_k2"] and flops["flagship_k2"] < flops["ffnv_k2"]
    with pytest.raises(SystemExit) as e:
        quality.main(["--arms=unbiased_k1"])
    assert e.value.code == 2


def test_results_written_before_a_config_field_existed_still_load(tmp_path):
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS)
    config = dataclasses.asdict(cfg)
    del config["overlap_delta"]  # as the committed results file, written before the diagnostics
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"config": config, "runs": [{"key": "dense_muon|3|0.02|0", "energy": None}]}))
    assert set(runner.load_results(path, cfg, ignored=("arms", "jobs", "out"))) == {"dense_muon|3|0.02|0"}
    other = quality.parse_args(quality.QualityConfig, QUALITY_ARGS + ["--overlap_delta=7"])
    with pytest.raises(UserError, match="holds results of other settings"):
        runner.load_results(path, other, ignored=("arms", "jobs", "out"))


# ---------------------------------------------------------------------------------------------
# issue 25: the precision arms

PRECISION_ARMS = ("standard", "bf16", "int8", "lowbf16_k2")
FP32 = dict(param_dtype="float32", grad_dtype="auto", optim_state="float32")
PRACTITIONER = dict(param_dtype="bfloat16", grad_dtype="auto", optim_state="int8")


def test_precision_arms_are_their_presets():
    """standard = dense Muon's model with block recompute (exact), bf16 weights and 8-bit states; bf16
    and int8 each option alone on dense Muon's model; lowbf16 = lowrank (MoleGrad on the MLP, low-rank
    momentum) with block recompute and standard's precision. 8-bit states shrink the state bytes."""
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS)
    arms = ("dense_muon", "lowrank_k2", *PRECISION_ARMS)
    options = {arm: quality.model_config(cfg, arm, 64).memory_options() for arm in arms}
    assert options["bf16"] == options["int8"] == options["dense_muon"]
    assert options["standard"] == {**options["dense_muon"], "recompute": "block"}
    assert options["lowbf16_k2"] == {**options["lowrank_k2"], "recompute": "block"}
    precision = {arm: quality.arm_flags(arm).precision_options() for arm in arms}
    assert precision == {"dense_muon": FP32, "lowrank_k2": FP32, "standard": PRACTITIONER, "lowbf16_k2": PRACTITIONER,
                         "bf16": {**FP32, "param_dtype": "bfloat16"}, "int8": {**FP32, "optim_state": "int8"}}
    state = {arm: quality.state_bytes(quality.model_config(cfg, arm, 64), "muon", 0, precision[arm]["optim_state"])
             for arm in ("dense_muon", "standard", "int8")}
    assert state["standard"] == state["int8"] < state["dense_muon"]
    with pytest.raises(SystemExit) as e:
        quality.main(["--arms=standard_k2"])
    assert e.value.code == 2


@pytest.mark.parametrize("arm", PRECISION_ARMS)
def test_every_precision_arm_trains_with_its_precision(arm):
    """A 6-step run of each precision arm on random tokens ends within 1% of dense Muon's held-out bpb
    (same seed and LR); its optimizers keep the weights in bf16 and the states in 8 bits where the arm
    says so; the MoleGrad arm logs its energy and diagnostics. Width 64, so that the attention matrices
    have the 4096 values an 8-bit state needs (precision.MIN_QUANTIZED_NUMEL)."""
    needs_extra("torchao", "lowmem")
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS + ["--energy_probes=2", "--n_embd=64"])
    ctx = compute_init(device="cpu", dtype="float32", threads=1)
    data = synthetic_data(cfg, 6)
    dense, run = (quality.train_run(quality.RunSpec(name, 6, 0.02, 0), data, cfg, ctx) for name in ("dense_muon", arm))
    assert run["heldout_bpb"] == pytest.approx(dense["heldout_bpb"], rel=0.01)
    assert ("diagnostics" in run) == (run["energy"] is not None) == arm.startswith("lowbf16")
    torch.manual_seed(0)
    model = GPT(quality.model_config(cfg, arm, data.vocab_size))
    optimizers = quality.make_optimizers(model, arm, 0.02, 6, cfg, seed=0)
    train_step(model, optimizers, iter(data.batches(data.train[:1])), 1, ctx, 1.0, None, 0.0)
    precision = quality.arm_flags(arm).precision_options()
    assert {p.dtype for p in model.parameters()} == {getattr(torch, precision["param_dtype"])}
    codes = [v for opt in optimizers for state in opt.state.values() for v in state.values()
             if torch.is_tensor(v) and v.dtype == torch.uint8]
    assert bool(codes) == (precision["optim_state"] == "int8")


def test_precision_goals_read_the_gaps():
    """standard within +1% of dense Muon, lowbf16 within +2%, and neither gap growing with tokens."""
    cfg = quality.parse_args(quality.QualityConfig, QUALITY_ARGS + ["--arms=dense_muon,standard,lowbf16_k2"])
    small, middle, largest = (str(s) for s in quality.budgets(cfg))
    arms = {"standard": {"budgets": {middle: {"gap_pct": 0.5}, largest: {"gap_pct": 0.8}}},
            "lowbf16_k2": {"budgets": {middle: {"gap_pct": 2.5}, largest: {"gap_pct": 1.5}}}}
    assert quality.goals(arms, cfg) == {
        "standard within +1% of dense Muon at the largest budget": True,
        "standard's gap not growing from the middle to the largest budget": False,
        "lowbf16_k2 within +2% of dense Muon at the largest budget": True,
        "lowbf16_k2's gap not growing from the middle to the largest budget": True}
