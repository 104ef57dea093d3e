"""The CORE metric against a generated bundle in the real format (core.yaml, eval_data/**.jsonl,
eval_meta_data.csv), served as a zip from 127.0.0.1.

Accuracies are known exactly: an oracle model (all probability on the next token of the gold
sequences, which come from a slow reference prompt builder) scores 1.0 everywhere, and a uniform
model ties every option, so multiple-choice/schema accuracy is the share of items whose gold is
option 0 (the tie-break) and language modelling scores 0.
"""

import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from nanochat.core_eval import (
    DEFAULT_SHA256,
    DEFAULT_URL,
    SHA256_ENV,
    bundle_sha256,
    EvalBundleError,
    centered_accuracy,
    continuation_span,
    ensure_eval_bundle,
    evaluate_core,
    evaluate_task,
    first_argmin,
    load_items,
    load_tasks,
    prepare_item,
    render_item,
)
from nanochat.download import DownloadError
from nanochat.tokenizer import Tokenizer
from tests.helpers import CORE_LM_ITEMS, REPO, BigramModel, bundle_files, bundle_zip, write_bundle

# ---------------------------------------------------------------------------------------------
# the generated bundle (tests/helpers.py)

BASELINES = {"toy_mc": 25.0, "toy_schema": 50.0, "toy_lm": 0.0}
# the uniform model's accuracies: share of items with gold == 0; language modelling 0
UNIFORM_ACCURACY = {"toy_mc": 3 / 8, "toy_schema": 4 / 6, "toy_lm": 0.0}


