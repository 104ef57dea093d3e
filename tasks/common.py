"""The common base of every chat/eval task, mixtures of tasks, and Hugging Face hub loading.

A task is a list of conversations in the tokenizer's format (nanochat/tokenizer.py):

    {"messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..." or [{"type": "text"|"python"|"python_output", "text": ...}]}]}

plus, where scoring needs them, extra keys (`letters` for multiple choice, the HumanEval
problem fields). The last assistant message is the reference answer. `evaluate(conversation,
response)` scores a sampled reply against it; `reward` is the same as a float, for RL.

Tasks built on hub datasets take `source`: "online" downloads the hub's auto-converted parquet
files (listed by the hub's API, checked against its sha256, cached under $HF_HOME/nanochat_datasets
or else $NANOCHAT_BASE_DIR/hf_datasets); "offline" uses the small handwritten stand-ins in
tasks/fixtures.py (same schema as the hub); "auto" is online when the files are already cached or
the hub answers, else offline. The hub is $HF_ENDPOINT (alias $NANOCHAT_HF_URL, default
https://huggingface.co), HF_TOKEN is sent to it, and HF_HUB_OFFLINE=1 makes no network call.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.parse
from bisect import bisect_right
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from nanochat.common import get_base_dir, print0
from nanochat.download import (
    DownloadError,
    download_file,
    file_lock,
    hf_endpoint,
    hf_offline,
    hub_headers,
    hub_tree,
    reachable,
    sha256_file,
)
from tasks.fixtures import offline_rows

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SOURCES = ("auto", "online", "offline")
REACHABLE_TIMEOUT_S = 3.0

Conversation = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# tasks

class Task:
    """A sliceable list of conversations: the view is `range(start, stop, step)` over the
    task's examples, like a Python slice (`stop=None` or past the end: up to the last one)."""

    eval_type: str  # "categorical" (answer is one of `letters`) or "generative" (sampled reply)

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"task slice needs 0 <= start <= stop and step >= 1, got start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        """Examples in the whole task, before slicing."""
        raise NotImplementedError(f"{type(self).__name__} must implement num_examples()")

    def get_example(self, index: int) -> Conversation:
        """Example `index` of the whole task, before slicing."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_example()")

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool | float:
        raise NotImplementedError(f"{type(self).__name__} does not score responses (a training-only task)")

    def reward(self, conversation: Conversation, assistant_response: str) -> float:
        return float(self.evaluate(conversation, assistant_response))

    def _view(self) -> range:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return range(self.start, stop, self.step)

    def __len__(self) -> int:
        return len(self._view())

    def __getitem__(self, index: int) -> Conversation:
        if not isinstance(index, int):
            raise TypeError(f"task indices must be int, got {type(index).__name__} (slice with start/stop/step instead)")
        view = self._view()
        if not -len(view) <= index < len(view):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(view)} examples")
        return self.get_example(view[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class HubTask(Task):
    """A task over the rows of one split of a hub dataset, or of its offline stand-in.

    Subclasses name the dataset and its configs (the task's `subset`) with their splits."""

    dataset_id: str
    splits: dict[str, tuple[str, ...]]  # config -> its splits

    def __init__(self, config: str, split: str, source: str = "auto",
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        check_choice("subset", config, tuple(self.splits))
        check_choice(f"split (of subset {config})", split, self.splits[config])
        self.config, self.split = config, split
        self.source = resolve_source(source, self.dataset_id, config, split)  # "online" | "offline"
        self.rows = load_task_rows(self.source, self.dataset_id, config, split)

    def num_examples(self) -> int:
        return len(self.rows)


class MultipleChoiceTask(HubTask):
    """Examples are `mc_conversation`s; the reply is one of the example's `letters`."""

    eval_type = "categorical"

    def evaluate(self, conversation: Conversation, assistant_response: str) -> bool:
        """Right when the reply is the reference letter ("B", " B", "(B)", "B.")."""
        return assistant_response.strip().strip("().").strip() == conversation["messages"][-1]["content"]


class TaskSequence(Task):
    """The tasks one after another (index -> (task, local index) by cumulative lengths)."""

    def __init__(self, tasks: list[Task], start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.offsets = [0]  # offsets[t] = index of task t's first example
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def num_examples(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[Task, int]:
        """(task, index within that task) of example `index` of the whole sequence."""
        if not 0 <= index < self.offsets[-1]:
            raise IndexError(f"index {index} out of range for a sequence of {self.offsets[-1]} examples")
        t = bisect_right(self.offsets, index) - 1
        return self.tasks[t], index - self.offsets[t]

    def get_example(self, index: int) -> Conversation:
        task, local = self.locate(index)
        return task[local]


class TaskMixture(Task):
    """Every example of every task exactly once per pass, in an order shuffled by `seed`.

    Passing a task twice includes its examples twice (oversampling)."""

    def __init__(self, tasks: list[Task], seed: int = 42, start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def locate(self, index: int) -> tuple[Task, int]:
        """(task, index within that task) of example `index` of the mixture."""
        if not 0 <= index < len(self.index_map):
            raise IndexError(f"index {index} out of range for a mixture of {len(self.index_map)} examples")
        t, local = self.index_map[index]
        return self.tasks[t], local

    def get_example(self, index: int) -> Conversation:
        task, local = self.locate(index)
        return task[local]


class SyntheticTask(Task):
    """`size` generated examples; example i is drawn from its own RNG seeded by
    (class name, seed, split, i), so any example can be built alone, in any order."""

    def __init__(self, size: int = 1000, split: str = "train", seed: int = 42,
                 start: int = 0, stop: int | None = None, step: int = 1) -> None:
        super().__init__(start, stop, step)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        check_choice("split", split, ("train", "test"))
        self.size, self.split, self.seed = size, split, seed

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        # str seeds are hashed with SHA-512: the same on every run, whatever PYTHONHASHSEED is
        return random.Random(f"{type(self).__name__}/{self.seed}/{self.split}/{index}")


# ---------------------------------------------------------------------------------------------
# helpers shared by tasks

def render_mc(question: str, letters: str | list[str], choices: list[str]) -> str:
    """A multiple-choice prompt; the expected reply is one of `letters`.

    Each letter comes right after its choice ("- Paris=A"), so a small model reading the letter
    has the choice it names just before it, rather than having to look back across the list.
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(choices)} choices need as many letters, got {list(letters)}")
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines += ["", "Respond only with the letter of the correct answer."]
    return "\n".join(lines)


def mc_conversation(question: str, letters: list[str], choices: list[str], answer: str, **extra: Any) -> Conversation:
    """A categorical example: user asks `render_mc`, the assistant answers with the letter."""
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the letters {letters}")
    messages = [{"role": "user", "content": render_mc(question, letters, choices)}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "letters": list(letters), **extra}


def assistant_text(message: dict[str, Any]) -> str:
    """All the text an assistant message carries (str content, or its parts joined)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_final_answer(text: str) -> str | None:
    """The number after the first `#### ` marker, commas removed; None if there is none."""
    match = FINAL_ANSWER.search(text)
    return None if match is None else match.group(1).replace(",", "")


def evaluate_final_answer(conversation: Conversation, assistant_response: str) -> bool:
    """GSM8K-style scoring: the response's `#### N` equals the reference's, as numbers (72 == 72.0)."""
    reference = extract_final_answer(assistant_text(conversation["messages"][-1]))
    if reference is None:
        raise ValueError(f"reference answer has no '#### N' final answer: {assistant_text(conversation['messages'][-1])[-80:]!r}")
    predicted = extract_final_answer(assistant_response)
    return predicted is not None and Decimal(predicted) == Decimal(reference)


def validate_messages(messages: Any) -> None:
    """Raise ValueError unless `messages` is an optional system message, then user/assistant
    alternating from user and ending with the assistant; says which message is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected a non-empty list of messages, got {type(messages).__name__}")
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        expected = "system" if i < start else ("user" if (i - start) % 2 == 0 else "assistant")
        if message.get("role") != expected:
            raise ValueError(f"message {i}: expected role '{expected}' (optional system, then user/assistant alternating), got {message.get('role')!r}")
        content = message.get("content")
        parts_ok = expected == "assistant" and isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") in ("text", "python", "python_output") and isinstance(p.get("text"), str) for p in content
        )
        if not isinstance(content, str) and not parts_ok:
            raise ValueError(f"message {i}: content must be a str (or, for the assistant, a list of text/python/python_output parts), got {content!r:.80}")
    if len(messages) - start < 2 or messages[-1]["role"] != "assistant":
        raise ValueError(f"conversation must contain a user message and end with an assistant message, got roles {[m['role'] for m in messages]}")


# ---------------------------------------------------------------------------------------------
# the Hugging Face hub: auto-converted parquet files

PARQUET_REVISION = "refs/convert/parquet"  # the branch holding the hub's parquet conversion
# Written last, once every file of the split is on disk: its presence means "complete". It lists
# the files with their sha256 (the hub's, else that of the file downloaded), checked at each load.
FILE_COUNT_NAME = "num_files.json"


def hf_parquet_url(dataset_id: str, config: str, split: str, file_index: int = 0) -> str:
    """URL of one file of the hub's parquet conversion (branch refs/convert/parquet)."""
    revision = urllib.parse.quote(PARQUET_REVISION, safe="")
    return f"{hf_endpoint()}/datasets/{dataset_id}/resolve/{revision}/{config}/{split}/{file_index:04d}.parquet"


def hf_cache_dir(dataset_id: str, config: str, split: str) -> Path:
    """$HF_HOME/nanochat_datasets/... when HF_HOME is set, else $NANOCHAT_BASE_DIR/hf_datasets/..."""
    home = os.environ.get("HF_HOME")
    root = Path(home) / "nanochat_datasets" if home else get_base_dir() / "hf_datasets"
    return root / dataset_id.replace("/", "__") / config / split


def check_parquet_readable(path: Path) -> None:
    """Validation for downloads: the whole file decodes (a truncated or garbled file raises)."""
    pq.read_table(path)


def is_hf_cached(dataset_id: str, config: str, split: str) -> bool:
    return (hf_cache_dir(dataset_id, config, split) / FILE_COUNT_NAME).is_file()


def list_hf_files(dataset_id: str, config: str, split: str, retries: int = 3, backoff: float = 1.0) -> list[dict] | None:
    """The split's parquet files from the hub's listing API, in order: [{"index", "sha256"}]; None
    when the hub answers 404 (no such dataset, or a mirror without the API)."""
    try:
        tree = hub_tree(dataset_id, PARQUET_REVISION, f"{config}/{split}", retries=retries, backoff=backoff)
    except DownloadError as e:
        if e.reason.startswith("HTTP 404"):
            return None
        raise
    pattern = re.compile(rf"^{re.escape(config)}/{re.escape(split)}/(\d+)\.parquet$")
    found = sorted((int(m.group(1)), meta.get("sha256")) for path, meta in tree.items() if (m := pattern.match(path)))
    return [{"index": index, "sha256": sha256} for index, sha256 in found]


def load_hf_rows(dataset_id: str, config: str, split: str, retries: int = 5, backoff: float = 1.0) -> list[dict]:
    """Every row of a hub split, downloading its parquet files on first use (one process at a
    time: a file lock per split).

    The files come from the hub's listing API, each checked against the hub's sha256; a hub
    without that API (404) is probed 0000, 0001, ... until the first 404 (a 404 on 0000 means no
    such dataset/config/split). Each file is fully decoded before it is kept; a bad one is fetched
    again, and a cached one whose sha256 changed since is fetched again too. Under
    HF_HUB_OFFLINE=1 only the cache is read, without a network call.
    """
    cache = hf_cache_dir(dataset_id, config, split)
    count_file = cache / FILE_COUNT_NAME
    with file_lock(cache.parent / f"{split}.lock"):
        if count_file.is_file():
            listed = json.loads(count_file.read_text())
            files = listed.get("files") or [{"index": i, "sha256": None} for i in range(listed["num_files"])]
            paths = [_cached_hf_file(dataset_id, config, split, f["index"], f["sha256"], retries, backoff) for f in files]
            return [row for path in paths for row in pq.read_table(path).to_pylist()]
        if hf_offline():
            raise FileNotFoundError(f"HF_HUB_OFFLINE=1 and {dataset_id} {config}/{split} is not cached in {cache}: unset it once to download")
        files = list_hf_files(dataset_id, config, split, retries, backoff)
        if files is None:
            paths = _probe_hf_files(dataset_id, config, split, retries, backoff)
        elif not files:
            raise FileNotFoundError(f"the hub lists no parquet files for dataset {dataset_id!r} config {config!r} split {split!r}: check the names")
        else:
            paths = [_download_hf_file(dataset_id, config, split, f["index"], f["sha256"], retries, backoff) for f in files]
        entries = [{"index": int(p.stem), "sha256": sha256_file(p)} for p in paths]
        tmp = count_file.with_name(f"{FILE_COUNT_NAME}.{os.getpid()}.part")
        tmp.write_text(json.dumps({"num_files": len(paths), "files": entries}))
        os.replace(tmp, count_file)
    return [row for path in paths for row in pq.read_table(path).to_pylist()]


def _probe_hf_files(dataset_id: str, config: str, split: str, retries: int, backoff: float) -> list[Path]:
    paths: list[Path] = []
    while True:
        try:
            paths.append(_download_hf_file(dataset_id, config, split, len(paths), None, retries, backoff))
        except DownloadError as e:
            if not e.reason.startswith("HTTP 404"):
                raise
            if not paths:
                raise FileNotFoundError(
                    f"no parquet files for dataset {dataset_id!r} config {config!r} split {split!r} at {e.url} (HTTP 404): check the names"
                ) from None
            return paths


def _cached_hf_file(dataset_id: str, config: str, split: str, index: int, sha256: str | None, retries: int, backoff: float) -> Path:
    """A file of a cached split, fetched again when missing or no longer matching its sha256."""
    dest = hf_cache_dir(dataset_id, config, split) / f"{index:04d}.parquet"
    if dest.exists() and sha256 is not None and sha256_file(dest) != sha256:
        if hf_offline():
            raise FileNotFoundError(f"{dest} fails its sha256 check and HF_HUB_OFFLINE=1 forbids fetching it again")
        print0(f"{dest} fails its sha256 check: fetching it again")
        dest.unlink()
    if not dest.exists() and hf_offline():
        raise FileNotFoundError(f"{dest} is missing and HF_HUB_OFFLINE=1 forbids fetching it")
    return _download_hf_file(dataset_id, config, split, index, sha256, retries, backoff)


def _download_hf_file(dataset_id: str, config: str, split: str, index: int, sha256: str | None, retries: int, backoff: float) -> Path:
    url = hf_parquet_url(dataset_id, config, split, index)
    dest = hf_cache_dir(dataset_id, config, split) / f"{index:04d}.parquet"
    if not dest.exists():
        print0(f"downloading {url}")
    return download_file(url, dest, validate=check_parquet_readable, retries=retries, backoff=backoff, sha256=sha256, headers=hub_headers(url))


def resolve_source(source: str, dataset_id: str, config: str, split: str) -> str:
    """"online" or "offline" for a task's `source` ("auto" | "online" | "offline")."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {'|'.join(SOURCES)}, got {source!r}")
    if source != "auto":
        return source
    if is_hf_cached(dataset_id, config, split) or reachable(hf_endpoint(), REACHABLE_TIMEOUT_S):
        return "online"
    reason = "HF_HUB_OFFLINE=1" if hf_offline() else f"{hf_endpoint()} is unreachable"
    print0(f"{reason}: using offline data for {dataset_id} {config}/{split}")
    return "offline"


def load_task_rows(source: str, dataset_id: str, config: str, split: str) -> list[dict]:
    """A hub split's rows, online (downloaded, cached) or offline (tasks/fixtures.py stand-in)."""
    if resolve_source(source, dataset_id, config, split) == "online":
        return load_hf_rows(dataset_id, config, split)
    return offline_rows(dataset_id, config)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {'|'.join(allowed)}, got {value!r}")
