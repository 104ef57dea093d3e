"""Engine: KV-cache decode vs full recompute, batched vs separate samples, many prompts of
different lengths in one batch vs each alone, the KV cache's per-row positions, the calculator
tool (errors come back as its output), stop tokens, log-probabilities, nucleus sampling, and the
reply text helpers of the tokenizer (UTF-8-safe streaming, tool-call parts)."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from nanochat import engine as engine_module
from nanochat.engine import Engine, KVCache
from nanochat.gpt import GPT, RECIPE_PIECES, GPTConfig, config_from_depth
from nanochat.sampling import sample_next_token, sample_tokens
from nanochat.tokenizer import StreamDecoder, Tokenizer, assistant_parts, chat_prompt
from tests.helpers import tiny_model

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


@pytest.fixture(scope="module")
def model() -> GPT:
    """A small GPT whose every weight matters: init_weights zeroes the output projections (each
    block starts as the identity), which would make the cache irrelevant to the logits."""
    torch.manual_seed(0)
    gpt = GPT(config_from_depth(2, vocab_size=256, sequence_len=64, n_kv_head=1))  # 2 query heads share 1 kv head
    with torch.no_grad():
        for block in gpt.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.05)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
        torch.nn.init.normal_(gpt.lm_head.weight, std=0.3)
    return gpt.eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["The answer is 2+3 = 5. Counting letters: 'strawberry'.count('r') is 3, done."] * 20
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


# ---------------------------------------------------------------------------------------------
# KV cache vs full recompute, batching

@pytest.mark.parametrize("prefill_chunk", [engine_module.PREFILL_CHUNK, 3])
def test_kv_cache_greedy_decode_equals_full_recompute(model, monkeypatch, prefill_chunk):
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", prefill_chunk)  # 3: the prompt goes in 4 chunks
    reference = model.generate(PROMPT, max_tokens=40, temperature=0.0)
    sequences, masks = Engine(model, None).generate_batch(PROMPT, max_tokens=40, temperature=0.0)
    assert sequences[0] == PROMPT + reference
    assert masks[0] == [0] * len(PROMPT) + [1] * 40


def test_kv_cache_sampling_equals_full_recompute_with_the_same_seed(model):
    reference = model.generate(PROMPT, max_tokens=30, temperature=1.0, top_k=40, seed=123)
    sequences, _ = Engine(model, None).generate_batch(PROMPT, max_tokens=30, temperature=1.0, top_k=40, seed=123)
    assert sequences[0][len(PROMPT):] == reference


def test_batched_samples_equal_separate_runs_with_seed_plus_index(model):
    engine = Engine(model, None)
    batched, _ = engine.generate_batch(PROMPT, num_samples=4, max_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    separate = [engine.generate_batch(PROMPT, num_samples=1, max_tokens=30, temperature=1.0, top_p=0.9, seed=7 + i)[0][0]
                for i in range(4)]
    assert batched == separate
    assert len({tuple(s) for s in batched}) == 4  # the samples really differ


def test_several_samples_prefill_once_at_batch_one(model):
    shapes = []
    handle = model.register_forward_hook(lambda module, args, kwargs_out: shapes.append(tuple(args[0].shape)))
    try:
        for _ in Engine(model, None).generate(PROMPT, num_samples=3, max_tokens=5, temperature=1.0):
            pass
    finally:
        handle.remove()
    assert shapes == [(1, len(PROMPT))] + [(3, 1)] * 4  # no forward after the last token


def test_generate_rejects_bad_requests(model):
    engine = Engine(model, None)
    with pytest.raises(ValueError, match="non-empty prompt"):
        next(engine.generate([], max_tokens=3))
    with pytest.raises(ValueError, match="exceed the model's 640 positions"):
        next(engine.generate(PROMPT, max_tokens=640))
    with pytest.raises(ValueError, match="top_p: expected a value in"):
        next(engine.generate(PROMPT, max_tokens=3, top_p=0.0))
    with pytest.raises(ValueError, match="expected ids in 0..255"):
        next(engine.generate([1, 256], max_tokens=3))


@pytest.mark.parametrize("num_samples", [1, 8])
def test_greedy_samples_equal_full_recompute(model, num_samples):
    reference = model.generate(PROMPT, max_tokens=25, temperature=0.0)
    sequences, masks = Engine(model, None).generate_batch(PROMPT, num_samples=num_samples, max_tokens=25, temperature=0.0)
    assert sequences == [PROMPT + reference] * num_samples
    assert masks == [[0] * len(PROMPT) + [1] * 25] * num_samples


def test_sample_i_equals_full_recompute_with_seed_plus_i(model):
    """The seed semantics, against the slow reference: sample i of a batch of 8 is GPT.generate's
    sample with seed + i (the same CPU draws, one per sampled token)."""
    sequences, _ = Engine(model, None).generate_batch(PROMPT, num_samples=8, max_tokens=20, temperature=0.9, top_k=60, seed=5)
    for i, sequence in enumerate(sequences):
        assert sequence[len(PROMPT):] == model.generate(PROMPT, max_tokens=20, temperature=0.9, top_k=60, seed=5 + i)
    assert len({tuple(s) for s in sequences}) == 8


def test_one_sampling_op_per_step_for_all_rows(model, monkeypatch):
    calls = []

    def counting(logits, uniforms, *args):
        calls.append(logits.size(0))
        return sample_tokens(logits, uniforms, *args)

    monkeypatch.setattr(engine_module, "sample_tokens", counting)
    prompts = [PROMPT, PROMPT[:4], PROMPT[2:9], PROMPT[:1]]
    results = list(Engine(model, None).generate_many(prompts, num_samples=2, max_tokens=5, temperature=1.0))
    assert calls == [8] * 5  # 4 prompts x 2 samples, one op per step
    assert sorted(p for p, _, _ in results) == [0, 1, 2, 3]


def many_prompts(count: int, seed: int = 3) -> list[list[int]]:
    """Prompts of different lengths (2 .. 11 tokens)."""
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (2 + (3 * i) % 10,), generator=rng).tolist() for i in range(count)]


@pytest.mark.parametrize("pieces", [(), RECIPE_PIECES], ids=["plain", "recipe"])
def test_many_prompts_decode_as_each_alone(pieces):
    """Prompts of different lengths, 2 samples each, 3 rows at a time: rows end at different steps
    (the 20-position rotary table leaves each prompt its own room), waiting rows take their places
    at other positions. Greedy equals the full recompute of each prompt; sampling with seeds equals
    each prompt decoded alone with its seed."""
    model = tiny_model(torch.float64, n_layer=3, sequence_len=2, **{name: True for name in pieces}).eval()  # 20 positions
    engine = Engine(model, None)
    prompts = many_prompts(5)
    assert len({len(p) for p in prompts}) == 5
    mixed = []  # per forward: were the cache's rows at different positions
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: mixed.append(kwargs["kv_cache"].positions(1) is not None),
                                           with_kwargs=True)
    try:
        greedy = {p: (seqs, masks)
                  for p, seqs, masks in engine.generate_many(prompts, num_samples=2, temperature=0.0, batch_size=3)}
    finally:
        hook.remove()
    assert any(mixed) and not all(mixed)
    for p, prompt in enumerate(prompts):
        reply = model.generate(prompt, max_tokens=engine.max_len - len(prompt), temperature=0.0)
        assert greedy[p] == ([prompt + reply] * 2, [[0] * len(prompt) + [1] * len(reply)] * 2)
    seeds = [100 * p for p in range(5)]
    sampled = {p: seqs for p, seqs, _ in engine.generate_many(prompts, num_samples=2, max_tokens=12, temperature=1.0, top_p=0.95,
                                                               seeds=seeds, batch_size=3)}
    for p, prompt in enumerate(prompts):
        alone, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=min(12, engine.max_len - len(prompt)),
                                         temperature=1.0, top_p=0.95, seed=seeds[p])
        assert sampled[p] == alone


def test_rows_at_different_positions_give_the_full_recompute_logits():
    """The masked decode path: two rows prefilled to different lengths, then fed tokens together."""
    model = tiny_model(torch.float64, n_layer=2, smear_gate=True, value_embeds=True).eval()
    cfg = model.config
    sequences = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    cache = KVCache(3, cfg.n_kv_head, 12, cfg.head_dim, cfg.n_layer, rows=0)
    with torch.inference_mode():
        for sequence in sequences:
            prompt = KVCache(1, cfg.n_kv_head, len(sequence), cfg.head_dim, cfg.n_layer)
            model(torch.tensor([sequence]), kv_cache=prompt)
            cache.append_row(prompt)
        assert cache.lengths == [7, 3] and cache.get_pos() == 7
        new = [[30, 31], [40, 41]]
        decoded = model(torch.tensor(new), kv_cache=cache)  # (2, 2, V): two new tokens per row at once
        decoded = torch.cat((decoded, model(torch.tensor([[32], [42]]), kv_cache=cache)), dim=1)
        for row, sequence in enumerate(sequences):
            full = model(torch.tensor([sequence + new[row] + [32 + 10 * row]]))[0, len(sequence):]
            assert torch.allclose(decoded[row], full, atol=1e-10, rtol=0)
    assert cache.lengths == [10, 6]


def test_kv_cache_rows_move_with_their_keys_and_positions():
    """append_row / insert_kv / keep_rows against a slow per-row record of what each row holds."""
    cache = KVCache(3, 1, 8, 2, 1, rows=0)
    expected = []  # per row: the values written at positions 0, 1, ...
    for length, base in ((2, 10.0), (5, 20.0), (3, 30.0)):
        prompt = KVCache(1, 1, length, 2, 1)
        values = [base + t for t in range(length)]
        prompt.insert_kv(0, torch.tensor(values).view(1, 1, length, 1).expand(1, 1, length, 2), torch.zeros(1, 1, length, 2))
        cache.append_row(prompt)
        expected.append(values)
    with pytest.raises(ValueError, match="all 3 rows are in use"):
        cache.append_row(prompt)
    assert cache.positions(2).tolist() == [[2, 3], [5, 6], [3, 4]]
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (rows, T)
    keys, _ = cache.insert_kv(0, new.view(3, 1, 2, 1).expand(3, 1, 2, 2), torch.zeros(3, 1, 2, 2))
    for row in range(3):
        expected[row] += new[row].tolist()
    assert cache.lengths == [4, 7, 5] and keys.shape == (3, 1, 7, 2)
    for row, values in enumerate(expected):
        assert keys[row, 0, :len(values), 0].tolist() == values
        visible = [[j <= len(values) - 2 + t for j in range(7)] for t in range(2)]  # token t sees its row's past and itself
        assert cache.attn_mask[row, 0].tolist() == visible
    cache.keep_rows([1, 2])
    assert cache.lengths == [7, 5]
    for row, values in enumerate(expected[1:]):
        assert cache.kv_cache[0, 0, row, 0, :len(values), 0].tolist() == values
    cache.keep_rows([1])
    assert cache.lengths == [5] and cache.positions(1) is None  # one row: back on the plain path
    with pytest.raises(ValueError, match="increasing row indices"):
        cache.keep_rows([1])


def test_generate_many_rejects_bad_requests(model):
    engine = Engine(model, None)
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty prompt"):
        next(engine.generate_many([PROMPT, []]))
    with pytest.raises(ValueError, match=r"prompts\[0\]: the prompt \(640 tokens\) leaves no room"):
        next(engine.generate_many([[1] * 640]))
    with pytest.raises(ValueError, match=r"seeds: expected one per prompt \(2\), got 1"):
        next(engine.generate_many([PROMPT, PROMPT], seeds=[1]))
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        next(engine.generate_many([PROMPT], batch_size=0))


# ---------------------------------------------------------------------------------------------
# sampling

def test_top_p_keeps_only_the_nucleus_and_samples_in_proportion():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    rng = torch.Generator().manual_seed(0)
    draws = collections.Counter(int(sample_next_token(logits, rng, 1.0, top_p=0.75)) for _ in range(4000))
    assert set(draws) == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2, 3 are cut
    assert draws[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    draws = collections.Counter(int(sample_next_token(logits, rng, 1.0)) for _ in range(4000))
    for token, p in enumerate(probs[0].tolist()):
        assert draws[token] / 4000 == pytest.approx(p, abs=0.03)
    assert all(int(sample_next_token(logits, rng, 1.0, top_p=0.1)) == 0 for _ in range(50))


@pytest.mark.parametrize("vocab", [97, 511, 50_000, 65_536])
def test_two_level_inverse_cdf_picks_what_one_cumsum_picks(vocab):
    """inverse_cdf (block masses, then one block's cumsum) against the obvious float64 cumsum over
    the whole row, for the same uniforms; tokens of zero probability (masked logits) never drawn,
    also for uniforms at the edges."""
    from nanochat.sampling import inverse_cdf

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=g) * 4
    logits[:, 1::3] = float("-inf")
    logits[:, -1] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    uniforms = torch.rand(64, 1, generator=g, dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2 ** -53
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    slow = torch.stack([torch.nonzero(row > u * row[-1])[0] for row, u in zip(cdf, uniforms)])
    chosen = inverse_cdf(probs, uniforms)
    assert torch.equal(chosen, slow)
    assert bool((probs.gather(1, chosen) > 0).all())


# ---------------------------------------------------------------------------------------------
# the calculator tool

class ScriptedModel(torch.nn.Module):
    """A stand-in model whose greedy choice for the j-th new token of row b is scripts[b][j],
    whatever it is fed; it records what it is fed and moves the KV cache along like a GPT."""

    def __init__(self, vocab_size: int, prompt_len: int, scripts: list[list[int]]) -> None:
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.rotary_seq_len = 64
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the Engine reads the device from the parameters
        self.prompt_len, self.scripts = prompt_len, scripts
        self.fed: list[list[list[int]]] = []

    def forward(self, idx: torch.Tensor, kv_cache) -> torch.Tensor:
        B, T = idx.shape
        pos = kv_cache.get_pos()
        kv_cache.insert_kv(0, torch.zeros(B, 1, T, 2), torch.zeros(B, 1, T, 2))
        self.fed.append(idx.tolist())
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                j = pos + t + 1 - self.prompt_len  # logits at position q predict the token at q + 1
                if 0 <= j < len(self.scripts[b]):
                    logits[b, t, self.scripts[b][j]] = 10.0
        return logits


def test_tool_call_output_is_forced_into_the_row(tokenizer):
    special = tokenizer.encode_special
    wrong = tokenizer.encode("X")[0]  # what the model "wants" where the tool output goes
    call = [special("<|python_start|>"), *tokenizer.encode("2+3"), special("<|python_end|>")]
    output = [special("<|output_start|>"), *tokenizer.encode("5"), special("<|output_end|>")]
    tail = tokenizer.encode(" done") + [special("<|assistant_end|>")]
    scripts = [call + [wrong] * len(output) + tail]
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), special("<|user_end|>"), special("<|assistant_start|>")]
    model = ScriptedModel(tokenizer.get_vocab_size(), len(prompt), scripts * 2)
    steps = list(Engine(model, tokenizer).generate(prompt, num_samples=2, max_tokens=40, temperature=0.0))

    row0 = [column[0] for column, _ in steps]
    assert row0 == call + output + tail
    assert [masks[0] for _, masks in steps] == [1] * len(call) + [0] * len(output) + [1] * len(tail)
    fed_row0 = [fed[0][0] for fed in model.fed[1:]]  # decode steps feed the previous column
    assert fed_row0 == (call + output + tail)[:-1]

    sequences, masks = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert sequences[0] == prompt + call + output + tail[:-1]  # the stop token is not part of the sequence
    assert tokenizer.decode(sequences[0][len(prompt):]).endswith("<|output_start|>5<|output_end|> done")


@pytest.mark.parametrize("expression,error", [
    ("1e308*10", "error: non-finite result inf"), ("1e999", "error: non-finite result inf"),
    ("1e200**2", "error: numeric overflow"), ("1/0", "error: division by zero"), ("2+*3", "error: invalid syntax"),
    ("10**200", "error: integer too large"),
])
def test_a_failing_tool_call_gets_its_error_as_output_and_the_row_goes_on(tokenizer, expression, error):
    """Row 0 calls a failing expression: the error text is forced like a result, and the row
    continues (and ends) as scripted; row 1's good call in the same batch gets its result."""
    special = tokenizer.encode_special
    wrong = tokenizer.encode("X")[0]

    def call(expr: str, output: str) -> tuple[list[int], list[int]]:
        return ([special("<|python_start|>"), *tokenizer.encode(expr), special("<|python_end|>")],
                [special("<|output_start|>"), *tokenizer.encode(output), special("<|output_end|>")])

    failing, error_output = call(expression, error)
    good, good_output = call("2+3", "5")
    tail = tokenizer.encode(" ok") + [special("<|assistant_end|>")]
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), special("<|user_end|>"), special("<|assistant_start|>")]
    scripts = [failing + [wrong] * len(error_output) + tail, good + [wrong] * len(good_output) + tail]
    model = ScriptedModel(tokenizer.get_vocab_size(), len(prompt), scripts)
    steps = list(Engine(model, tokenizer).generate(prompt, num_samples=2, max_tokens=60, temperature=0.0))
    rows = [[column[i] for column, _ in steps] for i in range(2)]
    assert rows[0][:len(scripts[0])] == failing + error_output + tail
    assert tokenizer.decode(error_output[1:-1]) == error
    assert rows[1][:len(scripts[1])] == good + good_output + tail
    assert [masks[0] for _, masks in steps][:len(scripts[0])] == [1] * len(failing) + [0] * len(error_output) + [1] * len(tail)


