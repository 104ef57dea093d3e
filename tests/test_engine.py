"""Engine: KV-cache decode vs full recompute, batched vs separate samples, the calculator tool,
stop tokens, nucleus sampling and UTF-8-safe streaming."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from nanochat import engine as engine_module
from nanochat.engine import (
    Engine,
    StreamDecoder,
    assistant_parts,
    chat_prompt,
    sample_next_token,
    use_calculator,
)
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.tokenizer import Tokenizer

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
    failing = [special("<|python_start|>"), *tokenizer.encode("1/0"), special("<|python_end|>")]
    scripts = [call + [wrong] * len(output) + tail,
               failing + tokenizer.encode(" ok") + [special("<|assistant_end|>")]]
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), special("<|user_end|>"), special("<|assistant_start|>")]
    model = ScriptedModel(tokenizer.get_vocab_size(), len(prompt), scripts)
    steps = list(Engine(model, tokenizer).generate(prompt, num_samples=2, max_tokens=40, temperature=0.0))

    row0 = [column[0] for column, _ in steps]
    assert row0 == call + output + tail
    assert [masks[0] for _, masks in steps] == [1] * len(call) + [0] * len(output) + [1] * len(tail)
    fed_row0 = [fed[0][0] for fed in model.fed[1:]]  # decode steps feed the previous column
    assert fed_row0 == (call + output + tail)[:-1]
    # Row 1's call fails (1/0): nothing is forced, it ends first and is then padded with its stop token.
    row1_len = len(scripts[1])
    assert [column[1] for column, _ in steps][:row1_len] == scripts[1]
    assert all(column[1] == special("<|assistant_end|>") and masks[1] == 0 for column, masks in steps[row1_len:])

    sequences, masks = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert sequences[0] == prompt + call + output + tail[:-1]  # the stop token is not part of the sequence
    assert tokenizer.decode(sequences[0][len(prompt):]).endswith("<|output_start|>5<|output_end|> done")


@pytest.mark.parametrize("expression,result", [
    ("2+3", "5"), ("48/2", "24"), ("10/4", "2.5"), ("1/3", "0.333333"), ("1,000*3", "3000"), ("2**10", "1024"),
    ("-7//2", "-4"), ("(1.5+2)*2", "7"), ("'strawberry'.count('r')", "3"), ("'abc'.upper()", "ABC"),
    ("len('hello')", "5"), ("'hello'[::-1]", "olleh"), ("max(3, 9, 4)", "9"), ("round(2.567, 2)", "2.57"), ("'a,b,c'.count(',')", "2"),
])
def test_calculator_evaluates_arithmetic_and_string_ops(expression, result):
    assert use_calculator(expression) == result


@pytest.mark.parametrize("expression", [
    "__import__('os').system('ls')", "open('/etc/passwd').read()", "(1).__class__", "x + 1", "[1, 2]",
    "1/0", "2**100000", "10**200", "'a' * 10**9", "'%s' % 5", "lambda: 1", "", "1" * 300, "'abc'.format(1)",
    "round(10**99, -10**99)", "(-8) ** 0.5", "'a'.replace('', 'b' * 999) * 2",
])
def test_calculator_refuses_everything_else(expression):
    assert use_calculator(expression) is None


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
