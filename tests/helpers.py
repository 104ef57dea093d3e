"""What several test modules share (no test module imports another): the tiny corpus, tokenizer and
base model built once per session, the tiny command lines and configs, small models and
comparisons, the planner's test modes, the generated CORE bundle and a fake model to score it, a
uvicorn server for the chat app, and `needs_extra` (skip a test whose optional extra is missing).

"Tiny" has three meanings here, one name each: TINY_BASE_TRAIN_ARGS (a depth-1 base_train run),
TINY_GPT_CONFIG (GPTConfig fields of a 2-block width-32 model) and TINY_BENCH_ARGS (the model and
data sizes of bench/molegrad_quality.py and bench/recipe.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import uvicorn

from nanochat import serving
from nanochat.common import RunContext
from nanochat.engine import Engine
from nanochat.gpt import GPT, RECIPE_PIECES, GPTConfig
from nanochat.model_flags import MEMORY_MODES
from nanochat.tokenizer import Tokenizer
from nanochat.trainer import train_step

REPO = Path(__file__).resolve().parent.parent


def needs_extra(module: str, extra: str):
    """`module`, imported; without it the calling test (or module) is skipped, naming the extra that installs it."""
    __tracebackhide__ = True  # the skip is reported at the caller's line
    return pytest.importorskip(module, reason=f"needs {module.split('.')[0]}: pip install -e '.[{extra}]' (the {extra} extra)")


# ---------------------------------------------------------------------------------------------
# the tiny corpus, tokenizer and base model

WORDS = ("the model learns to predict the next token from the previous ones while the optimizer "
         "follows the gradient and memory is saved by low rank factors of every weight update").split()


def tiny_corpus_texts(num_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "." for _ in range(rng.randint(2, 6))]
        docs.append(" ".join(sentences))
    return docs


def build_tiny_base_dir(base: Path, vocab_size: int = 512) -> Path:
    """Two train shards + one val shard of synthetic text, and a trained tokenizer."""
    data = base / "base_data"
    data.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        texts = tiny_corpus_texts(300, seed=index)
        pq.write_table(pa.table({"text": texts}), data / f"shard_{index:05d}.parquet", row_group_size=64)
    tokenizer = Tokenizer.train_from_iterator(tiny_corpus_texts(300, seed=99), vocab_size)
    tokenizer.save(base / "tokenizer")
    return base


def train_tiny_base(base: Path, steps: int, tag: str = "tiny") -> Path:
    """A tiny corpus, tokenizer and depth-1 base model (checkpoint tag `tag`) in `base`."""
    from scripts import base_train

    build_tiny_base_dir(base)
    previous = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        base_train.main(["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256",
                         f"--num_iterations={steps}", "--eval_every=-1", "--sample_every=-1", "--threads=1",
                         "--dtype=float32", f"--model_tag={tag}"])
    finally:
        if previous is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = previous
    return base


def copy_checkpoint(base_dir: Path, kind: str, source_tag: str, tag: str, step: int) -> None:
    """A checkpoint directory `tag` holding only `source_tag`'s checkpoint at `step`."""
    source, target = base_dir / f"{kind}_checkpoints" / source_tag, base_dir / f"{kind}_checkpoints" / tag
    target.mkdir()
    for path in source.glob(f"*_{step:06d}*"):
        shutil.copy(path, target / path.name)


# ---------------------------------------------------------------------------------------------
# tiny command lines and configs

# base_train on the tiny corpus (conftest's tiny_base): depth 1, 32 tokens, 4 rows, 2 micro-steps per step
TINY_BASE_TRAIN_ARGS = ["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=256",
                        "--eval_tokens=512", "--sample_every=-1", "--threads=1", "--dtype=float32"]
# mid_train / chat_sft from the tiny base model, on the offline task mixture
CHAT_TRAIN_ARGS = ["--max_seq_len=128", "--device_batch_size=4", "--task_source=offline", "--threads=1", "--dtype=float32"]
MID_TRAIN_ARGS = CHAT_TRAIN_ARGS + ["--total_batch_size=1024", "--eval_tokens=512"]
# the model and data sizes the quality and recipe benches share (each adds its own budget flags)
TINY_BENCH_ARGS = ["--n_embd=32", "--n_head=2", "--seq_len=16", "--batch_size=2", "--vocab_size=300",
                   "--tokenizer_chars=100000", "--eval_tokens=64", "--jobs=1"]
# GPTConfig fields: 2 blocks, width 32, 2 heads of 16, 1 kv head, vocabulary 97, context 16
TINY_GPT_CONFIG = dict(sequence_len=16, vocab_size=97, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)

# each recipe piece alone, and all four
RECIPE_PIECE_SETS = [(name,) for name in RECIPE_PIECES] + [RECIPE_PIECES]

