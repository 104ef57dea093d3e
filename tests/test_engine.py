"""Engine: KV-cache decode vs full recompute, batched vs separate samples, the calculator tool
(errors come back as its output), stop tokens, log-probabilities, nucleus sampling, and the
reply text helpers of the tokenizer (UTF-8-safe streaming, tool-call parts)."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from nanochat import engine as engine_module
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.sampling import sample_next_token
from nanochat.tokenizer import StreamDecoder, Tokenizer, assistant_parts, chat_prompt

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


def test_inference_bench_prints_a_table_and_a_json_line(capsys):
    from bench import inference

    result = inference.main(["--depth=1", "--vocab_size=512", "--prompt_tokens=4", "--new_tokens=6", "--repeats=1", "--threads=1"])
    assert [row["arm"] for row in result["rows"]] == ["full", "kv b1", "kv b8"]
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line)["rows"][1]["speedup_vs_full"] == result["rows"][1]["speedup_vs_full"]
