"""bench/memory_modes.py at tiny sizes: every eager arm runs, its table and JSON agree, and each arm
with precision options is compared with its fp32 twin."""

from bench import memory_modes
from nanochat.model_flags import MEMORY_MODES


def test_memory_modes_bench_runs_every_eager_arm(capsys):
    arms = "dense,bf16_weights,int8_states,recompute_block,standard,molegrad_ffn,low,low_bf16,keep_h,lowest"
    summary = memory_modes.main([f"--arms={arms}", "--depth=1", "--vocab_size=64", "--max_seq_len=16",
                                 "--device_batch_size=2", "--molegrad_rank_k=4", "--rounds=2", "--warmup=1", "--threads=1",
                                 "--dtype=float32"])
    results = summary["results"]
    assert list(results) == arms.split(",")
    for name, result in results.items():
        assert len(result["times"]) == 2 and result["tok_per_s"] > 0
        assert abs(result["vs_dense"] * results["dense"]["tok_per_s"] - result["tok_per_s"]) < 1e-6 * result["tok_per_s"]
    twins = {"bf16_weights": "dense", "int8_states": "dense", "standard": "recompute_block", "low_bf16": "low"}
    assert {name for name, result in results.items() if "vs_fp32_twin" in result} == set(twins)
    for name, twin in twins.items():
        assert results[name]["vs_fp32_twin"] == results[name]["tok_per_s"] / results[twin]["tok_per_s"]
        goal = f"{name} >= 0.9x the tokens/s of {twin} (its fp32 twin)"
        assert summary["goals"][goal] == (results[name]["vs_fp32_twin"] >= 0.9)
    assert summary["goals"]["compiled lowest >= eager lowest"] is None  # its arm was not run
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"bench": "memory_modes"')


def test_the_default_arms_are_the_modes_a_user_picks():
    defaults = memory_modes.MemoryModesConfig().arms.split(",")
    assert {"dense", "recompute_block", "low", "lowest", "keep_h", "standard", "low_bf16"} <= set(defaults)
    assert set(defaults) <= set(memory_modes.ARMS) and "low" in MEMORY_MODES
