"""The model: shapes, causality, GQA, KV-cache decode, the chunked loss, recompute memory, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import KVCache
from nanochat.sampling import sample_next_token
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.memory_measure import measure_block_saved_bytes, saved_bytes
from nanochat.ops import chunked_softcap_cross_entropy, norm, relu_squared_linear
from nanochat.optim import setup_optimizers
from tests.helpers import VOCAB, random_tokens, tiny_config, tiny_model

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# configuration

@pytest.mark.parametrize("depth, n_embd, n_head", [(1, 64, 1), (2, 128, 2), (3, 192, 3), (4, 256, 2), (6, 384, 3), (20, 1280, 10)])
def test_config_from_depth_sizes_width_and_heads(depth, n_embd, n_head):
    cfg = config_from_depth(depth, vocab_size=VOCAB, sequence_len=64)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (depth, n_embd, n_head, n_head)
    assert cfg.head_dim in (64, 128)


def test_config_from_depth_forwards_options():
    cfg = config_from_depth(4, VOCAB, 64, n_kv_head=1, recompute="mlp", molegrad_rank_k=8)
    assert (cfg.n_kv_head, cfg.recompute, cfg.molegrad_rank_k) == (1, "mlp", 8)


@pytest.mark.parametrize("overrides, field", [
    (dict(n_embd=30), "n_embd"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_kv_head=8), "n_kv_head"),
    (dict(n_head=2, n_kv_head=1, n_embd=6), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(softcap=0.0), "softcap"),
    (dict(recompute="all"), "recompute"),
    (dict(molegrad_targets="mlp"), "molegrad_targets"),
    (dict(molegrad_rank_k=-1), "molegrad_rank_k"),
    (dict(molegrad_power_iters=-2), "molegrad_power_iters"),
    (dict(molegrad_warm_start_decay=1.0), "molegrad_warm_start_decay"),
])
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_depth_raises():
    with pytest.raises(ValueError, match="depth"):
        config_from_depth(0, VOCAB, 64)


# ---------------------------------------------------------------------------------------------
# forward

def test_causality():
    model = tiny_model()
    idx = random_tokens(2, 16)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, VOCAB)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-12)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-6


def test_logits_are_softcapped_float32_under_autocast():
    model = tiny_model(torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(random_tokens(1, 8))
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_multi_head_with_shared_kv_weights(n_kv_head):
    """GQA with n_kv_head groups == plain MHA whose k/v heads repeat each group's weights."""
    gqa = tiny_model(n_kv_head=n_kv_head)
    mha = tiny_model(n_kv_head=4)
    state = gqa.state_dict()
    group, head_dim, width = 4 // n_kv_head, gqa.config.head_dim, gqa.config.n_embd
    for i in range(gqa.config.n_layer):
        for name in ("c_k", "c_v"):
            key = f"transformer.h.{i}.attn.{name}.weight"
            assert state[key].shape == (n_kv_head * head_dim, width)
            state[key] = state[key].view(n_kv_head, head_dim, width).repeat_interleave(group, dim=0).reshape(4 * head_dim, width)
    mha.load_state_dict(state)
    idx = random_tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# KV cache

def new_cache(model: GPT, batch: int, length: int = 32) -> KVCache:
    cfg = model.config
    return KVCache(batch, cfg.n_kv_head, length, cfg.head_dim, cfg.n_layer)


def test_kv_cache_decode_equals_full_forward():
    model = tiny_model().eval()
    idx = random_tokens(2, 20)
    with torch.no_grad():
        full = model(idx)  # (2, 20, vocab)
        cache = new_cache(model, 2)
        torch.testing.assert_close(model(idx[:, :6], kv_cache=cache), full[:, :6], rtol=0, atol=1e-10)  # prefill
        for t in range(6, 12):  # one token at a time
            step = model(idx[:, t:t + 1], kv_cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, t], rtol=0, atol=1e-10)
        chunk = model(idx[:, 12:20], kv_cache=cache)  # several new tokens after a prefix: causal w.r.t. positions
        torch.testing.assert_close(chunk, full[:, 12:20], rtol=0, atol=1e-10)
    assert cache.get_pos() == 20


def test_kv_cache_prefill_shares_a_prompt_across_the_batch():
    model = tiny_model().eval()
    prompt, continuation = random_tokens(1, 7), random_tokens(3, 3, seed=5)
    with torch.no_grad():
        single = new_cache(model, 1)
        model(prompt, kv_cache=single)
        batched = new_cache(model, 3)
        batched.prefill(single)
        assert batched.get_pos() == 7
        got = model(continuation, kv_cache=batched)
        full = model(torch.cat((prompt.expand(3, -1), continuation), dim=1))
    torch.testing.assert_close(got, full[:, 7:], rtol=0, atol=1e-10)


def test_kv_cache_rejects_overflow_and_bad_shapes():
    model = tiny_model().eval()
    cache = new_cache(model, 1, length=8)
    with torch.no_grad():
        model(random_tokens(1, 6), kv_cache=cache)
        with pytest.raises(ValueError, match="seq_len=8"):
            model(random_tokens(1, 3), kv_cache=cache)
    cache.reset()
    assert cache.get_pos() == 0
    with pytest.raises(ValueError, match="batch must be 1 or 1"):
        cache.prefill(new_cache(model, 2))