# the memory configurations the planner's formulas are checked in (GPTConfig fields)
PLANNER_MODES = {
    "dense": {},
    "recompute=mlp": dict(recompute="mlp"),
    "recompute=block": dict(recompute="block"),
    "ffn_only": dict(molegrad_rank_k=8, molegrad_targets="ffn_only"),
    "attn_only": dict(molegrad_rank_k=8, molegrad_targets="attn_only"),
    "all": dict(molegrad_rank_k=8, molegrad_targets="all"),
    "all+recompute=mlp": dict(molegrad_rank_k=8, molegrad_targets="all", recompute="mlp"),
    "keep_h": dict(molegrad_rank_k=8, **MEMORY_MODES["keep_h"]),
    "lowest": dict(molegrad_rank_k=8, **MEMORY_MODES["lowest"]),
}

# ---------------------------------------------------------------------------------------------
# small models and comparisons

VOCAB = 97


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> GPT:
    """A small model whose zero-initialised matrices are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def dense_grad(layer) -> torch.Tensor | None:
    """grad_factor @ Qᵀ of a MoleGradLinear: (out, in), the dense gradient the factor stands for (a reference only)."""
    if layer.grad_factor is None:
        return None
    return layer.grad_factor @ layer.Q.to(layer.grad_factor.dtype).T


def same_tensors(a, b) -> bool:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def assert_gradients_and_optimizer_state(model, optimizers, layers, c: dict[str, int]) -> None:
    """The planner's gradient, AdamW-moment and Muon-momentum bytes `c` equal what one real step holds."""
    tokens = torch.randint(0, 97, (3, 17))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None] + [layer.grad_factor for layer in layers]
    assert tensor_bytes(grads) == c["gradients"]
    cpu = RunContext(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1)
    train_step(model, optimizers, iter([(tokens[:, :-1], tokens[:, 1:])]), 1, cpu)
    adamw, muon = (tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)) for opt in optimizers)
    assert (adamw, muon) == (c["AdamW moments"], c["Muon momentum"])


# ---------------------------------------------------------------------------------------------
# the generated CORE eval bundle, in the real format (core.yaml, eval_data/**.jsonl, eval_meta_data.csv)

# One of two gloo processes: loads start.pt (the model's config and weights, the batches, the
# setup_optimizers options), trains on its half of every batch with float64 Newton-Schulz, saves its
# state and prints the shapes it all-reduced (one JSON line).
GLOO_TRAIN_CHILD = """
import json, sys
import torch
import torch.distributed as dist
import nanochat.trainer as trainer
from nanochat.common import RunContext
from nanochat.distributed import record_traffic
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers
rank, work = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + work + "/store", rank=rank, world_size=2)
start = torch.load(work + "/start.pt", weights_only=True)
model = GPT(GPTConfig(**start["config"])).double()
model.load_state_dict(start["model"])
optimizers = setup_optimizers(model, **start["optimizer"])
optimizers[1].ns_dtype = torch.float64
ctx = RunContext(torch.device("cpu"), "cpu", torch.float32, True, rank, rank, 2)
with record_traffic() as traffic:
    for inputs, targets in start["batches"]:
        half = slice(2 * rank, 2 * rank + 2)
        trainer.train_step(model, optimizers, iter([(inputs[half], targets[half])]), 1, ctx, 1.0, 0.9, 1.0)
torch.save(model.state_dict(), work + f"/state_{rank}.pt")
print(json.dumps(sorted(traffic.shapes())))
dist.destroy_process_group()
"""


