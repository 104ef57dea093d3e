"""Atomic checkpoints with everything needed for an exact resume.

Layout of one checkpoint directory (e.g. $NANOCHAT_BASE_DIR/base_checkpoints/d6):

    model_000200.pt              model state_dict (rank 0)
    state_000200_rank0.pt        optimizer states, dataloader state, RNG state (one file per rank)
    meta_000200.json             flags, step, val bpb, model config... written LAST

Every file is written to a temporary name and renamed into place, and the meta file is written
only after the others are complete: a checkpoint "exists" iff its meta file exists, so a save
interrupted half-way leaves the previous checkpoint as the last good one; the temp files a killed
save leaves (`.model_000200.pt.*.tmp`) are removed by the next save and by a resume. Loading uses
`torch.load(weights_only=True, mmap=True)`: checkpoints hold tensors and plain containers only,
tensors are read from the mapped file as they are copied where they go (no full copy in host RAM
first), and weights that are not finite are refused.

Health: a training run records in each meta, once it is known, the `loss` of the checkpoint's
weights (the next training batch's loss: a resumed run computes exactly this loss first) and
whether it was `healthy` (nanochat.trainer.Guard). Pruning never deletes the newest healthy one.

How a checkpoint becomes a model, for every entry point: `load_model` (a stage's checkpoint by
kind and -c: a tag, a directory or a model_NNNNNN.pt file; or a directory) builds the GPT from the saved model_config, with `overrides` for
the fields a run may change (memory options, context length), and loads the weights;
`load_chat_model` adds the tokenizer and the inference dtype for chat_cli/chat_web/chat_eval.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from nanochat.common import atomic_write, get_base_dir, print0, resolve_dtype
from nanochat.config import CheckpointFlags, UserError
from nanochat.gpt import GPT, GPTConfig, config_from_dict
from nanochat.hf import load_hf
from nanochat.tokenizer import Tokenizer, get_tokenizer

META_RE = re.compile(r"^meta_(\d{6})\.json$")
MODEL_FILE_RE = re.compile(r"^model_(\d{6})\.pt$")
STALE_TMP_RE = re.compile(r"^\.(model|state|meta)_\d{6}.*\.tmp$")  # common.atomic_write's temp names
TRAIN_SCRIPT = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}


class CheckpointError(UserError, RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message says which file and why."""


def checkpoint_dir(kind: str, model_tag: str) -> Path:
    """e.g. checkpoint_dir("base", "d6") -> $NANOCHAT_BASE_DIR/base_checkpoints/d6"""
    return get_base_dir() / f"{kind}_checkpoints" / model_tag


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch's CPU generator, Python's, and (with CUDA) the generator of
    this rank's own GPU only (the current device), so the state file fits any number of visible GPUs."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng_to_plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state(). Older checkpoints hold a list with one CUDA state per GPU visible when
    they were saved: the entry of this rank's device is taken; when there is none (fewer GPUs were
    visible then), one line says that CUDA random numbers will differ from the original run."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" not in state or not torch.cuda.is_available():
        return
    device, cuda = torch.cuda.current_device(), state["cuda"]
    if isinstance(cuda, (list, tuple)):
        if device >= len(cuda):
            print0(f"warning: the checkpoint holds CUDA RNG states for {len(cuda)} GPU(s), none for cuda:{device}: "
                   f"CUDA random numbers after this resume differ from the original run's")
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)


def _python_rng_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(
    directory: Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    rank_state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
    rank: int = 0,
    keep_last: int = 2,
) -> None:
    """Save one checkpoint. Every rank calls this with its own `rank_state` (optimizer shards,
    dataloader position, RNG); rank 0 also passes `model_state` and `meta`. With several ranks,
    the caller must barrier between the rank-state writes and rank 0's meta write: then no temp
    file in the directory is being written, and stale ones are removed before the meta file."""
    directory = Path(directory)
    if model_state is not None:
        atomic_write(directory / f"model_{step:06d}.pt", lambda f: torch.save(model_state, f))
    if rank_state is not None:
        atomic_write(directory / f"state_{step:06d}_rank{rank}.pt", lambda f: torch.save(rank_state, f))
    if meta is not None:
        remove_stale_temp_files(directory)
        write_meta(directory, step, meta)
        prune_checkpoints(directory, keep_last)


def write_meta(directory: Path, step: int, meta: dict[str, Any]) -> None:
    text = json.dumps({**meta, "step": step}, indent=2, default=str).encode()
    atomic_write(Path(directory) / f"meta_{step:06d}.json", lambda f: f.write(text))


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files of interrupted checkpoint writes; call only while no save is running."""
    directory = Path(directory)
    stale = [p for p in directory.iterdir() if STALE_TMP_RE.match(p.name)] if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def complete_steps(directory: Path) -> list[int]:
    """Steps whose meta file exists (complete checkpoints), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := META_RE.match(p.name)))