class HistoryModel(torch.nn.Module):
    """A stand-in model whose greedy choice after a row's prompt and j new tokens is
    scripts[prompt][j]. It keeps each fed token id as that row's key in the KV cache and reads the
    row's history back from there, so the script follows a row wherever it sits in the batch."""

    def __init__(self, vocab_size: int, scripts: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.rotary_seq_len = 64
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the Engine reads the device from the parameters
        self.scripts = scripts
        self.batch_sizes: list[int] = []

    def forward(self, idx: torch.Tensor, kv_cache) -> torch.Tensor:
        B, T = idx.shape
        positions = kv_cache.positions(T)
        if positions is None:
            positions = kv_cache.get_pos() + torch.arange(T).expand(B, T)
        ids = idx.double().view(B, 1, T, 1).expand(B, 1, T, 2)
        keys, _ = kv_cache.insert_kv(0, ids, ids)
        self.batch_sizes.append(B)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t in range(T):
                history = tuple(int(i) for i in keys[b, 0, :positions[b, t] + 1, 0].tolist())
                prompt = next((p for p in self.scripts if history[:len(p)] == p), None)  # None inside a prompt
                if prompt is not None and len(history) - len(prompt) < len(self.scripts[prompt]):
                    j = len(history) - len(prompt)
                    logits[b, t, self.scripts[prompt][j]] = 10.0
        return logits


def test_many_prompts_with_tool_calls_decode_as_each_alone(tokenizer):
    """Prompts of different lengths whose replies call the calculator (a good call, a failing one),
    skip it, or never stop: decoded 3 rows at a time, each equals its prompt decoded alone and its
    script with the tool's output forced in."""
    special = tokenizer.encode_special
    wrong = tokenizer.encode("X")[0]  # what the model "wants" where the tool output goes

    def call(expression: str, output: str) -> tuple[list[int], list[int]]:
        return ([special("<|python_start|>"), *tokenizer.encode(expression), special("<|python_end|>")],
                [special("<|output_start|>"), *tokenizer.encode(output), special("<|output_end|>")])

    end = [special("<|assistant_end|>")]
    good, good_output = call("2+3", "5")
    failing, failing_output = call("1/0", "error: division by zero")
    replies = [good + good_output + tokenizer.encode(" so 5") + end,  # what each row yields
               tokenizer.encode("no tool") + end,
               failing + failing_output + tokenizer.encode(" hmm") + end,
               tokenizer.encode(" the answer is 3, done. " * 4)]  # never stops: ends at max_tokens
    scripts_replies = [good + [wrong] * len(good_output) + tokenizer.encode(" so 5") + end, replies[1],
                       failing + [wrong] * len(failing_output) + tokenizer.encode(" hmm") + end, replies[3]]
    head = [tokenizer.get_bos_token_id(), special("<|user_start|>")]
    tail = [special("<|user_end|>"), special("<|assistant_start|>")]
    prompts = [head + tokenizer.encode(text) + tail for text in ("2+3?", "hi", "one over zero, please?", "count")]
    assert len({len(p) for p in prompts}) == 4
    model = HistoryModel(tokenizer.get_vocab_size(), {tuple(p): r for p, r in zip(prompts, scripts_replies)})
    engine = Engine(model, tokenizer)
    max_tokens = 40
    assert all(len(reply) <= max_tokens for reply in replies[:3]) and len(replies[3]) > max_tokens
    together = {p: (seqs, masks) for p, seqs, masks in engine.generate_many(prompts, num_samples=2, max_tokens=max_tokens,
                                                                              temperature=0.0, batch_size=3)}
    assert max(model.batch_sizes) == 3
    for p, prompt in enumerate(prompts):
        reply = replies[p][:-1] if replies[p][-1] in engine.stop_ids else replies[p][:max_tokens]
        assert together[p][0] == [prompt + reply] * 2
        alone = engine.generate_batch(prompt, num_samples=2, max_tokens=max_tokens, temperature=0.0)
        assert together[p] == alone
    forced = [0] * len(good_output)
    sampled_after = len(replies[0]) - len(good) - len(forced) - 1  # the stop token is not in the sequence
    assert together[0][1][0][len(prompts[0]):] == [1] * len(good) + forced + [1] * sampled_after


# ---------------------------------------------------------------------------------------------
# log-probabilities

def test_logprobs_are_log_softmax_of_the_full_recompute_logits(model):
    """Step.logprobs against a slow reference: the model run on the whole sequence so far."""
    steps = list(Engine(model, None).steps(PROMPT, max_tokens=6, temperature=0.7, top_k=20, seed=3, top_logprobs=4))
    sequence = list(PROMPT)
    for step in steps:
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([sequence]))[0, -1].float(), dim=-1)
        entry = step.logprobs[0]
        assert entry.logprob == pytest.approx(reference[step.tokens[0]].item(), abs=1e-4)
        values, ids = reference.topk(4)
        assert entry.top_ids == ids.tolist()
        assert entry.top_logprobs == pytest.approx(values.tolist(), abs=1e-4)
        assert entry.top_logprobs == sorted(entry.top_logprobs, reverse=True)
        sequence.append(step.tokens[0])
    # asking for logprobs does not change what is sampled
    plain = [tokens for tokens, _ in Engine(model, None).generate(PROMPT, max_tokens=6, temperature=0.7, top_k=20, seed=3)]
    assert plain == [step.tokens for step in steps]
    assert all(step.logprobs is None for step in Engine(model, None).steps(PROMPT, max_tokens=2))
    assert [len(s.logprobs[0].top_ids) for s in Engine(model, None).steps(PROMPT, max_tokens=2, top_logprobs=0)] == [0, 0]
    with pytest.raises(ValueError, match="top_logprobs: expected 0..256"):
        next(Engine(model, None).steps(PROMPT, max_tokens=2, top_logprobs=257))


