"""The memory planner with the recipe pieces on (value embeddings above all): components against
hand arithmetic and the real model, the activation formulas against saved-tensor hooks, and the
command line (--value_embeds=True, the sweep's price table). The peak against a measured step:
tests/test_memory.py::test_predicted_peak_within_five_percent_of_allocated_peak (its `pieces`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanochat import memory
from nanochat.gpt import GPT, RECIPE_PIECES, GPTConfig
from nanochat.memory import (
    plan_memory,
    read_model,
    recipe_saved_bytes,
    value_embed_saved_bytes_per_token,
    value_embed_saved_weight_bytes,
)
from nanochat.memory_measure import measure_block_saved_bytes, saved_bytes
from nanochat.optim import setup_optimizers
from nanochat.molegrad import molegrad_layers
from tests.helpers import PLANNER_MODES, TINY_GPT_CONFIG, assert_gradients_and_optimizer_state, tensor_bytes

torch.set_num_threads(1)

THREE_BLOCK_CONFIG = {**TINY_GPT_CONFIG, "n_layer": 3}  # blocks 0 and 2 carry value embeddings
ALL_PIECES = {name: True for name in RECIPE_PIECES}
MODES = {name: PLANNER_MODES[name] for name in ("dense", "recompute=mlp", "recompute=block", "ffn_only", "all", "keep_h", "lowest")}


def test_value_embedding_components_match_hand_arithmetic_and_the_real_model():
    """d=32, V=97, 3 blocks (0 and 2 carry), 2 heads of 16, 1 kv head (kv_dim 16), MoleGrad ffn_only
    k=4 low-rank, batch 3, bf16, every recipe piece on."""
    base = GPTConfig(**THREE_BLOCK_CONFIG, molegrad_rank_k=4, molegrad_targets="ffn_only", molegrad_momentum="lowrank")
    config = replace(base, **ALL_PIECES)
    assert read_model(config).value_embeds == 2 and read_model(replace(config, n_layer=4)).value_embeds == 2
    c0 = plan_memory(base, 3, "bfloat16", grad_accum_steps=2, device_type="cpu").components
    c = plan_memory(config, 3, "bfloat16", grad_accum_steps=2, device_type="cpu").components
    tables, gates = 2 * 97 * 16, 2 * 1 * 12  # value embeddings vocab x kv_dim, gates (n_kv_head, 12) per carrying block
    scalars = [3, 3, 24, 1, 1]  # resid and x0 lambdas (n_layer each), smear gate (1 x 24) and lambda, backout lambda
    assert c["params"] - c0["params"] == 4 * (tables + gates + sum(scalars))
    assert c["gradients"] - c0["gradients"] == 4 * (tables + gates + sum(scalars))
    assert c["AdamW moments"] - c0["AdamW moments"] == 4 * 2 * (tables + sum(scalars)) + 4 * (2 + len(scalars))
    assert c["Muon momentum"] - c0["Muon momentum"] == 4 * gates
    # per carrying block and token: the fp32 row (16) and two gates (1 kv head, bf16); the gate's bf16 weight
    assert value_embed_saved_bytes_per_token(config, 2) == 4 * 16 + 2 * 2 * 1
    assert value_embed_saved_weight_bytes(config, 2) == 2 * 12
    assert c["activations: blocks"] - c0["activations: blocks"] == 2 * (48 * 68 + 24)

    # the same sizes, read off a real model after a backward and an optimizer step
    torch.manual_seed(0)
    model = GPT(config)
    optimizers = setup_optimizers(model)
    assert tensor_bytes(model.parameters()) == c["params"] == 4 * read_model(config).params == 4 * model.num_params()
    assert_gradients_and_optimizer_state(model, optimizers, molegrad_layers(model), c)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_value_embedding_saved_bytes_match_hooks_at_two_widths(mode, dtype):
    """A carrying block (lookup included) saves exactly the block formula plus the value-embedding
    formula, per token and whatever the length, at two widths, with and without grouped-query attention."""
    item = memory.ITEMSIZE[dtype]
    for width, heads, kv_heads in ((64, 2, 2), (128, 4, 2)):
        plain = GPTConfig(sequence_len=96, vocab_size=97, n_layer=1, n_head=heads, n_kv_head=kv_heads, n_embd=width,
                          **MODES[mode])
        config = replace(plain, value_embeds=True)
        per_token, fixed, _ = measure_block_saved_bytes(config, dtype)
        assert per_token == memory.block_saved_bytes_per_token(config, item) + value_embed_saved_bytes_per_token(config, item)
        assert fixed == memory.block_saved_weight_bytes(config, item) + value_embed_saved_weight_bytes(config, item)
        assert value_embed_saved_bytes_per_token(config, item) >= 4 * kv_heads * (width // heads)  # the fp32 row
        assert measure_block_saved_bytes(plain, dtype).per_token < per_token


PIECE_SETS = {
    "value_embeds": dict(value_embeds=True),
    "layer_lambdas": dict(layer_lambdas=True),
    "smear_gate": dict(smear_gate=True),
    "backout": dict(backout=True),
    "smear+lambdas": dict(smear_gate=True, layer_lambdas=True),
    "all": ALL_PIECES,
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["dense", "recompute=mlp", "recompute=block", "ffn_only", "keep_h", "lowest"])
@pytest.mark.parametrize("pieces", list(PIECE_SETS))
def test_whole_model_saved_bytes_with_recipe_pieces_equal_planned_activations(pieces, mode, dtype):
    """Everything a training forward saves, at 2 and 3 blocks (backout's x_mid is the last block's
    output, or the next block's input) and batch 1 and 3 (the smear gate's input slice is a view, or a copy)."""
    for n_layer in (2, 3):
        for batch in (1, 3):
            config = GPTConfig(**{**TINY_GPT_CONFIG, "n_layer": n_layer}, **MODES[mode], **PIECE_SETS[pieces])
            torch.manual_seed(0)
            model = GPT(config)
            tokens = torch.randint(0, 97, (batch, 17))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                saved, _ = saved_bytes(lambda: model(tokens[:, :-1], tokens[:, 1:]),
                                       [*model.parameters(), *model.buffers(), tokens])
            c = plan_memory(config, batch, dtype).components
            planned = sum(c[name] for name in ("activations: blocks", "activations: recipe pieces",
                                               "activations: embedding", "activations: LM head"))
            assert saved == planned, (n_layer, batch, saved, planned)
            if pieces == "value_embeds":  # all inside the blocks
                assert c["activations: recipe pieces"] == 0 == recipe_saved_bytes(config, batch, memory.ITEMSIZE[dtype])


def test_value_embeds_flag_reaches_the_plan_and_the_sweep_shows_its_price(capsys):
    common = ["--max_seq_len=8192", "--device_batch_size=1", "--vocab_size=65536", "--molegrad_rank_k=32", "--gpu_memory=32GB"]
    flags = replace(memory.PlanFlags(), value_embeds=True, depth=20)
    assert flags.model_config().value_embeds and replace(flags, memory_mode="lowest").model_config().value_embeds
    assert not memory.PlanFlags().model_config().value_embeds
    plain = memory.main(["--depth=20", *common])
    with_ve = memory.main(["--depth=20", "--value_embeds=True", *common])
    out = capsys.readouterr().out
    assert "recipe pieces value_embeds" in out and "value embeddings 10 x 65536x1280" in out
    # 10 carrying blocks x 65536 x 1280: weights, gradients and two moments (16 bytes an entry) and more
    assert with_ve["peak_bytes"] - plain["peak_bytes"] > 16 * 10 * 65536 * 1280
    assert with_ve["components"]["AdamW moments"] - plain["components"]["AdamW moments"] == 8 * 10 * 65536 * 1280 + 4 * 10

    result = memory.main(["--sweep_depths=True", "--value_embeds=True", *common])
    out = capsys.readouterr().out
    deepest, without = result["deepest"], result["deepest_without_pieces"]
    assert list(deepest) == list(without) == list(memory.DEFAULT_SWEEP_ARMS)
    assert all(0 < deepest[arm] < without[arm] for arm in deepest)
    assert without == memory.main(["--sweep_depths=True", *common])["deepest"]
    price = result["price_bytes"]
    assert price["dense"][20] > 16 * 10 * 65536 * 1280 and price["lowest"][26] > 16 * 13 * 65536 * 1664
    assert "what value_embeds add to the peak" in out and "without value_embeds: dense depth" in out
    assert "recipe pieces value_embeds" in out
