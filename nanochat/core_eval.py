"""The CORE metric (DCLM): in-context-learning accuracy on the eval bundle's tasks, centred on
chance and averaged. Model-agnostic: `model(idx)` with idx (B, T) LongTensor -> logits (B, T, vocab)
and `model.config.sequence_len` (its max length) is all it needs.

    bundle_dir = ensure_eval_bundle()            # download + unpack once into $NANOCHAT_BASE_DIR
    out = evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=500)
    out["core_metric"], out["results"][label], out["centered_results"][label]

Bundle layout: eval_bundle/core.yaml (`icl_tasks`), eval_bundle/eval_data/**.jsonl,
eval_bundle/eval_meta_data.csv (`Eval Task`, `Random baseline` in percent).

How one item becomes token sequences (one per option):
- items are put in a fixed order (shuffled with SHUFFLE_SEED) so `max_per_task` takes an unbiased
  subset; item i's `num_fewshot` examples are drawn with random.Random(FEWSHOT_SEED + i) from all
  OTHER items of the task, so an item's prompt does not depend on `max_per_task` or the rank;
- prompt = each few-shot example as `context + delimiter + answer` followed by a blank line
  ("\n\n"), then `context + delimiter + continuation` of the item; contexts and continuations by
  type: multiple_choice (query; each choice), schema (each context option; the continuation),
  language_modeling (context; continuation);
- the delimiter belongs to the context except a final space, which starts the continuation: BPE
  glues a space to the following word (" Paris"), and a delimiter such as "\nAnswer: " should not
  have its "\nAnswer:" tokens scored. For the default " " this is `continuation = " " + choice`;
- the scored span: see `continuation_span`; sequences longer than `sequence_len` lose tokens from
  the left, just after BOS (the continuation is always kept).
Scoring: multiple_choice/schema: the option with the lowest mean loss over its span wins (ties: the
first option); language_modeling: correct iff greedy argmax reproduces every span token.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanochat import distributed

from nanochat.common import get_base_dir, print0, read_jsonl
from nanochat.config import UserError
from nanochat.download import DownloadError, download_file, file_lock, sha256_file

DEFAULT_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# sha256 of the zip at DEFAULT_URL; a different file there (the bundle rotated, a captive portal) is refused
DEFAULT_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"
SHA256_ENV = "NANOCHAT_EVAL_BUNDLE_SHA256"
BUNDLE_DIRNAME = "eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # item i draws its few-shot examples with random.Random(FEWSHOT_SEED + i)
SHUFFLE_SEED = 1337  # the fixed order of a task's items (max_per_task takes a prefix of it)
EXAMPLE_SEPARATOR = "\n\n"  # after every few-shot example


class EvalBundleError(UserError, ValueError):
    """A malformed eval bundle; the message names the file and the field."""


@dataclass
class TaskSpec:
    label: str
    task_type: str  # multiple_choice | schema | language_modeling
    data_path: Path  # the task's jsonl file
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, from eval_meta_data.csv


@dataclass
class RenderedItem:
    """One item as text: option k is contexts[k] + continuations[k]; only the continuation is scored."""

    contexts: list[str]
    continuations: list[str]
    gold: int  # the correct option (0 for language_modeling, which has one)


@dataclass
class PreparedItem:
    """One item as token rows, one per option, each BOS + context + continuation (left-truncated)."""

    tokens: list[list[int]]
    starts: list[int]  # index of the first scored token in each row; the span runs to the row's end
    gold: int


# ---------------------------------------------------------------------------------------------
# the bundle: download, unpack, parse

def bundle_sha256(url: str) -> str | None:
    """The sha256 the zip at `url` must have: $NANOCHAT_EVAL_BUNDLE_SHA256 if set (empty: none),
    else DEFAULT_SHA256 for DEFAULT_URL, else none (a mirror or a test server)."""
    if SHA256_ENV in os.environ:
        return os.environ[SHA256_ENV].strip().lower() or None
    return DEFAULT_SHA256 if url == DEFAULT_URL else None


def ensure_eval_bundle(url: str | None = None, base_dir: Path | None = None, retries: int = 5, backoff: float = 1.0) -> Path:
    """The unpacked bundle directory, base_dir/eval_bundle (default $NANOCHAT_BASE_DIR), downloading
    it first if it has no core.yaml. `url`: default $NANOCHAT_EVAL_BUNDLE_URL, else DEFAULT_URL.

    The zip is verified (its sha256 per `bundle_sha256`, then: opens, every CRC matches, holds
    eval_bundle/core.yaml) before it is kept, and fetched again by download_file when it is not;
    it is unpacked into a temp dir next to the target and renamed into place, so the target is
    either absent or complete. One process at a time does this (a file lock); under
    torch.distributed, rank 0 does the work while the other ranks wait at a barrier (every rank
    must call this).
    """
    base = Path(base_dir) if base_dir is not None else get_base_dir()
    target = base / BUNDLE_DIRNAME
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    sha256 = bundle_sha256(url)
    if not distributed.is_distributed():
        return _download_and_unpack(url, sha256, base, target, retries, backoff)
    if distributed.rank() == 0:
        try:
            return _download_and_unpack(url, sha256, base, target, retries, backoff)
        finally:
            distributed.barrier("eval bundle download")
    distributed.barrier("eval bundle download")
    if not (target / "core.yaml").is_file():
        raise RuntimeError(f"rank 0 failed to prepare the eval bundle at {target} (see its error)")
    return target


def check_bundle_zip(path: Path) -> None:
    """Raise unless `path` is a complete zip (all CRCs good) holding eval_bundle/core.yaml."""
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"{path}: member {bad} fails its CRC check")
        if f"{BUNDLE_DIRNAME}/core.yaml" not in zf.namelist():
            raise zipfile.BadZipFile(f"{path}: no {BUNDLE_DIRNAME}/core.yaml inside")


def _download_and_unpack(url: str, sha256: str | None, base: Path, target: Path, retries: int, backoff: float) -> Path:
    if (target / "core.yaml").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / f"{BUNDLE_DIRNAME}.lock"):
        if (target / "core.yaml").is_file():  # another process unpacked it while we waited
            return target
        return _unpack_locked(url, sha256, base, target, retries, backoff)


def _unpack_locked(url: str, sha256: str | None, base: Path, target: Path, retries: int, backoff: float) -> Path:
    zip_path = base / f"{BUNDLE_DIRNAME}.zip"
    if zip_path.exists():  # left by an interrupted unpack; trust it only if it still checks out
        try:
            check_bundle_zip(zip_path)
            if sha256 is not None and sha256_file(zip_path) != sha256:
                raise zipfile.BadZipFile(f"{zip_path}: sha256 is not {sha256}")
        except (zipfile.BadZipFile, OSError):
            zip_path.unlink()
    print0(f"downloading the CORE eval bundle from {url}")
    try:
        download_file(url, zip_path, validate=check_bundle_zip, retries=retries, backoff=backoff, progress=True, sha256=sha256)
    except DownloadError as e:
        if e.reason.startswith("checksum mismatch"):  # the bundle there changed: say how to accept another
            raise DownloadError(url, f"{e.reason}; {SHA256_ENV}=<sha256> pins another bundle, {SHA256_ENV}= accepts any") from None
        raise
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLE_DIRNAME}.", dir=base))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(staging)  # zipfile drops absolute paths and ".." components
        if target.exists():  # an incomplete directory (no core.yaml) from an older, non-atomic unpack
            shutil.rmtree(target)
        os.replace(staging / BUNDLE_DIRNAME, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what is left: extras such as __MACOSX/
    zip_path.unlink()
    return target


def load_tasks(bundle_dir: Path) -> list[TaskSpec]:
    """The tasks of core.yaml's `icl_tasks`, with random baselines from eval_meta_data.csv."""
    import yaml

    bundle_dir = Path(bundle_dir)
    yaml_path = bundle_dir / "core.yaml"
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise EvalBundleError(f"cannot read {yaml_path}: {e}") from e
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise EvalBundleError(f"{yaml_path}: expected a non-empty list under 'icl_tasks'")
    baselines = _load_baselines(bundle_dir / "eval_meta_data.csv")
    tasks = []
    for i, entry in enumerate(entries):
        where = f"{yaml_path}: icl_tasks[{i}]"
        if not isinstance(entry, dict):
            raise EvalBundleError(f"{where}: expected a mapping, got {entry!r:.80}")
        for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
            if key not in entry:
                raise EvalBundleError(f"{where}: missing field '{key}'")
        label = str(entry["label"])
        where = f"{yaml_path}: task '{label}'"
        task_type = entry["icl_task_type"]
        if task_type not in TASK_TYPES:
            raise EvalBundleError(f"{where}: icl_task_type must be one of {'|'.join(TASK_TYPES)}, got {task_type!r}")
        shots = entry["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots  # a list: use its first value
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise EvalBundleError(f"{where}: num_fewshot must be a list of non-negative integers, got {entry['num_fewshot']!r}")
        delimiter = entry.get("continuation_delimiter", " ")
        if not isinstance(delimiter, str):
            raise EvalBundleError(f"{where}: continuation_delimiter must be a string, got {delimiter!r}")
        data_path = bundle_dir / "eval_data" / str(entry["dataset_uri"])
        if not data_path.is_file():
            raise EvalBundleError(f"{where}: dataset_uri {entry['dataset_uri']!r}: no file {data_path}")
        if label not in baselines:
            raise EvalBundleError(f"{bundle_dir / 'eval_meta_data.csv'}: no row with 'Eval Task' = {label!r} (a task of core.yaml)")
        tasks.append(TaskSpec(label, task_type, data_path, shots, delimiter, baselines[label]))
    return tasks


def _load_baselines(csv_path: Path) -> dict[str, float]:
    """{Eval Task: Random baseline (percent)}."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from spreadsheet exports
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise EvalBundleError(f"cannot read {csv_path}: {e}") from e
    if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
        raise EvalBundleError(f"{csv_path}: expected columns 'Eval Task' and 'Random baseline'")
    baselines = {}
    for line, row in enumerate(rows, start=2):
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise EvalBundleError(f"{csv_path}:{line}: 'Random baseline' must be a number, got {row['Random baseline']!r}") from None
    return baselines


def load_items(task: TaskSpec) -> list[dict[str, Any]]:
    """The task's items in file order, each checked for its type's fields."""
    items = []
    for line_no, item in read_jsonl(task.data_path, EvalBundleError):
        _check_item(item, task.task_type, f"{task.data_path}:{line_no}")
        items.append(item)
    if len(items) <= task.num_fewshot:
        raise EvalBundleError(f"{task.data_path}: task '{task.label}' has {len(items)} items, too few for {task.num_fewshot}-shot prompts drawn from the other items")
    return items


def _check_item(item: Any, task_type: str, where: str) -> None:
    def need(key: str, kind: type, what: str) -> Any:
        value = item.get(key) if isinstance(item, dict) else None
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if ok and kind is list:
            ok = len(value) > 0 and all(isinstance(v, str) for v in value)
        if not ok:
            raise EvalBundleError(f"{where}: field '{key}' must be {what} ({task_type}), got {value!r:.80}")
        return value

    if task_type == "multiple_choice":
        need("query", str, "a string")
        options = need("choices", list, "a non-empty list of strings")
    elif task_type == "schema":
        options = need("context_options", list, "a non-empty list of strings")
        need("continuation", str, "a string")
    else:
        need("context", str, "a string")
        need("continuation", str, "a string")
        return
    gold = need("gold", int, "an integer")
    if not 0 <= gold < len(options):
        raise EvalBundleError(f"{where}: field 'gold' must be in 0..{len(options) - 1}, got {gold}")


# ---------------------------------------------------------------------------------------------
# prompts: text, then tokens

def split_delimiter(delimiter: str) -> tuple[str, str]:
    """(the part that ends the context, the part that starts the continuation): a final space
    moves to the continuation, where BPE joins it to the next word."""
    if delimiter.endswith(" "):
        return delimiter[:-1], " "
    return delimiter, ""


def _solved_example(task: TaskSpec, item: dict[str, Any]) -> tuple[str, str]:
    """(context, answer) of an item used as a few-shot example."""
    if task.task_type == "multiple_choice":
        return item["query"], item["choices"][item["gold"]]
    if task.task_type == "schema":
        return item["context_options"][item["gold"]], item["continuation"]
    return item["context"], item["continuation"]


def fewshot_indices(num_items: int, idx: int, num_fewshot: int) -> list[int]:
    """The items shown as examples before item `idx`: a fixed-seed sample of the others."""
    rng = random.Random(FEWSHOT_SEED + idx)
    # a sample of positions in "all items but idx", mapped back past idx; the same draw as
    # rng.sample([i for i in range(num_items) if i != idx], k) without building that list
    return [j if j < idx else j + 1 for j in rng.sample(range(num_items - 1), num_fewshot)]


def render_item(task: TaskSpec, items: list[dict[str, Any]], idx: int) -> RenderedItem:
    """Item `idx` of `items` (in evaluation order) as text, one (context, continuation) per option."""
    head, tail = split_delimiter(task.continuation_delimiter)
    prefix = ""
    for j in fewshot_indices(len(items), idx, task.num_fewshot):
        context, answer = _solved_example(task, items[j])
        prefix += context + task.continuation_delimiter + answer + EXAMPLE_SEPARATOR
    item = items[idx]
    if task.task_type == "multiple_choice":
        pairs, gold = [(item["query"], choice) for choice in item["choices"]], item["gold"]
    elif task.task_type == "schema":
        pairs, gold = [(option, item["continuation"]) for option in item["context_options"]], item["gold"]
    else:
        pairs, gold = [(item["context"], item["continuation"])], 0
    return RenderedItem([prefix + c + head for c, _ in pairs], [tail + a for _, a in pairs], gold)


def continuation_span(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """(BOS + tokens of context + continuation, index of the first scored token).

    The context and the whole text are tokenized separately; the span starts where the two token
    lists first differ. Without a BPE merge across the boundary that is exactly the
    continuation's tokens. With one (a token that holds the last bytes of the context and the
    first of the continuation, e.g. "=" + "= y" -> " ==", " y"), the context's last tokens differ
    and the span starts earlier, at the first token that differs: it then holds every byte of the
    continuation plus those few bytes of the context, and never cuts a token in two.
    """
    bos = tokenizer.get_bos_token_id()
    context_ids = tokenizer.encode(context, prepend=bos)
    full_ids = tokenizer.encode(context + continuation, prepend=bos)
    start = 0
    for a, b in zip(context_ids, full_ids):
        if a != b:
            break
        start += 1
    if start >= len(full_ids):
        raise ValueError(f"the continuation {continuation!r} adds no tokens after its context")
    return full_ids, start


def truncate_left(tokens: list[int], start: int, max_len: int) -> tuple[list[int], int]:
    """Keep tokens[0] (BOS) and the last max_len - 1 tokens; the scored span must survive whole."""
    excess = len(tokens) - max_len
    if excess <= 0:
        return tokens, start
    if start - excess < 1:
        raise ValueError(f"the scored span ({len(tokens) - start} tokens) does not fit in max length {max_len} after BOS")
    return tokens[:1] + tokens[1 + excess:], start - excess


def prepare_item(tokenizer: Any, task: TaskSpec, items: list[dict[str, Any]], idx: int, max_len: int) -> PreparedItem:
    rendered = render_item(task, items, idx)
    rows, starts = [], []
    for context, continuation in zip(rendered.contexts, rendered.continuations):
        tokens, start = truncate_left(*continuation_span(tokenizer, context, continuation), max_len)
        rows.append(tokens)
        starts.append(start)
    return PreparedItem(rows, starts, rendered.gold)


# ---------------------------------------------------------------------------------------------
# scoring

def first_argmin(values: list[float]) -> int:
    """Index of the smallest value; ties go to the first (lowest index)."""
    return min(range(len(values)), key=values.__getitem__)


@torch.no_grad()
def score_item(model: torch.nn.Module, item: PreparedItem, task_type: str, device: torch.device | str) -> bool:
    """Whether the model gets the item right; all options in one forward."""
    lengths = torch.tensor([len(row) for row in item.tokens])
    T = int(lengths.max())
    # right padding with BOS: every pad sits after every scored position and attention is causal
    batch = torch.tensor([row + row[:1] * (T - len(row)) for row in item.tokens], dtype=torch.long, device=device)  # (B, T)
    logits = model(batch)  # (B, T, vocab)
    if task_type == "language_modeling":
        start, end = item.starts[0], len(item.tokens[0])
        predicted = logits[0, start - 1:end - 1].argmax(dim=-1)  # position t predicts token t + 1
        return bool(torch.equal(predicted, batch[0, start:end]))
    B = batch.size(0)
    losses = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(B, T - 1)
    positions = torch.arange(T - 1).unsqueeze(0)  # (1, T-1): the position predicting token t + 1
    starts = torch.tensor(item.starts).unsqueeze(1)
    scored = ((positions >= starts - 1) & (positions < lengths.unsqueeze(1) - 1)).to(device)  # (B, T-1)
    # float64 sums of float32 losses are exact, so equal per-token losses give exactly equal means
    # and the tie-break below is deterministic
    mean_losses = (losses.double() * scored).sum(dim=1) / scored.sum(dim=1)  # (B,)
    return first_argmin(mean_losses.tolist()) == item.gold


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: TaskSpec, device: torch.device | str, max_per_task: int = -1) -> float:
    """Accuracy on the task's first `max_per_task` items in evaluation order (-1 = all). Under
    torch.distributed, rank r scores items r, r + world_size, ... and the counts are summed."""
    if max_per_task == 0 or max_per_task < -1:
        raise ValueError(f"max_per_task must be -1 (all) or >= 1, got {max_per_task}")
    items = load_items(task)
    random.Random(SHUFFLE_SEED).shuffle(items)
    num_eval = len(items) if max_per_task == -1 else min(max_per_task, len(items))
    several = distributed.is_distributed()
    rank, world_size = (distributed.rank(), distributed.world_size()) if several else (0, 1)
    max_len = model.config.sequence_len
    correct = 0
    for idx in range(rank, num_eval, world_size):
        try:
            item = prepare_item(tokenizer, task, items, idx, max_len)
        except ValueError as e:
            raise ValueError(f"task '{task.label}' ({task.data_path}), item {idx} in evaluation order: {e}") from None
        correct += score_item(model, item, task.task_type, device)
    if several:
        total_correct = torch.tensor(correct, dtype=torch.long, device=device)
        distributed.all_reduce(total_correct, "CORE counts").wait()  # num_eval is known to every rank already
        correct = int(total_correct.item())
    return correct / num_eval


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1; `random_baseline` in percent."""
    chance = random_baseline / 100.0
    return (accuracy - chance) / (1.0 - chance)


def evaluate_core(
    model: torch.nn.Module,
    tokenizer: Any,
    bundle_dir: Path,
    device: torch.device | str,
    max_per_task: int = -1,
    verbose: bool = False,
) -> dict[str, Any]:
    """{"results": {label: accuracy}, "centered_results": {label: centred accuracy},
    "core_metric": mean of the centred accuracies}. The model is put in eval mode and restored."""
    tasks = load_tasks(bundle_dir)
    was_training = model.training
    model.eval()
    results, centered = {}, {}
    try:
        for task in tasks:
            t0 = time.time()
            results[task.label] = evaluate_task(model, tokenizer, task, device, max_per_task)
            centered[task.label] = centered_accuracy(results[task.label], task.random_baseline)
            if verbose:
                print0(f"{task.label:<35} accuracy {results[task.label]:.4f}  centered {centered[task.label]:+.4f}  ({time.time() - t0:.1f}s)")
    finally:
        model.train(was_training)
    core = sum(centered.values()) / len(centered)
    return {"results": results, "centered_results": centered, "core_metric": core}