# ---------------------------------------------------------------------------------------------
# text of a reply

def test_stream_decoder_emits_only_whole_utf8_characters():
    corpus = ["日本語のテキストと絵文字 🎉🚀🌍 中文字符 ünïcödé", "🎉 party 🚀 rocket 🌍 world 日本 中文"] * 10
    tokenizer = Tokenizer.train_from_iterator(corpus, vocab_size=280)  # few merges: characters get split
    text = "Hi 🎉🚀! 日本語と中文字符, naïve 🌍."
    ids = tokenizer.encode(text)
    partial = [i for i in ids if not _is_utf8(tokenizer.enc.decode_single_token_bytes(i))]
    assert partial, "the test needs tokens that end inside a multi-byte character"
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert sum(piece == "" for piece in pieces) >= 1  # some tokens had to wait for the rest of their character
    # special tokens come out as their names; a dangling partial character is flushed as U+FFFD
    assert decoder.push(tokenizer.encode_special("<|python_start|>")) == "<|python_start|>"
    emoji_bytes = [i for i in tokenizer.encode("🎉") if not _is_utf8(tokenizer.enc.decode_single_token_bytes(i))]
    assert decoder.push(emoji_bytes[0]) == "" and decoder.flush() == "\ufffd"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_assistant_parts_reads_tool_calls_back(tokenizer):
    assert assistant_parts("plain reply") == "plain reply"
    text = "It is <|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> so 5."
    assert assistant_parts(text) == [
        {"type": "text", "text": "It is "}, {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"}, {"type": "text", "text": " so 5."},
    ]
    assert assistant_parts("cut <|python_start|>2*") == [{"type": "text", "text": "cut "}, {"type": "python", "text": "2*"}]
    # rendering the parts gives the special tokens, not their text
    ids = chat_prompt(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": text},
                                  {"role": "user", "content": "again"}])
    assert ids.count(tokenizer.encode_special("<|python_start|>")) == 1
    assert ids.count(tokenizer.encode_special("<|output_end|>")) == 1
    assert ids[-1] == tokenizer.encode_special("<|assistant_start|>")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_inference_bench_against_a_git_revision(capsys):
    """--baseline_rev: HEAD's export and this tree, each in a subprocess that imports its own
    nanochat; chat_eval's greedy replies are the same in both (batched here, one problem at a time
    in HEAD before issue 24), and the last line is the JSON of the table."""
    import subprocess

    from bench import inference

    if subprocess.run(["git", "-C", str(inference.REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("needs a git checkout (--baseline_rev exports a revision)")
    result = inference.main(["--baseline_rev=HEAD", "--threads=1", "--depth=1", "--vocab_size=1024", "--prompt_tokens=4",
                             "--new_tokens=4", "--eval_problems=2", "--repeats=1"])
    assert [row["metric"] for row in result["rows"]] == list(inference.TREE_METRICS)
    assert all(row["before_s"] > 0 and row["after_s"] > 0 for row in result["rows"])
    assert result["chat_eval_replies_identical"] is True
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_inference_bench_prints_a_table_and_a_json_line(capsys):
    from bench import inference

    result = inference.main(["--depth=1", "--vocab_size=512", "--prompt_tokens=4", "--new_tokens=6", "--repeats=1", "--threads=1"])
    assert [row["arm"] for row in result["rows"]] == ["full", "kv b1", "kv b8"]
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line)["rows"][1]["speedup_vs_full"] == result["rows"][1]["speedup_vs_full"]
