"""bench/recipe.py at tiny sizes: end to end (every arm screened, the combination and the current
recipe at the final budget with each seed), the JSON as documented, the combination chosen on the
selection split, the arms really change what they name, and a rerun resumes."""

from __future__ import annotations

import json

import pytest

from bench import recipe
from nanochat.gpt import GPT
from tests.helpers import TINY_BENCH_ARGS

RECIPE_BENCH_ARGS = TINY_BENCH_ARGS + ["--n_layer=2", "--tokens_per_param=0.1", "--screen_fraction=0.25", "--seeds=2",
                                       "--speed_rounds=1", "--speed_steps=1", "--speed_threads=1"]


# the bench run of every test that takes `result` (marked slow): about a minute on 2 CPU cores
@pytest.fixture(scope="module")
def result(trained_tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "r.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(trained_tiny_base))
        recipe.main(RECIPE_BENCH_ARGS + [f"--out={out}"])
    return out


@pytest.mark.slow
def test_end_to_end_json_has_the_documented_fields(result):
    saved = json.loads(result.read_text())
    for key in ("command", "git_revision", "machine", "software", "load_average_at_start", "config", "block_params",
                "runs", "summary", "goals", "memory"):
        assert key in saved, key
    assert saved["command"].startswith("python -m bench.recipe ")
    summary = saved["summary"]
    assert set(summary["screen"]) == set(recipe.ARMS)
    block = 2 * 12 * 32 ** 2
    assert saved["block_params"] == block and summary["final_tokens"] == round(0.1 * block / 32) * 32
    for arm, entry in summary["screen"].items():
        assert entry["heldout_bpb"] > 0 and entry["tokens_per_s"] > 0, arm
        memory = entry["memory"]
        assert memory["bench_allocated_mb"] > 0 and 0 < memory["d20_lowest_gib"] < memory["d20_dense_gib"] < memory["d26_dense_gib"]
    assert summary["screen"]["current"]["gain_pct"] == 0.0
    assert {e["tokens_per_s_source"] for e in summary["screen"].values()} == {"speed phase"}
    assert set(saved["speed"]) == set(recipe.ARMS) | ({"combination"} if summary["pieces"] else set())
    # value embeddings cost memory at d20 (vocab x kv_dim per carrying layer, plus AdamW moments)
    assert summary["screen"]["value_embeds"]["memory"]["d20_dense_gib"] > summary["screen"]["current"]["memory"]["d20_dense_gib"] + 1
    final = summary["final"]
    assert final["current"]["seeds"] == 2 and final["current"]["tokens"] == summary["final_tokens"]
    if summary["pieces"]:
        assert final["combination"]["seeds"] == 2 and "gain_pct" in final["combination"]
    assert len(saved["goals"]) == 2


@pytest.mark.slow
def test_the_combination_is_chosen_on_the_selection_split(result):
    saved = json.loads(result.read_text())
    screen, cfg = saved["summary"]["screen"], recipe.RecipeConfig(**saved["config"])
    base = screen["current"]["selection_bpb"]
    passing = {arm for arm, e in screen.items()
               if arm != "current" and 100 * (base - e["selection_bpb"]) / base > cfg.min_gain_pct}
    decay = [arm for arm in passing if arm in recipe.WEIGHT_DECAY_ARMS]
    expected = (passing - set(decay)) | ({min(decay, key=lambda a: screen[a]["selection_bpb"])} if decay else set())
    assert set(saved["summary"]["pieces"]) == expected


def test_pieces_are_picked_by_selection_not_held_out_bpb():
    cfg = recipe.RecipeConfig(arms="current,layer_lambdas,smear_gate,weight_decay,cautious_wd", n_embd=32, n_head=2,
                              n_layer=2, seq_len=16, batch_size=2, tokens_per_param=0.4, seeds=1)
    numbers = {"current": (2.0, 2.0), "layer_lambdas": (1.9, 2.5),  # better on selection, worse held out: chosen
               "smear_gate": (2.1, 1.5),  # worse on selection, better held out: not chosen
               "weight_decay": (1.95, 2.0), "cautious_wd": (1.92, 2.0)}  # nested: only the better one
    runs = {s.key: {"selection_bpb": numbers[s.arm][0], "heldout_bpb": numbers[s.arm][1]} for s in recipe.screen_specs(cfg)}
    assert recipe.chosen_pieces(runs, cfg) == ["layer_lambdas", "cautious_wd"]
    assert recipe.chosen_pieces({}, cfg) is None  # nothing decided before the screen is in
    finals = recipe.final_specs(cfg, ["layer_lambdas", "cautious_wd"])
    assert [s.arm for s in finals] == ["current", "combination"]
    assert dict(finals[1].overrides) == {"layer_lambdas": True, "weight_decay": recipe.UPSTREAM_WEIGHT_DECAY,
                                         "cautious_weight_decay": True}
    cfg.also_final = "weight_decay"
    finals = recipe.final_specs(cfg, ["layer_lambdas"])
    assert [(s.arm, dict(s.overrides)) for s in finals][-1] == ("weight_decay", {"weight_decay": recipe.UPSTREAM_WEIGHT_DECAY})
    cfg.also_final = "smear_gate+backout"  # a combination of pieces, beside the chosen one
    finals = recipe.final_specs(cfg, ["layer_lambdas"])
    assert [(s.arm, dict(s.overrides)) for s in finals][-1] == ("smear_gate+backout", {"smear_gate": True, "backout": True})
    for bad in ("current", "smear_gate+current", "smear_gate+nope"):
        with pytest.raises(SystemExit):
            recipe.main([f"--also_final={bad}"])


def test_each_arm_changes_what_it_names():
    cfg = recipe.RecipeConfig(n_embd=32, n_head=2, n_layer=2, seq_len=16, batch_size=2, tokens_per_param=0.4)
    plain = recipe.model_config(cfg, {}, 300)
    assert not any(getattr(plain, p) for p in ("layer_lambdas", "smear_gate", "backout", "value_embeds"))
    for piece in ("layer_lambdas", "smear_gate", "backout", "value_embeds"):
        config = recipe.model_config(cfg, recipe.ARMS[piece], 300)
        assert getattr(config, piece)
        assert sum(p.numel() for p in GPT(config).parameters()) > sum(p.numel() for p in GPT(plain).parameters()), piece
    flags = recipe.train_flags(recipe.ARMS["polar_express"])
    assert flags.optimizer_options()["orthogonalizer"] == "polar_express"
    assert recipe.accumulation(cfg, {}, 300) == 1
    assert recipe.accumulation(cfg, recipe.ARMS["auto_batch"], 300) >= 1


@pytest.mark.slow
def test_a_rerun_resumes_and_other_settings_are_refused(result, trained_tiny_base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(trained_tiny_base))
    before = json.loads(result.read_text())["runs"]
    recipe.main(RECIPE_BENCH_ARGS + [f"--out={result}"])
    assert json.loads(result.read_text())["runs"] == before
    assert f"{len(before)} runs found in {result}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        recipe.main(RECIPE_BENCH_ARGS + ["--n_embd=64", f"--out={result}"])
    assert e.value.code == 1 and "holds results of other settings" in capsys.readouterr().err


def test_bad_arm_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        recipe.main(["--arms=current,muon_plus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown 'muon_plus'" in err and err.count("\n") == 1