def healthy_steps(directory: Path) -> list[int]:
    """Complete checkpoints whose meta records a healthy loss (nanochat.trainer.Guard), ascending."""
    healthy = []
    for step in complete_steps(directory):
        try:
            meta = load_meta(directory, step)
        except CheckpointError:
            continue
        if meta.get("healthy") is True:
            healthy.append(step)
    return healthy


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps everything) and the
    newest one whose loss was healthy: a diverging run never prunes its last good state away."""
    if keep_last <= 0:
        return
    steps = complete_steps(directory)
    healthy = healthy_steps(directory) if len(steps) > keep_last else []
    for step in steps[:-keep_last]:
        if healthy and step == healthy[-1]:
            continue
        # meta first: the checkpoint stops existing before its pieces disappear
        (directory / f"meta_{step:06d}.json").unlink(missing_ok=True)
        for p in directory.glob(f"*_{step:06d}*.pt"):
            p.unlink(missing_ok=True)


def last_step(directory: Path) -> int | None:
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def load_failure(e: BaseException) -> str:
    """A torch.load failure as a short line: its type and first sentence, without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e)).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(". ") if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler's notes on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint file {path}: {load_failure(e)}") from e


def load_meta(directory: Path, step: int) -> dict[str, Any]:
    path = Path(directory) / f"meta_{step:06d}.json"
    if not path.exists():
        have = complete_steps(directory)
        raise CheckpointError(f"no complete checkpoint at step {step} in {directory} (available steps: {have or 'none'})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint metadata {path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint metadata {path}: {e}") from None


def load_checkpoint(directory: Path, step: int, rank: int = 0, load_rank_state: bool = True) -> tuple[dict, dict | None, dict]:
    """(model_state, rank_state or None, meta) of a complete checkpoint."""
    directory = Path(directory)
    meta = load_meta(directory, step)
    model_state = _load(directory / f"model_{step:06d}.pt")
    rank_state = None
    if load_rank_state:
        path = directory / f"state_{step:06d}_rank{rank}.pt"
        if not path.exists():
            saved = meta.get("world_size", 1)
            raise CheckpointError(f"no state for rank {rank} at step {step} in {directory}: it was saved with world size {saved}")
        rank_state = _load(path)
    return model_state, rank_state, meta


def check_finite_state(state: dict[str, Any], source: str) -> None:
    """CheckpointError naming the first floating tensor of `state` with a NaN or an infinity."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint {source} has non-finite values in {name}: it was saved after the run "
                                  f"diverged; use an earlier checkpoint")


def load_model_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line explanation when the checkpoint does not fit the model or
    holds non-finite weights."""
    check_finite_state(state, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {source} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {source} does not match the model: {name} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=True)


def is_checkpoint_path(model_tag: str) -> bool:
    """Whether -c names a path (a checkpoint directory or a model_NNNNNN.pt file) rather than a tag
    under <kind>_checkpoints/ (d12): it has a path separator, starts with ~ or is . or .., or ends in .pt."""
    return (model_tag.endswith(".pt") or "/" in model_tag or os.sep in model_tag or model_tag in (".", "..")
            or model_tag.startswith("~"))


def resolve_checkpoint(kind: str, model_tag: str = "", step: int = -1) -> tuple[Path, int]:
    """(directory, step) of the complete checkpoint that -c and --step name. -c is a tag under
    <kind>_checkpoints/ (d12), a checkpoint directory, or a model_NNNNNN.pt file (that step of its
    directory); empty, the newest directory of `kind` (base|mid|sft|rl). --step -1 is the last
    complete step. A file and a --step that disagree are refused, naming both."""
    if model_tag.endswith(".pt"):
        path = Path(model_tag).expanduser()
        match = MODEL_FILE_RE.match(path.name)
        if match is None:
            raise CheckpointError(f"{model_tag}: expected a checkpoint's model_NNNNNN.pt file (e.g. model_000100.pt), "
                                  f"a checkpoint directory or a tag (d12)")
        file_step = int(match.group(1))
        if step >= 0 and step != file_step:
            raise CheckpointError(f"{model_tag} is step {file_step} but --step={step}: give one of them")
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file {path}")
        load_meta(path.parent, file_step)  # a checkpoint exists iff its meta file does
        return path.parent, file_step
    if is_checkpoint_path(model_tag):
        directory = Path(model_tag).expanduser()
        if not complete_steps(directory):
            what = "no complete checkpoint (meta_NNNNNN.json) in" if directory.is_dir() else "no checkpoint directory"
            raise CheckpointError(f"{what} {directory}")
    elif model_tag:
        directory = get_base_dir() / f"{kind}_checkpoints" / model_tag
        if not complete_steps(directory):
            raise CheckpointError(f"no complete {kind} checkpoint in {directory}")
    else:
        root = get_base_dir() / f"{kind}_checkpoints"
        candidates = [d for d in root.iterdir() if d.is_dir() and complete_steps(d)] if root.is_dir() else []
        if not candidates:
            raise CheckpointError(f"no {kind} checkpoints under {root}: train one first "
                                  f"(python -m scripts.{TRAIN_SCRIPT.get(kind, kind)})")
        directory = max(candidates, key=lambda d: (d / f"meta_{complete_steps(d)[-1]:06d}.json").stat().st_mtime)
    return directory, step if step >= 0 else complete_steps(directory)[-1]


