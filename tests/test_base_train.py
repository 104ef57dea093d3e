"""base_train end to end on a tiny model: loss falls, resume is bit-exact, bad input is one line."""

import pytest

from scripts import base_loss, base_train
from tests.helpers import TINY_BASE_TRAIN_ARGS


def test_training_lowers_val_bpb_and_base_loss_reads_it(base_dir):
    out = base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=30", "--eval_every=30", "--model_tag=learn", "--matrix_lr=0.05"])
    first, last = out["history"][0]["val_bpb"], out["history"][-1]["val_bpb"]
    assert last < 0.8 * first, (first, last)
    res = base_loss.main(["--model_tag=learn", "--split_tokens=512", "--device_batch_size=4", "--sample_tokens=4"])
    assert res["val_bpb"] == pytest.approx(last, rel=1e-4)  # same tokens, same model
    assert len(res["samples"]) == 4


def test_the_data_ratio_counts_all_or_the_scaling_parameters(base_dir):
    from nanochat.checkpoint import load_model
    from nanochat.trainer import scaling_params

    ratio, batch = 0.01, 256  # TINY_BASE_TRAIN_ARGS's --total_batch_size
    args = TINY_BASE_TRAIN_ARGS + ["--num_iterations=-1", f"--target_param_data_ratio={ratio}", "--eval_every=-1"]
    plain = base_train.main(args + ["--model_tag=ratio_all"])
    assert plain["num_iterations"] == int(ratio * plain["num_params"]) // batch
    with_ve = base_train.main(args + ["--model_tag=ratio_ve", "--value_embeds=True"])
    assert with_ve["num_iterations"] > plain["num_iterations"]  # "all": the value-embedding tables count
    scaling = base_train.main(args + ["--model_tag=ratio_scaling", "--value_embeds=True", "--ratio_params=scaling"])
    model, _ = load_model("base", "ratio_scaling")
    assert scaling["num_iterations"] == int(ratio * scaling_params(model.config)) // batch < plain["num_iterations"]


def test_resume_is_bit_exact(base_dir):
    run = TINY_BASE_TRAIN_ARGS + ["--num_iterations=6", "--eval_every=-1", "--save_every=3", "--keep_checkpoints=0"]
    full = base_train.main(run + ["--model_tag=full"])
    base_train.main(run + ["--model_tag=resumed"])
    resumed = base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=6", "--eval_every=-1", "--save_every=3",
                                                      "--model_tag=resumed", "--resume_from_step=3"])
    assert resumed["losses"] == full["losses"][3:]  # floats compared exactly


def test_gradient_accumulation_matches_one_big_batch(base_dir):
    run = TINY_BASE_TRAIN_ARGS + ["--num_iterations=3", "--eval_every=-1"]
    big = base_train.main(run + ["--device_batch_size=8", "--model_tag=big"])
    small = base_train.main(run + ["--device_batch_size=2", "--model_tag=small"])
    assert small["losses"] == pytest.approx(big["losses"], rel=1e-5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--total_batch_size=100"], "--total_batch_size: expected a positive multiple of"),
        (["--resume_from_step=7", "--model_tag=nothing", "--num_iterations=8"], "no complete checkpoint at step 7"),
        (["--resume_from_step=10", "--model_tag=tiny"], "--num_iterations=2: the run resumes at step 10"),
        (["--resume_from_step=10", "--model_tag=tiny", "--num_iterations=12", "--depth=2"],
         "--depth: the checkpoint at step 10 in "),
        (["--resume_from_step=10", "--model_tag=tiny", "--num_iterations=12", "--molegrad=True",
          "--molegrad_rank_k=4"], "--molegrad/--molegrad_rank_k/--memory_mode: the checkpoint at step 10"),
        (["--eval_tokens=-1"], "--eval_tokens: expected >= 1, got -1"),
        (["--num_iterations=-5"], "--num_iterations: expected >= 1 (or -1 = from --target_param_data_ratio), got -5"),
        (["--matrix_lr=-0.1"], "--matrix_lr: expected a number >= 0, got -0.1"),
        (["--save_every=-2"], "--save_every: expected a step count >= 1"),
        (["--keep_checkpoints=-1"], "--keep_checkpoints: expected >= 0"),
        (["--divergence_factor=1"], "--divergence_factor: expected a number > 1"),
        (["--depth=1000"], "--depth=1000 (width 64000) with --device_batch_size=4 x 32 tokens: the memory plan of a "
                           "training step needs "),
        (["--molegrad_rank_k=0"], "--molegrad_rank_k=0: expected 1 <= molegrad_rank_k"),
        (["--molegrad_targets=mlp"], "--molegrad_targets: expected one of ffn_only|attn_only|all"),
    ],
)
def test_bad_input_is_one_clear_line(base_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2"] + argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_tokenizer_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tok_train" in err[0], err


def test_corrupt_shard_and_checkpoint_are_one_clear_line(tiny_base, tmp_path, monkeypatch, capsys):
    import shutil

    base = tmp_path / "copy"
    shutil.copytree(tiny_base, base)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2", "--eval_every=-1", "--model_tag=c"])
    (base / "base_checkpoints" / "c" / "model_000002.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=4", "--model_tag=c", "--resume_from_step=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "cannot read checkpoint file" in err[0] and "model_000002.pt" in err[0], err
    (base / "base_data" / "shard_00000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SystemExit) as e:
        base_train.main(TINY_BASE_TRAIN_ARGS + ["--num_iterations=2", "--model_tag=d"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "corrupt parquet shard" in err[0], err