# ---------------------------------------------------------------------------------------------
# loss

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_equals_plain_loss_and_gradients(reduction):
    """Chunks of 7 rows (not dividing N = 40), ignored targets, float64: loss and every gradient."""
    model = tiny_model()
    model.loss_chunk_rows = 7
    idx, targets = random_tokens(2, 20), random_tokens(2, 20, seed=2)
    targets[0, :3] = -1
    targets[1, 10] = -1
    weights = torch.randn(2, 20, dtype=torch.float64) if reduction == "none" else 1.0

    loss = model(idx, targets, loss_reduction=reduction)
    (loss * weights).sum().backward()
    chunked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)  # (2, 20, vocab), the plain path
    plain = F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction=reduction)
    plain = plain.view(2, 20) if reduction == "none" else plain
    (plain * weights).sum().backward()

    assert loss.shape == plain.shape and loss.dtype == torch.float64
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_chunked_loss_keeps_no_vocab_sized_tensor():
    """Bytes kept for backward grow by d values per token, not by vocab values."""
    vocab, width = 500, 16
    weight = torch.randn(vocab, width, requires_grad=True)

    def loss_saved_bytes(tokens: int) -> int:
        hidden = torch.randn(tokens, width, requires_grad=True)
        targets = torch.randint(0, vocab, (tokens,))
        return saved_bytes(lambda: chunked_softcap_cross_entropy(hidden, weight, targets, 15.0, chunk_rows=16),
                           exclude=[weight, hidden, targets])[0]

    per_token = (loss_saved_bytes(96) - loss_saved_bytes(32)) / 64
    assert per_token <= width * 4


def test_loss_on_bf16_autocast_is_close_to_float32():
    model = tiny_model(torch.float32)
    idx, targets = random_tokens(2, 16), random_tokens(2, 16, seed=3)
    with torch.no_grad():
        ref = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(idx, targets)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.02 * ref.item()


# ---------------------------------------------------------------------------------------------
# memory: the custom autograd Functions and recompute

def test_custom_functions_gradcheck():
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_squared_linear, (h, w))
    assert torch.autograd.gradcheck(lambda x: norm(x), (h,))
    torch.testing.assert_close(relu_squared_linear(h, w), F.linear(F.relu(h).square(), w))
    torch.testing.assert_close(norm(h), F.rms_norm(h, (8,), eps=torch.finfo(h.dtype).eps))


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_bytes_per_recompute_mode(autocast):
    """Saved bytes per token of one block (slope between two lengths, so constants cancel)."""
    d = 64
    none, mlp, block = (measure_block_saved_bytes(GPTConfig(sequence_len=128, vocab_size=VOCAB, n_layer=1, n_head=2,
                                                            n_kv_head=2, n_embd=d, recompute=mode),
                                                  "bfloat16" if autocast else "float32").per_token
                        for mode in ("none", "mlp", "block"))
    assert block < mlp < none
    itemsize = 2 if autocast else 4
    assert block == 4 * d  # only the block's input, the fp32 residual stream
    # the MLP's normed x (d), h (4d) and norm statistic (4 bytes) -> its fp32 input (d)
    assert mlp == none - 5 * d * itemsize - 4 + 4 * d
    # no recompute: attention normed x, q, k, v, out (5d) + MLP normed x, h (5d), in the compute dtype,
    # plus per-row norm statistics and SDPA's logsumexp (eager autograd with F.rms_norm keeps ~14d)
    assert none <= 10.5 * d * itemsize


def test_recompute_modes_give_identical_gradients():
    grads = {}
    for mode in ("none", "mlp", "block"):
        model = tiny_model(recompute=mode)
        model(random_tokens(2, 16), random_tokens(2, 16, seed=2)).backward()
        grads[mode] = [p.grad for p in model.parameters()]
    for mode in ("mlp", "block"):
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# training, flops, generation, loading

def test_few_optimizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizers = setup_optimizers(model, unembedding_lr=0.02, embedding_lr=0.2, matrix_lr=0.02)
    idx, targets = random_tokens(4, 32), random_tokens(4, 32, seed=2)
    losses = []
    for _ in range(25):
        loss = model(idx, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(VOCAB))).item()) < 0.1  # near-uniform start
    assert losses[-1] < 0.5 * losses[0]


def test_estimate_flops_scales_with_params():
    small = GPT(config_from_depth(2, VOCAB, 64))
    large = GPT(config_from_depth(4, VOCAB, 64))
    flops_small, flops_large = small.estimate_flops(), large.estimate_flops()
    assert 0 < flops_small < flops_large
    non_embedding = lambda m: m.num_params() - m.transformer.wte.weight.numel()
    ratio = (flops_large / flops_small) / (non_embedding(large) / non_embedding(small))
    assert 0.8 < ratio < 1.2
    assert flops_small >= 6 * non_embedding(small)


def test_generate_greedy_matches_argmax_and_sampling_is_seeded():
    model = tiny_model().eval()
    prompt = [3, 14, 15, 9]
    greedy = model.generate(prompt, max_tokens=5, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy == ids[len(prompt):]
    sampled = model.generate(prompt, max_tokens=6, temperature=1.0, top_k=5, seed=7)
    assert sampled == model.generate(prompt, max_tokens=6, temperature=1.0, top_k=5, seed=7)
    assert len(sampled) == 6 and all(isinstance(t, int) and 0 <= t < VOCAB for t in sampled)


def test_sample_next_token_top_k_and_errors():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    rng = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, rng, 1.0, top_k=2)) for _ in range(50)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, rng, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, rng, 1.0, top_k=0)


def test_rotary_tables_are_not_saved_and_are_rebuilt_on_load():
    model = tiny_model()
    state = model.state_dict()
    assert "cos" not in state and "sin" not in state
    other = GPT(model.config).to(torch.float64)
    other.cos.zero_()
    other.load_state_dict(state)
    torch.testing.assert_close(other.cos, model.cos, check_dtype=False)
    idx = random_tokens(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(other(idx), model(idx))