def checkpoint_history(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The metas of the checkpoints a checkpoint was trained from, oldest first, ending with `meta`
    (each chat stage's meta names its source: {"dir", "step"}). Stops at a source that is gone or
    unreadable, or at a start from a Hugging Face folder: the first entry is then not a "base" stage."""
    history = [meta]
    while isinstance(source := history[0].get("source"), dict) and len(history) < len(TRAIN_SCRIPT) + 1:
        try:
            history.insert(0, load_meta(Path(source["dir"]), int(source["step"])))
        except (CheckpointError, KeyError, TypeError, ValueError):
            break
    return history


def load_weights(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """Every parameter of `model` from `state` (same names and shapes, else CheckpointError).
    Buffers (MoleGrad's tracked subspace) are taken where the checkpoint has them with the same
    shape and keep their fresh values otherwise, so a model trained dense can continue with
    MoleGrad and the other way round. (Resuming a run uses load_model_state_strict instead.)"""
    check_finite_state(state, source)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {source} does not match the model: missing parameters {missing[:3]}")
    own = model.state_dict()
    for name, value in state.items():
        if name in params and value.shape != params[name].shape:
            raise CheckpointError(f"checkpoint {source} does not match the model: {name} has shape "
                                  f"{tuple(value.shape)}, model expects {tuple(params[name].shape)}")
    usable = {name: value for name, value in state.items()
              if name in own and (not isinstance(value, torch.Tensor) or value.shape == own[name].shape)}
    model.load_state_dict(usable, strict=False)


def load_model(
    source: str = "",
    model_tag: str = "",
    step: int = -1,
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
    directory: Path | None = None,
    weights: bool = True,
    hf_dir: str | Path = "",
) -> tuple[GPT, dict[str, Any]]:
    """A trained GPT (in eval mode) and its metadata, from the last (or given) complete step of
    `directory`, or of the checkpoint that `model_tag` (-c: a tag, directory or model_NNNNNN.pt
    file; empty = the newest of kind `source`) and `step` name (resolve_checkpoint), or from the
    Hugging Face NanoChat folder `hf_dir` (--init_from_hf, nanochat/hf.py) when given.

    `overrides`: GPTConfig fields that differ from the saved model_config (recompute, MoleGrad
    options, sequence_len). weights=False builds the architecture only (a resumed run loads its
    own weights)."""
    if hf_dir:
        model, _ = load_hf(hf_dir, **(overrides or {}))
        model.to(device)
        model.eval()
        return model, {"checkpoint_dir": str(hf_dir), "step": 0, "model_config": dataclasses.asdict(model.config),
                       "tokenizer_dir": str(hf_dir)}
    if directory is None:
        directory, step = resolve_checkpoint(source, model_tag, step)
    elif step < 0:
        step = last_step(directory)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory}")
    meta = load_meta(directory, step)
    try:
        config = GPTConfig(**{**config_from_dict(meta["model_config"]), **(overrides or {})})
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint metadata in {directory} step {step} has no usable model_config: {e}") from e
    with torch.device(device):  # built where it runs: the weights go from the mapped file straight there
        model = GPT(config)
    if weights:
        model_state, _, _ = load_checkpoint(directory, step, load_rank_state=False)
        load_weights(model, model_state, f"{directory} step {step}")
    model.eval()
    return model, {**meta, "checkpoint_dir": str(directory), "step": step}


def inference_dtype(device_type: str, override: str) -> torch.dtype:
    """The dtype of the weights for decoding: bf16 on CUDA (when native); float32 on CPU and MPS,
    where decode steps were not faster with bf16 weights (python -m bench.inference
    --dtypes=float32,bfloat16; on a CPU bf16 weights compute in fp32 unless under autocast)."""
    if override == "auto" and device_type != "cuda":
        return torch.float32
    return resolve_dtype(device_type, override)


def load_chat_model(flags: CheckpointFlags, device: torch.device, dtype: str = "auto") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """(model in eval mode with weights in the inference dtype, tokenizer, checkpoint meta) of the
    checkpoint `flags` name, for every entry point that reads one; raises CheckpointError /
    FileNotFoundError naming what is missing or mismatched. With --init_from_hf, the model and
    tokenizer of that folder; a checkpoint trained from one keeps using its tokenizer."""
    model, meta = load_model(flags.source, flags.model_tag, flags.step, device, hf_dir=flags.init_from_hf)
    tokenizer = get_tokenizer(meta.get("tokenizer_dir") or None)
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise CheckpointError(f"checkpoint {meta['checkpoint_dir']} has vocab_size {model.config.vocab_size} but the "
                              f"tokenizer has {tokenizer.get_vocab_size()}: was the tokenizer retrained after this model?")
    model.to(inference_dtype(device.type, dtype))
    return model, tokenizer, meta