def train_in_two_gloo_processes(model: GPT, batches: list, optimizer: dict, work: Path) -> tuple[list[dict], set]:
    """Trains a float64 copy of `model` in two gloo processes, each on half of every (4-row) batch
    (GLOO_TRAIN_CHILD); returns both ranks' final state dicts and the shapes rank 0 all-reduced."""
    import dataclasses
    import subprocess
    import sys

    torch.save({"config": dataclasses.asdict(model.config), "model": model.state_dict(), "batches": batches,
                "optimizer": optimizer}, work / "start.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_TRAIN_CHILD, str(rank), str(work)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    states = [torch.load(work / f"state_{rank}.pt", weights_only=True) for rank in range(2)]
    return states, {tuple(shape) for shape in json.loads(outputs[0][0].strip().splitlines()[-1])}


def assert_trains_like_dense(dense: GPT, compressed: GPT, make_optimizers, batches: list) -> None:
    """One optimizer step per batch (clip 0.5, momentum 0.9) on both models: losses, gradient norms,
    every weight equal (float64), clipping active, every MoleGrad layer updated once per step.
    For MoleGrad at full rank, which must train exactly like dense."""
    from nanochat.molegrad import molegrad_layers

    cpu = RunContext(torch.device("cpu"), "cpu", torch.float32, False, 0, 0, 1)
    runs = {}
    for name, model in (("dense", dense), ("molegrad", compressed)):
        optimizers = make_optimizers(model)
        runs[name] = [train_step(model, optimizers, iter([batch]), 1, cpu, 1.0, 0.9, 0.5) for batch in batches]
    for (loss_d, norm_d), (loss_s, norm_s) in zip(runs["dense"], runs["molegrad"]):
        assert loss_s == pytest.approx(loss_d, abs=1e-12) and norm_s == pytest.approx(norm_d, abs=1e-10)
    assert runs["dense"][0][1] > 0.5  # clipping was active
    assert all(m.num_updates == len(batches) for m in molegrad_layers(compressed))
    for name, p in dense.named_parameters():
        torch.testing.assert_close(compressed.get_parameter(name), p, atol=1e-10, rtol=0, msg=name)


CORE_MC_ITEMS = [  # (query, choices, gold); gold == 0 for 3 of 8
    ("Question: What color is a clear sky?", ["blue", "green", "red", "purple"], 0),
    ("Question: How many legs does a spider have?", ["six", "four", "8", "two"], 2),
    ("Question: What do bees make?", ["honey", "milk", "silk", "wax paper"], 0),
    ("Question: Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
    ("Question: What is frozen water called?", ["steam", "vapor", "rain", "ice"], 3),
    ("Question: Which animal barks?", ["dog", "cat", "fish", "bird"], 0),
    ("Question: What is the opposite of hot?", ["warm", "boiling", "cold", "sunny"], 2),
    ("Question: Which instrument has black and white keys?", ["drum", "piano", "flute", "violin"], 1),
]
CORE_SCHEMA_ITEMS = [  # (context_options, continuation, gold); gold == 0 for 4 of 6
    (["The trophy did not fit in the suitcase because the trophy", "The trophy did not fit in the suitcase because the suitcase"], "was too big.", 0),
    (["Anna gave Lucy her book since Anna", "Anna gave Lucy her book since Lucy"], "had asked for it.", 1),
    (["The ball broke the window because the ball", "The ball broke the window because the window"], "was thrown hard.", 0),
    (["Tom thanked Bob because Tom", "Tom thanked Bob because Bob"], "had received help.", 0),
    (["The cup fell off the table because the cup", "The cup fell off the table because the table"], "was tilted.", 1),
    (["Sam called Max because Sam", "Sam called Max because Max"], "wanted to talk.", 0),
]
CORE_LM_ITEMS = [
    ("The capital of France is", "Paris"),
    ("One, two, three, four,", "five"),
    ("The sun rises in the", "east"),
    ("Water boils at one hundred degrees", "Celsius"),
    ("Roses are red, violets are", "blue"),
    ("A week has seven", "days"),
]
CORE_YAML = """\
icl_tasks:
- label: toy_mc
  dataset_uri: world_knowledge/toy_mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: toy_schema
  dataset_uri: language_understanding/toy_schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
- label: toy_lm
  dataset_uri: language_understanding/toy_lm.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
CORE_META_CSV = """\
Eval Task,Task Category,Random baseline
toy_mc,world knowledge,25.0
toy_schema,language understanding,50
toy_lm,language understanding,0.0
not_in_core,symbolic problem solving,10
"""


def bundle_files() -> dict[str, str]:
    """{path inside the zip: text} of the generated bundle."""
    mc = [{"query": q, "choices": c, "gold": g} for q, c, g in CORE_MC_ITEMS]
    schema = [{"context_options": o, "continuation": c, "gold": g} for o, c, g in CORE_SCHEMA_ITEMS]
    lm = [{"context": c, "continuation": a} for c, a in CORE_LM_ITEMS]
    jsonl = lambda rows: "".join(json.dumps(row) + "\n" for row in rows)  # noqa: E731
    return {
        "eval_bundle/core.yaml": CORE_YAML,
        "eval_bundle/eval_meta_data.csv": CORE_META_CSV,
        "eval_bundle/eval_data/world_knowledge/toy_mc.jsonl": jsonl(mc),
        "eval_bundle/eval_data/language_understanding/toy_schema.jsonl": jsonl(schema),
        "eval_bundle/eval_data/language_understanding/toy_lm.jsonl": jsonl(lm),
    }


def write_bundle(root: Path) -> Path:
    for name, text in bundle_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root / "eval_bundle"


def bundle_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in bundle_files().items():
            zf.writestr(name, text)
    return buffer.getvalue()


class BigramModel(nn.Module):
    """A fake model for the CORE eval: deterministic logits from the current token alone (a fixed
    random table), so scores are nontrivial. model(idx (B, T)) -> logits (B, T, vocab)."""

    def __init__(self, vocab_size: int, max_len: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(sequence_len=max_len)
        self.table = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


# ---------------------------------------------------------------------------------------------
# the chat app on a tiny model, served by uvicorn

HELLO = [{"role": "user", "content": "hello"}]


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def make_app(base: Path, engine_class: type[Engine] = Engine, **flags):
    """chat_web's app on the tiny base model (tag "tiny") of base dir `base`, its engines of `engine_class`."""
    from scripts import chat_web

    cfg = chat_web.ChatWebConfig(source="base", model_tag="tiny", **flags)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        engines, model_name = chat_web.load_engines(cfg, "cpu")
    engines = [engine_class(engine.model, engine.tokenizer) for engine in engines]
    return serving.build_app(engines, model_name, cfg)
