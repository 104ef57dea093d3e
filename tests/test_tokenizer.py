"""Tokenizer: rustbpe training vs a slow pure-Python BPE, tiktoken encoding, special tokens,
conversation rendering and masks, files, and the tok_train / tok_eval scripts."""

import glob
import json
import os
import pickle
import random
import re
import sysconfig
import time
from collections import Counter

import pytest
import regex
import torch

from nanochat.tokenizer import (LEGACY_TOKENIZER_FILE, SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_FILE, Tokenizer,
                                default_tokenizer_dir, get_token_bytes, get_tokenizer)

CORPUS = """The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't.
In 2024 the town counted 12,345 foxes and 678 dogs -- roughly 18 foxes per dog!
def add(a, b):
    return a + b  # they're added

    print(add(1, 22), add(333, 4444))
Photosynthesis turns light into chemical energy; the chloroplast's thylakoids split water.
The the the THE fox FOX Fox's foxes' we'll we've I'm you'd   spaces\t\ttabs\r\nwindows lines
"""


# ---------------------------------------------------------------------------------------------
# the slow, obvious reference

def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_train(texts: list[str], num_merges: int) -> dict[tuple[int, int], int]:
    """Byte-level BPE: count pairs inside regex chunks (weighted by how often the chunk occurs),
    merge the most frequent; ties go to the smallest (left id, right id), as rustbpe does."""
    chunk_counts = Counter(chunk for text in texts for chunk in regex.findall(SPLIT_PATTERN, text))
    words = {chunk: list(chunk.encode("utf-8")) for chunk in chunk_counts}
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, 256 + num_merges):
        pair_counts: Counter = Counter()
        for chunk, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += chunk_counts[chunk]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges[best] = new_id
        words = {chunk: merge(ids, best, new_id) for chunk, ids in words.items()}
    return merges


def reference_ranks(merges: dict[tuple[int, int], int]) -> dict[bytes, int]:
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new_id in merges.items():
        vocab[new_id] = vocab[left] + vocab[right]
    return {token: i for i, token in vocab.items()}


def reference_encode(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """Per chunk: apply the earliest-learned merge present, until none applies."""
    out = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, float("inf")))
            if pair not in merges:
                break
            ids = merge(ids, pair, merges[pair])
        out.extend(ids)
    return out


def trained(texts: list[str], num_merges: int) -> Tokenizer:
    return Tokenizer.train_from_iterator(texts, 256 + num_merges + len(SPECIAL_TOKENS))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return trained([CORPUS], 40)


# ---------------------------------------------------------------------------------------------
# training and encoding against the reference

@pytest.mark.parametrize("num_merges", [40, 200])
def test_rustbpe_merges_match_reference(num_merges):
    texts = [CORPUS, CORPUS.upper(), "1234567890 " * 5]
    tokenizer = trained(texts, num_merges)
    assert tokenizer.mergeable_ranks == reference_ranks(reference_train(texts, num_merges))
    assert tokenizer.get_vocab_size() == 256 + num_merges + len(SPECIAL_TOKENS)


def test_tie_break_is_smallest_pair():
    # every pair occurs once: (' ', 'c') = (32, 99) is the smallest, so it is merged first
    # (a "largest pair" or "first seen" rule would pick (c, d) or (a, b))
    for texts in (["ab cd"], [" cd", "ab"]):
        assert trained(texts, 1).decode([256]) == " c"


def test_rustbpe_matches_reference_on_tie_heavy_random_texts():
    rng = random.Random(0)
    for _ in range(40):
        alphabet = rng.choice(["ab", "abc", "ab c", "xy z1"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(1, 6))]
        num_merges = rng.randint(1, 30)
        merges = reference_train(texts, num_merges)
        assert trained(texts, num_merges).mergeable_ranks == reference_ranks(merges), texts


def test_encode_matches_reference():
    merges = reference_train([CORPUS], 200)
    tokenizer = trained([CORPUS], 200)
    for text in [CORPUS, "the fox", "The Fox's 12345 dogs!!", "  leading and trailing  ", "unseen: zebra quokka",
                 "x=1\n\n\ty=22\r\n", "ünïcödé 한국어 🦊"]:
        assert tokenizer.encode(text) == reference_encode(text, merges), text