def corrupt_member(data: bytes, member: str) -> bytes:
    """The zip with one byte flipped in the middle of `member`'s compressed data: the central
    directory still opens, only reading the member (CRC / inflate) fails."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(member)
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [text for text in bundle_files().values()] * 4
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return write_bundle(tmp_path / "src")


# ---------------------------------------------------------------------------------------------
# fake models: the contract is model(idx (B, T)) -> logits (B, T, vocab), model.config.sequence_len

class UniformModel(nn.Module):
    def __init__(self, vocab_size: int, max_len: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(sequence_len=max_len)
        self.vocab_size = vocab_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab_size)


class OracleModel(nn.Module):
    """Logit 100 on the next token of any gold row whose prefix the input matches, 0 elsewhere."""

    def __init__(self, gold_rows: list[list[int]], vocab_size: int, max_len: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(sequence_len=max_len)
        self.vocab_size = vocab_size
        self.next_token = {tuple(row[:t + 1]): row[t + 1] for row in gold_rows for t in range(len(row) - 1)}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = tuple(idx[b].tolist())
            for t in range(T):
                nxt = self.next_token.get(row[:t + 1])
                if nxt is not None:
                    logits[b, t, nxt] = 100.0
        return logits


# ---------------------------------------------------------------------------------------------
# the slow, obvious reference for prompts and spans

def reference_rows(tok: Tokenizer, task, idx: int, max_len: int) -> tuple[list[tuple[list[int], int]], int, list[int]]:
    """([(tokens, span start) per option], gold, few-shot item ids) for item `idx` in evaluation order.

    Written out longhand: shuffle with seed 1337, few-shot = Random(1234 + idx).sample(others),
    each example + blank line, then the item; the scored text is the answer with the delimiter's
    final space (tokenized alone, and checked to be the tail of the whole); cut from the left after BOS."""
    lines = task.data_path.read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines]
    random.Random(1337).shuffle(items)
    others = [i for i in range(len(items)) if i != idx]
    shots = random.Random(1234 + idx).sample(others, task.num_fewshot)
    delim = task.continuation_delimiter

    def solved(item):
        if task.task_type == "multiple_choice":
            return item["query"] + delim + item["choices"][item["gold"]]
        if task.task_type == "schema":
            return item["context_options"][item["gold"]] + delim + item["continuation"]
        return item["context"] + delim + item["continuation"]

    prompt = "".join(solved(items[j]) + "\n\n" for j in shots)
    item = items[idx]
    if task.task_type == "multiple_choice":
        options, gold = [(item["query"], choice) for choice in item["choices"]], item["gold"]
    elif task.task_type == "schema":
        options, gold = [(context, item["continuation"]) for context in item["context_options"]], item["gold"]
    else:
        options, gold = [(item["context"], item["continuation"])], 0
    rows = []
    bos = tok.get_bos_token_id()
    for context, answer in options:
        ids = tok.encode(prompt + context + delim + answer, prepend=bos)
        scored = tok.encode((" " if delim.endswith(" ") else "") + answer)
        assert ids[-len(scored):] == scored, "test data must not merge across the boundary"
        if len(ids) > max_len:
            ids = [bos] + ids[len(ids) - (max_len - 1):]
        rows.append((ids, len(ids) - len(scored)))
    return rows, gold, shots


def shuffled_items(task) -> list[dict]:
    items = load_items(task)
    random.Random(1337).shuffle(items)
    return items


# ---------------------------------------------------------------------------------------------
# parsing

def test_load_tasks_reads_yaml_and_baselines(bundle_dir):
    tasks = load_tasks(bundle_dir)
    assert [(t.label, t.task_type, t.num_fewshot, t.continuation_delimiter) for t in tasks] == [
        ("toy_mc", "multiple_choice", 2, "\nAnswer: "),
        ("toy_schema", "schema", 1, " "),  # continuation_delimiter defaults to one space
        ("toy_lm", "language_modeling", 3, " "),
    ]
    assert {t.label: t.random_baseline for t in tasks} == BASELINES
    assert tasks[0].data_path == bundle_dir / "eval_data" / "world_knowledge" / "toy_mc.jsonl"


@pytest.mark.parametrize(
    "path, old, new, expected",
    [
        ("core.yaml", "icl_tasks:", "tasks:", ["core.yaml", "icl_tasks"]),
        ("core.yaml", "  dataset_uri: world_knowledge/toy_mc.jsonl\n", "", ["core.yaml", "icl_tasks[0]", "dataset_uri"]),
        ("core.yaml", "icl_task_type: schema", "icl_task_type: cloze", ["core.yaml", "toy_schema", "icl_task_type", "cloze"]),
        ("core.yaml", "num_fewshot: [1]", "num_fewshot: [-1]", ["toy_schema", "num_fewshot"]),
        ("core.yaml", "toy_lm.jsonl", "missing.jsonl", ["toy_lm", "dataset_uri", "missing.jsonl"]),
        ("eval_meta_data.csv", "toy_lm,", "toy_lm_v2,", ["eval_meta_data.csv", "toy_lm"]),
        ("eval_meta_data.csv", "world knowledge,25.0", "world knowledge,n/a", ["eval_meta_data.csv:2", "Random baseline"]),
    ],
)
def test_malformed_bundle_errors_name_file_and_field(bundle_dir, path, old, new, expected):
    file = bundle_dir / path
    assert old in file.read_text()
    file.write_text(file.read_text().replace(old, new, 1))
    with pytest.raises(EvalBundleError) as info:
        load_tasks(bundle_dir)
    for word in expected:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "task_index, old, new, expected",
    [
        (0, '"gold": 2', '"golden": 2', ["toy_mc.jsonl:2", "'gold'"]),
        (0, '"gold": 2', '"gold": 4', ["toy_mc.jsonl:2", "'gold'", "0..3"]),
        (1, '"continuation": "was too big."', '"continuation": 7', ["toy_schema.jsonl:1", "'continuation'"]),
        (2, '"context": "A week has seven"', '"context": ["A week"]', ["toy_lm.jsonl:6", "'context'"]),
        (2, '{"context": "One', '{"context: "One', ["toy_lm.jsonl:2", "not valid JSON"]),
    ],
)
def test_malformed_items_name_file_line_and_field(bundle_dir, task_index, old, new, expected):
    task = load_tasks(bundle_dir)[task_index]
    text = task.data_path.read_text()
    assert old in text
    task.data_path.write_text(text.replace(old, new, 1))
    with pytest.raises(EvalBundleError) as info:
        load_items(task)
    for word in expected:
        assert word in str(info.value)


# ---------------------------------------------------------------------------------------------
# prompts and spans

def test_prompt_text_of_one_item(tok, bundle_dir):
    mc = load_tasks(bundle_dir)[0]
    items = shuffled_items(mc)
    idx = 3
    rendered = render_item(mc, items, idx)
    _, _, shots = reference_rows(tok, mc, idx, 1024)
    assert idx not in shots and len(set(shots)) == 2  # examples are other items
    examples = "".join(f"{items[j]['query']}\nAnswer: {items[j]['choices'][items[j]['gold']]}\n\n" for j in shots)
    assert rendered.contexts == [examples + items[idx]["query"] + "\nAnswer:"] * 4
    assert rendered.continuations == [" " + choice for choice in items[idx]["choices"]]
    assert rendered.gold == items[idx]["gold"]
    assert render_item(mc, items, idx) == rendered  # fixed seed


@pytest.mark.parametrize("max_len", [1024, 40])
def test_prepared_tokens_match_reference(tok, bundle_dir, max_len):
    truncated = 0
    for task in load_tasks(bundle_dir):
        items = shuffled_items(task)
        for idx in range(len(items)):
            prepared = prepare_item(tok, task, items, idx, max_len)
            rows, gold, _ = reference_rows(tok, task, idx, max_len)
            assert prepared.tokens == [ids for ids, _ in rows], (task.label, idx)
            assert prepared.starts == [start for _, start in rows], (task.label, idx)
            assert prepared.gold == gold
            for ids, start in zip(prepared.tokens, prepared.starts):
                assert len(ids) <= max_len and ids[0] == tok.get_bos_token_id()
                truncated += len(tok.encode(render_item(task, items, idx).contexts[0])) + 1 > max_len
    assert (truncated > 0) == (max_len == 40)  # the short max length really cuts the few-shot prompts


def test_span_across_a_bpe_merge():
    # "=" + "= y": the whole text tokenizes as " ==" + " y", the context alone ends in " ="
    tok = Tokenizer.train_from_iterator(["if x == y: return a == b and c == d"] * 50, vocab_size=300)
    context, continuation = "if x =", "= y"
    ids, start = continuation_span(tok, context, continuation)
    context_ids = tok.encode(context, prepend=tok.get_bos_token_id())
    assert ids == tok.encode(context + continuation, prepend=tok.get_bos_token_id())
    assert ids[:start] == context_ids[:start] and ids[start] != context_ids[start]
    assert tok.decode(ids[start:]) == " == y"  # every continuation byte, plus the context's " =" glued to it
    with pytest.raises(ValueError, match="adds no tokens"):
        continuation_span(tok, context, "")


# ---------------------------------------------------------------------------------------------
# scoring

def test_first_argmin_ties_go_to_first():
    assert first_argmin([2.0, 1.0, 1.0, 3.0]) == 1
    assert first_argmin([0.5, 0.5]) == 0


def test_centered_accuracy_and_core_arithmetic():
    assert centered_accuracy(0.25, 25.0) == 0.0
    assert centered_accuracy(1.0, 25.0) == 1.0
    assert centered_accuracy(0.625, 25.0) == pytest.approx(0.5)
    assert centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    assert centered_accuracy(0.4, 50.0) == pytest.approx(-0.2)  # below chance is negative


def all_gold_rows(tok, bundle_dir, max_len) -> list[list[int]]:
    rows = []
    for task in load_tasks(bundle_dir):
        for idx in range(len(load_items(task))):
            options, gold, _ = reference_rows(tok, task, idx, max_len)
            rows.append(options[gold][0])
    return rows


@pytest.mark.parametrize("max_len", [1024, 40])
def test_oracle_scores_one(tok, bundle_dir, max_len):
    oracle = OracleModel(all_gold_rows(tok, bundle_dir, max_len), tok.get_vocab_size(), max_len)
    out = evaluate_core(oracle, tok, bundle_dir, "cpu")
    assert out["results"] == {"toy_mc": 1.0, "toy_schema": 1.0, "toy_lm": 1.0}
    assert out["centered_results"] == {"toy_mc": 1.0, "toy_schema": 1.0, "toy_lm": 1.0}
    assert out["core_metric"] == 1.0


def test_language_modeling_needs_every_token(tok, bundle_dir):
    lm = load_tasks(bundle_dir)[2]
    gold_rows = [reference_rows(tok, lm, idx, 1024)[0][0][0] for idx in range(len(CORE_LM_ITEMS))]
    off_by_one = [row[:-1] + [(row[-1] + 1) % 256] for row in gold_rows]  # right up to the last token
    assert evaluate_task(OracleModel(gold_rows, tok.get_vocab_size(), 1024), tok, lm, "cpu") == 1.0
    assert evaluate_task(OracleModel(off_by_one, tok.get_vocab_size(), 1024), tok, lm, "cpu") == 0.0


def test_uniform_model_by_hand(tok, bundle_dir):
    out = evaluate_core(UniformModel(tok.get_vocab_size(), 1024), tok, bundle_dir, "cpu")
    # every option ties (same loss per token, whatever its length) -> option 0 wins
    assert out["results"] == UNIFORM_ACCURACY
    centered = {"toy_mc": (3 / 8 - 0.25) / 0.75, "toy_schema": (4 / 6 - 0.5) / 0.5, "toy_lm": 0.0}
    assert out["centered_results"] == pytest.approx(centered)
    assert out["core_metric"] == pytest.approx((1 / 6 + 1 / 3 + 0.0) / 3)


def test_max_per_task_takes_a_prefix_of_the_fixed_order(tok, bundle_dir):
    mc = load_tasks(bundle_dir)[0]
    model = UniformModel(tok.get_vocab_size(), 1024)
    expected = sum(item["gold"] == 0 for item in shuffled_items(mc)[:3]) / 3
    assert evaluate_task(model, tok, mc, "cpu", max_per_task=3) == expected
    assert evaluate_task(model, tok, mc, "cpu", max_per_task=100) == 3 / 8
    with pytest.raises(ValueError, match="max_per_task"):
        evaluate_task(model, tok, mc, "cpu", max_per_task=0)


def test_model_mode_is_restored(tok, bundle_dir):
    model = UniformModel(tok.get_vocab_size(), 1024).train()
    evaluate_core(model, tok, bundle_dir, "cpu", max_per_task=1)
    assert model.training


# ---------------------------------------------------------------------------------------------
# download and unpack, from a local server

class BundleSite:
    """The bundle at `url` on the shared test server: the i-th GET gets `bodies[i]` (the last one
    from then on), each with a true Content-Length; `count()` counts the GETs."""

    def __init__(self, server, bodies: list[bytes]) -> None:
        server.files["/eval_bundle.zip"] = bodies[-1]
        server.failures["/eval_bundle.zip"] = list(bodies[:-1])
        self.url = f"{server.url}/eval_bundle.zip"
        self.count = server.count


@pytest.fixture
def serve(http_server, monkeypatch):
    monkeypatch.delenv(SHA256_ENV, raising=False)
    return lambda bodies: BundleSite(http_server, bodies)


def base_dir() -> Path:
    return Path(os.environ["NANOCHAT_BASE_DIR"])


def assert_unpacked_complete(target: Path) -> None:
    expected = {name.removeprefix("eval_bundle/"): text for name, text in bundle_files().items()}
    found = {p.relative_to(target).as_posix(): p.read_text(encoding="utf-8") for p in target.rglob("*") if p.is_file()}
    assert found == expected


def test_truncated_zip_is_retried_then_unpacked(serve, monkeypatch):
    good = bundle_zip()
    server = serve([good[: len(good) // 2], good])  # honest Content-Length: only the zip check can tell
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
    target = ensure_eval_bundle(backoff=0)
    assert target == base_dir() / "eval_bundle"
    assert server.count() == 2
    assert_unpacked_complete(target)
    assert sorted(p.name for p in base_dir().iterdir()) == ["eval_bundle"]  # no zip, no staging dir
    assert ensure_eval_bundle(server.url) == target  # present: no new request
    assert server.count() == 2


@pytest.mark.parametrize("kind", ["crc", "not_a_zip", "no_core_yaml"])
def test_corrupt_zip_fails_cleanly(serve, kind):
    good = bundle_zip()
    body = {
        "crc": corrupt_member(good, "eval_bundle/eval_data/world_knowledge/toy_mc.jsonl"),
        "not_a_zip": b"<html>AccessDenied</html>",
        "no_core_yaml": zipfile_bytes({"eval_bundle/readme.txt": "hi"}),
    }[kind]
    server = serve([body])
    with pytest.raises(DownloadError, match="validation failed"):
        ensure_eval_bundle(server.url, retries=2, backoff=0)
    assert server.count() == 3
    assert list(base_dir().iterdir()) == []  # no eval_bundle dir, no zip, no temp file


def test_bundle_pinned_by_sha256(serve, monkeypatch):
    good = bundle_zip()
    assert bundle_sha256(DEFAULT_URL) == DEFAULT_SHA256 and len(DEFAULT_SHA256) == 64
    server = serve([good])
    assert bundle_sha256(server.url) is None  # a mirror or test server: no pin unless given
    monkeypatch.setenv(SHA256_ENV, "0" * 64)  # a valid zip, but not the pinned one
    with pytest.raises(DownloadError, match=f"checksum mismatch.*{SHA256_ENV}=<sha256> pins another bundle"):
        ensure_eval_bundle(server.url, retries=1, backoff=0)
    assert server.count() == 2 and list(base_dir().iterdir()) == []
    monkeypatch.setenv(SHA256_ENV, hashlib.sha256(good).hexdigest().upper())
    assert_unpacked_complete(ensure_eval_bundle(server.url, backoff=0))


def test_pinned_bundle_mismatch_is_fetched_again(serve, monkeypatch):
    good = bundle_zip()
    other = zipfile_bytes({"eval_bundle/core.yaml": "icl_tasks: []\n"})  # a valid bundle zip, not the pinned one
    server = serve([other, good])
    monkeypatch.setenv(SHA256_ENV, hashlib.sha256(good).hexdigest())
    assert_unpacked_complete(ensure_eval_bundle(server.url, backoff=0))
    assert server.count() == 2


def test_hf_hub_offline_makes_no_request(serve, monkeypatch):
    server = serve([bundle_zip()])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        ensure_eval_bundle(server.url, backoff=0)
    assert server.count() == 0


def test_concurrent_callers_download_once(serve):
    server = serve([bundle_zip()])
    barrier = threading.Barrier(3)
    results, errors = [], []

    def caller() -> None:
        barrier.wait()
        try:
            results.append(ensure_eval_bundle(server.url, backoff=0))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and server.count() == 1
    assert_unpacked_complete(results[0])


def zipfile_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def test_interrupted_unpack_leaves_no_bundle_dir(serve, monkeypatch):
    server = serve([bundle_zip()])
    original = zipfile.ZipFile.extractall

    def extract_half_then_fail(self, path=None, members=None, pwd=None):
        self.extract(self.namelist()[0], path)
        raise OSError("No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extract_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        ensure_eval_bundle(server.url, backoff=0)
    assert sorted(p.name for p in base_dir().iterdir()) == ["eval_bundle.zip"]  # verified zip kept for next time
    monkeypatch.setattr(zipfile.ZipFile, "extractall", original)
    assert_unpacked_complete(ensure_eval_bundle(server.url, backoff=0))
    assert server.count() == 1  # the kept zip was reused


# ---------------------------------------------------------------------------------------------
# several processes: items split by rank, counts summed

CHILD = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tests.helpers import BigramModel
from nanochat.core_eval import ensure_eval_bundle, evaluate_core
from nanochat.tokenizer import Tokenizer
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=int(sys.argv[3]), world_size=2)
tok = Tokenizer.from_directory(sys.argv[4])
bundle = ensure_eval_bundle(sys.argv[5], backoff=0)  # rank 0 downloads, rank 1 waits
out = evaluate_core(BigramModel(tok.get_vocab_size(), 40), tok, bundle, "cpu")
print(json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_two_processes_match_one(tok, bundle_dir, serve, tmp_path):
    server = serve([bundle_zip()])
    tok.save(tmp_path / "tok")
    single = evaluate_core(BigramModel(tok.get_vocab_size(), 40), tok, bundle_dir, "cpu")
    assert 0.0 < single["results"]["toy_mc"] < 1.0  # the bigram table makes it a real test
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "ddp_base"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(REPO), str(tmp_path / "store"), str(rank), str(tmp_path / "tok"), server.url],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
        assert json.loads(stdout.strip().splitlines()[-1]) == single
    assert server.count() == 1


# ---------------------------------------------------------------------------------------------
# the script, end to end with a tiny random GPT

def test_base_eval_script_end_to_end(tok, capsys):
    from dataclasses import asdict

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, config_from_depth
    from scripts.base_eval import main

    base = base_dir()
    write_bundle(base)
    tok.save(base / "tokenizer")
    config = config_from_depth(1, vocab_size=tok.get_vocab_size(), sequence_len=48)
    model = GPT(config)
    save_checkpoint(base / "base_checkpoints" / "d1", 5, model.state_dict(), {}, {"model_config": asdict(config)})
    results = main(["--max_per_task=3", "--device=cpu", "--dtype=float32"])
    assert set(results["results"]) == set(BASELINES)
    assert all(0.0 <= acc <= 1.0 for acc in results["results"].values())
    assert results["core_metric"] == pytest.approx(sum(results["centered_results"].values()) / 3)
    assert results["step"] == 5 and results["max_per_task"] == 3
    section = json.loads((base / "report" / "base-model-evaluation.json").read_text())["data"]
    assert section["CORE"] == pytest.approx(results["core_metric"]) and section["step"] == 5
    with open(base / "base_checkpoints" / "d1" / "core_000005.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["task", "accuracy", "centered"]
    assert [row[0] for row in rows[1:]] == ["toy_mc", "toy_schema", "toy_lm", "CORE"]
    assert float(rows[-1][2]) == pytest.approx(results["core_metric"], abs=1e-6)
    assert "CORE" in capsys.readouterr().out


def test_base_eval_without_checkpoint_fails_in_one_line(capsys):
    from scripts.base_eval import main

    with pytest.raises(SystemExit) as info:
        main(["--device=cpu"])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no base checkpoints" in err
