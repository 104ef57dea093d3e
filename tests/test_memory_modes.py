"""bench/memory_modes.py at tiny sizes: every eager arm runs, its table and JSON agree."""

from bench import memory_modes


def test_memory_modes_bench_runs_every_eager_arm(capsys):
    arms = "dense,recompute_block,molegrad_ffn,keep_h,lowest"
    summary = memory_modes.main([f"--arms={arms}", "--depth=1", "--vocab_size=64", "--max_seq_len=16",
                                 "--device_batch_size=2", "--molegrad_rank_k=4", "--rounds=2", "--warmup=1", "--threads=1",
                                 "--dtype=float32"])
    assert list(summary["results"]) == arms.split(",")
    for name, result in summary["results"].items():
        assert len(result["times"]) == 2 and result["tok_per_s"] > 0
        assert abs(result["vs_dense"] * summary["results"]["dense"]["tok_per_s"] - result["tok_per_s"]) < 1e-6 * result["tok_per_s"]
    assert summary["goals"]["compiled lowest >= eager lowest"] is None  # its arm was not run
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"bench": "memory_modes"')