def random_unicode(rng: random.Random, n: int) -> str:
    code_points = []
    while len(code_points) < n:
        cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be encoded as UTF-8
            code_points.append(cp)
    return "".join(map(chr, code_points))


def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(1)
    texts = ["", "hello world", "emoji 🦊🐶👩‍👩‍👧 flags 🇰🇷", "한국어 日本語 中文", "e\u0301 n\u0303 a\u030a\u0323 (combining)",
             "\x00\x01 control \u200b zero-width \ufeff", "<|bos|> is plain text here", CORPUS]
    texts += [random_unicode(rng, rng.randint(1, 200)) for _ in range(50)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode(texts)] == texts


def test_specials_are_never_produced_from_text(tok):
    assert tok.get_bos_token_id() not in tok.encode("<|bos|><|user_start|>")


def test_batch_encode_equals_single(tok):
    texts = [CORPUS, "a", "", "🦊 fox"]
    assert tok.encode(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert tok.encode(texts, prepend="<|bos|>") == [[tok.get_bos_token_id()] + tok.encode(t) for t in texts]
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(b"bytes")


# ---------------------------------------------------------------------------------------------
# special tokens and token bytes

def test_special_token_ids(tok):
    n_ranks = 256 + 40
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.encode_special(name) == n_ranks + i
        assert tok.decode([n_ranks + i]) == name
    assert tok.get_bos_token_id() == n_ranks
    assert tok.get_vocab_size() == n_ranks + 9
    ids = tok.encode("fox", prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    assert ids == [n_ranks] + tok.encode("fox") + [n_ranks + 4]
    with pytest.raises(ValueError, match="unknown special token 'bos'"):
        tok.encode_special("bos")
    with pytest.raises(ValueError, match="out of range"):
        tok.encode("x", prepend=10**6)


def test_token_bytes(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (tok.get_vocab_size(),)
    assert token_bytes[ord("a")] == 1
    assert all(token_bytes[tok.encode_special(name)] == 0 for name in SPECIAL_TOKENS)
    merged = [i for i in range(256, 296) if len(tok.decode([i])) > 1]
    assert merged and all(token_bytes[i] == len(tok.enc.decode_single_token_bytes(i)) for i in merged)
    for text in [CORPUS, "ünïcödé 한국어 🦊", "e\u0301"]:
        assert int(token_bytes[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# conversations

def test_render_conversation_masks_exactly_the_assistant_tokens(tok):
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    S, E = tok.encode_special, tok.encode
    expected = (
        [(S("<|bos|>"), 0), (S("<|user_start|>"), 0)]
        + [(t, 0) for t in E("Be brief.\n\nWhat is 2+3?")]
        + [(S("<|user_end|>"), 0), (S("<|assistant_start|>"), 0)]
        + [(t, 1) for t in E("Let me compute. ")]
        + [(S("<|python_start|>"), 1)] + [(t, 1) for t in E("2+3")] + [(S("<|python_end|>"), 1)]
        + [(S("<|output_start|>"), 0)] + [(t, 0) for t in E("5")] + [(S("<|output_end|>"), 0)]
        + [(t, 1) for t in E("It is 5.")]
        + [(S("<|assistant_end|>"), 1), (S("<|user_start|>"), 0)]
        + [(t, 0) for t in E("thanks")]
        + [(S("<|user_end|>"), 0), (S("<|assistant_start|>"), 0)]
        + [(t, 1) for t in E("You're welcome.")]
        + [(S("<|assistant_end|>"), 1)]
    )
    ids, mask = tok.render_conversation(conversation)
    assert list(zip(ids, mask)) == expected
    shown = tok.visualize_mask(ids, mask)
    assert shown == ("<|bos|><|user_start|>Be brief.\n\nWhat is 2+3?<|user_end|><|assistant_start|>"
                     "[[Let me compute. <|python_start|>2+3<|python_end|>]]<|output_start|>5<|output_end|>"
                     "[[It is 5.<|assistant_end|>]]<|user_start|>thanks<|user_end|><|assistant_start|>"
                     "[[You're welcome.<|assistant_end|>]]")

    truncated_ids, truncated_mask = tok.render_conversation(conversation, max_tokens=10)
    assert (truncated_ids, truncated_mask) == (ids[:10], mask[:10])


def test_render_for_completion(tok):
    prompt = [{"role": "user", "content": "hi"}]
    full = {"messages": prompt + [{"role": "assistant", "content": "hello"}]}
    expected = tok.render_conversation({"messages": prompt})[0] + [tok.encode_special("<|assistant_start|>")]
    assert tok.render_for_completion(full) == expected
    assert tok.render_for_completion({"messages": prompt}) == expected
    assert len(full["messages"]) == 2  # the caller's conversation is left alone


@pytest.mark.parametrize("messages,error", [
    ([{"role": "assistant", "content": "hi"}], "message 0: expected role 'user'.*got 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected role 'assistant'.*got 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "message 1: expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"}],
     "message 2: expected role 'user'.*got 'system'"),
    ([{"role": "robot", "content": "a"}], "message 0: expected a dict with role one of system|user|assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1 part 0: expected"),
    ([{"role": "user", "content": ["a"]}], "message 0: user content must be a str"),
    ([], "no messages"),
])
def test_bad_conversations_raise_clear_errors(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.render_conversation({"messages": messages})


# ---------------------------------------------------------------------------------------------
# files

def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    texts = [CORPUS, "🦊 fox", "<|bos|>"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert loaded.mergeable_ranks == tok.mergeable_ranks and loaded.special_ids == tok.special_ids
    assert torch.equal(get_token_bytes(directory=tmp_path), tok.token_bytes())
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.pt", TOKENIZER_FILE]  # no temp files left


@pytest.mark.parametrize("content", [b"", b"{not json", b"\x80\x04\x95garbage"])
def test_corrupt_tokenizer_file_names_the_file(tok, tmp_path, content):
    tok.save(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read tokenizer file {tmp_path / TOKENIZER_FILE}"):
        Tokenizer.from_directory(tmp_path)


def test_saved_file_is_plain_json_with_ranks_as_ids(tok, tmp_path):
    tok.save(tmp_path)
    data = json.loads((tmp_path / TOKENIZER_FILE).read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(tok.mergeable_ranks)))
    assert vocab["Ġ"] == tok.mergeable_ranks[b" "] and vocab["a"] == tok.mergeable_ranks[b"a"]
    assert [t["content"] for t in data["added_tokens"]] == SPECIAL_TOKENS
    assert [t["id"] for t in data["added_tokens"]] == [tok.encode_special(name) for name in SPECIAL_TOKENS]


def edited(data: dict, path: str, value) -> dict:
    data = json.loads(json.dumps(data))
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key] if not isinstance(node, list) else node[int(key)]
    node[leaf if not isinstance(node, list) else int(leaf)] = value
    return data


@pytest.mark.parametrize("path, value, error", [
    ("model.type", "WordPiece", "expected a Hugging Face tokenizer.json with a BPE model"),
    ("pre_tokenizer", {"type": "Whitespace"}, r"pre_tokenizer \['Whitespace'\] is not supported"),
    ("added_tokens.0.content", "<s>", "special tokens .* differ from nanochat's"),
    ("model.vocab", {"€uro": 0}, "vocabulary entry .€uro. \\(id 0\\) is not byte-level"),
    ("model.vocab", {}, "mergeable ranks lack 256 of the 256 single-byte tokens"),
])
def test_foreign_tokenizer_json_says_what_differs(tok, tmp_path, path, value, error):
    tok.save(tmp_path)
    data = json.loads((tmp_path / TOKENIZER_FILE).read_text(encoding="utf-8"))
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps(edited(data, path, value)), encoding="utf-8")
    with pytest.raises(ValueError, match=f"tokenizer file {re.escape(str(tmp_path / TOKENIZER_FILE))}: {error}"):
        Tokenizer.from_directory(tmp_path)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_old_pickle_is_refused_unread_with_how_to_convert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / LEGACY_TOKENIZER_FILE).write_bytes(pickle.dumps(Boom()))
    for load in (Tokenizer.from_directory, get_tokenizer):
        with pytest.raises(ValueError, match="old pickle format, which is no longer loaded.*--convert_legacy.*--force"):
            load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_missing_tokenizer_says_how_to_train():
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_token_bytes()


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size must be >= 265"):
        Tokenizer.train_from_iterator([CORPUS], 264)


# ---------------------------------------------------------------------------------------------
# scripts, on parquet shards in a temporary NANOCHAT_BASE_DIR

def write_shards(base_dir, docs_per_shard: list[list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = base_dir / "base_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for i, docs in enumerate(docs_per_shard):
        pq.write_table(pa.table({"text": docs}), data_dir / f"shard_{i:05d}.parquet")


@pytest.fixture
def shards(tmp_path, monkeypatch):
    base_dir = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    rng = random.Random(2)
    words = CORPUS.split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) for _ in range(400)]
    write_shards(base_dir, [docs[:300], docs[300:]])  # the last shard is the val split
    return base_dir


def test_tok_train_trains_caches_and_retrains(shards, capsys):
    pytest.importorskip("nanochat.dataset")
    from scripts import tok_train

    meta = tok_train.main(["--vocab_size=400"])
    directory = shards / "tokenizer"
    assert sorted(os.listdir(directory)) == ["meta.json", "token_bytes.pt", TOKENIZER_FILE]
    assert meta["vocab_size"] == meta["vocab_size_actual"] == 400 and meta["train_chars"] > 0
    assert json.loads((directory / "meta.json").read_text()) == meta
    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() == 400
    assert torch.equal(get_token_bytes(), tokenizer.token_bytes())
    assert "chars/s" in capsys.readouterr().out

    assert tok_train.main(["--vocab_size=400"]) == meta  # cached
    assert "reusing" in capsys.readouterr().out
    (directory / "token_bytes.pt").unlink()  # incomplete: retrained
    assert tok_train.main(["--vocab_size=400"])["train_time_s"] != meta["train_time_s"]
    assert (directory / "token_bytes.pt").is_file()
    assert tok_train.main(["--vocab_size=400", "--force"])["train_time_s"] != meta["train_time_s"]
    assert tok_train.main(["--vocab_size=300"])["vocab_size_actual"] == 300
    assert get_tokenizer().get_vocab_size() == 300


def test_tok_train_bad_flag_fails_with_one_line(shards, capsys):
    pytest.importorskip("nanochat.dataset")
    from scripts import tok_train

    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(["--vocab_size=100"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --vocab_size: expected >= 265 (256 bytes + 9 special tokens), got 100"


def test_tok_train_without_shards_says_how_to_make_them(capsys):
    pytest.importorskip("nanochat.dataset")
    from scripts import tok_train

    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(["--vocab_size=300"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no shards in ") and "python -m nanochat.dataset" in err


def test_tok_eval_offline_reports_ours_only(shards, monkeypatch, capsys):
    pytest.importorskip("nanochat.dataset")
    from scripts import tok_eval

    trained([CORPUS], 100).save(shards / "tokenizer")

    def offline(name, timeout_s=0):
        raise OSError(f"no network for {name}")

    monkeypatch.setattr(tok_eval, "load_reference", offline)
    results = tok_eval.main(["--num_docs=20"])
    out = capsys.readouterr().out
    assert "GPT-2 tokenizer unavailable offline (tiktoken could not download it): comparing against ours only" in out
    assert results["tokenizers"] == ["ours"] and set(results["unavailable"]) == {"gpt2", "gpt4"}
    assert {"news", "korean_cjk", "code", "math", "science", "train_shard", "val_shard"} == set(results["texts"])
    for row in results["texts"].values():
        assert row["ours"]["bytes_per_token"] == pytest.approx(row["bytes"] / row["ours"]["tokens"])
    section = json.loads((shards / "report" / "tokenizer-evaluation.json").read_text())["data"]
    assert section["code bytes/token (ours)"] == pytest.approx(results["texts"]["code"]["ours"]["bytes_per_token"])


def test_tok_eval_table_with_a_reference(shards, monkeypatch, capsys):
    pytest.importorskip("nanochat.dataset")
    from scripts import tok_eval

    ours = trained([CORPUS], 100)
    ours.save(shards / "tokenizer")
    reference = trained([CORPUS], 20).enc  # stands in for GPT-2: same text, fewer merges

    def gpt2_only(name, timeout_s=0):
        if name != "gpt2":
            raise OSError(f"no network for {name}")
        return reference

    monkeypatch.setattr(tok_eval, "load_reference", gpt2_only)
    results = tok_eval.main(["--num_docs=0"])
    out = capsys.readouterr().out
    assert "GPT-4 tokenizer unavailable offline (tiktoken could not download it): leaving out its column" in out
    assert results["tokenizers"] == ["ours", "gpt2"] and list(results["unavailable"]) == ["gpt4"]
    news = results["texts"]["news"]
    assert news["gpt2"]["tokens"] == len(reference.encode_ordinary(tok_eval.NEWS_TEXT)) > news["ours"]["tokens"]
    saved = 100 * (news["gpt2"]["tokens"] - news["ours"]["tokens"]) / news["gpt2"]["tokens"]
    assert f"{saved:+.1f}%" in next(line for line in out.splitlines() if line.startswith("news"))


def test_load_reference_gives_up_after_timeout(monkeypatch):
    pytest.importorskip("nanochat.dataset")
    import tiktoken

    from scripts import tok_eval

    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: time.sleep(5))
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="gpt2"):
        tok_eval.load_reference("gpt2", timeout_s=0.2)
    assert time.perf_counter() - t0 < 2


# ---------------------------------------------------------------------------------------------
# throughput (the dataloader tokenizes on the fly)

def local_text(n_chars: int) -> list[str]:
    """Documents of real text found on every machine: the Python standard library's sources."""
    docs, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append(f.read()[:10_000])
        total += len(docs[-1])
        if total >= n_chars:
            break
    return docs


@pytest.mark.slow
def test_encode_throughput():
    docs = local_text(20_000_000)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(docs[:200], 8192)
    train_s = time.perf_counter() - t0
    tokenizer.encode(docs[:50])  # warm up
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        ids = tokenizer.encode(docs, num_threads=8)
        seconds.append(time.perf_counter() - t0)
    median = sorted(seconds)[1]
    print(f"\ntrain {sum(map(len, docs[:200])) / train_s / 1e6:.1f}M chars/s; encode {n_bytes / 1e6:.1f} MB in {median:.2f}s "
          f"(median of 3) = {n_bytes / median / 1e6:.1f} MB/s on {os.cpu_count()} cores, {sum(map(len, ids)) / 1e6:.1f}M tokens")
    assert n_bytes / median > 1e6  # a guard against pathological slowdowns; the figure is printed with -s


def test_tok_train_convert_legacy_keeps_the_ids(tok, monkeypatch, capsys):
    from scripts import tok_train

    directory = default_tokenizer_dir()
    directory.mkdir(parents=True)
    pieces = {"format_version": 1, "pattern": tok.pattern, "mergeable_ranks": tok.mergeable_ranks, "special_tokens": tok.special_ids}
    (directory / LEGACY_TOKENIZER_FILE).write_bytes(pickle.dumps(pieces))
    result = tok_train.main(["--convert_legacy"])
    assert result["vocab_size"] == tok.get_vocab_size()
    converted = get_tokenizer()
    assert converted.encode([CORPUS, "🦊 fox"]) == tok.encode([CORPUS, "🦊 fox"]) and converted.special_ids == tok.special_ids
    assert torch.equal(get_token_bytes(), tok.token_bytes())


def test_tok_train_convert_legacy_runs_no_code(tmp_path, monkeypatch, capsys):
    from scripts import tok_train

    monkeypatch.chdir(tmp_path)
    directory = default_tokenizer_dir()
    directory.mkdir(parents=True)
    (directory / LEGACY_TOKENIZER_FILE).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(SystemExit) as e:
        tok_train.main(["--convert_legacy"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: tokenizer.pkl refers to posix.system") and err.count("\n") == 1
    assert not (tmp_path / "pwned").exists() and not (directory / TOKENIZER_FILE).exists()
