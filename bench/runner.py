"""What the training benches share (bench/molegrad_quality.py, bench/recipe.py, bench/molegrad.py):

- the token data: the bench's own BPE tokenizer trained on the corpus, a training stream and two
  disjoint val splits (selection, where choices are made; held-out, where numbers are reported),
  tokenized once and cached in a file that every worker process reads;
- running: a pool of 1-thread worker processes (or this process, jobs=1) fed by `drive` until the
  plan, which may grow with the results, is done; results resumed from the bench's JSON file;
- reporting: provenance (command, git revision and diff stat, machine, versions), atomic JSON, goals;
- the captured-energy probe: the share of a step's dense weight gradient that a compressed update
  (MoleGrad's dW Q, GaLore's projection) sees, computed on a dense twin of the model; and, from the
  same dense gradients, the per-layer-type subspace diagnostics of issue 26 (subspace_diagnostics).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import torch

from nanochat.common import RunContext, compute_init, print0
from nanochat.config import UserError
from nanochat.dataloader import DataLoader
from nanochat.dataset import iter_texts
from nanochat.gpt import BLOCK_LINEARS, GPT, GPTConfig
from nanochat.molegrad import MoleGradLinear
from nanochat.report import git_info, hardware_info, software_info
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# data: tokenized once, shared by every run (and every worker process) through a cache file

@dataclass
class TokenData:
    train: torch.Tensor  # (steps, batch, seq_len + 1) int32: the training stream of the largest budget
    selection: torch.Tensor  # (batches, batch, seq_len + 1): where choices (LR, pieces) are made
    heldout: torch.Tensor  # (batches, batch, seq_len + 1): where every number is reported
    token_bytes: torch.Tensor  # (vocab,) bytes per token id
    vocab_size: int

    def batches(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b[:, :-1].long(), b[:, 1:].long()) for b in rows]


def stack_batches(loader: DataLoader, count: int) -> torch.Tensor:
    rows = []
    for _ in range(count):
        inputs, targets = loader.next_batch()
        rows.append(torch.cat((inputs, targets[:, -1:]), dim=1).to(torch.int32))  # targets = inputs shifted by one
    return torch.stack(rows)


def prepare_data(cfg: Any, cache: Path, steps: int) -> TokenData:
    """Train the bench's tokenizer, tokenize `steps` training batches and the two val splits;
    cached. Reads cfg's vocab_size, tokenizer_chars, seq_len, batch_size and eval_tokens only."""
    key = {"vocab_size": cfg.vocab_size, "tokenizer_chars": cfg.tokenizer_chars, "seq_len": cfg.seq_len,
           "batch_size": cfg.batch_size, "steps": steps, "eval_tokens": cfg.eval_tokens}
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            return TokenData(saved["train"], saved["selection"], saved["heldout"], saved["token_bytes"], int(saved["vocab_size"]))
    tokenizer = Tokenizer.train_from_iterator(iter_texts("train", cfg.tokenizer_chars, 10_000), cfg.vocab_size)
    train = DataLoader(tokenizer, cfg.batch_size, cfg.seq_len, "train")
    val = DataLoader(tokenizer, cfg.batch_size, cfg.seq_len, "val")
    eval_batches = max(1, cfg.eval_tokens // (cfg.batch_size * cfg.seq_len))
    data = TokenData(stack_batches(train, steps), stack_batches(val, eval_batches),
                     stack_batches(val, eval_batches), tokenizer.token_bytes(), tokenizer.get_vocab_size())
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": json.dumps(key, sort_keys=True), **{k: v for k, v in asdict(data).items()}}, cache)
    return data


# ---------------------------------------------------------------------------------------------
# running: worker processes, the plan driven to its end, results resumed

_WORKER: dict[str, Any] = {}


def init_worker(config_type: type, cfg_dict: dict[str, Any], cache: str, steps: int, train_run: Callable) -> None:
    """Set up a worker (or this process, jobs=1): the bench's config, a 1-thread CPU context, the
    token data, and the function that trains one run, train_run(spec, data, cfg, ctx)."""
    cfg = config_type(**cfg_dict)
    _WORKER.update(cfg=cfg, ctx=compute_init(device="cpu", dtype=cfg.dtype, threads=1),
                   data=prepare_data(cfg, Path(cache), steps), train_run=train_run)


def run_in_worker(spec: Any) -> dict[str, Any]:
    return _WORKER["train_run"](spec, _WORKER["data"], _WORKER["cfg"], _WORKER["ctx"])


class InlinePool:
    """jobs=1: each run in this process, when submitted."""

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def submit(self, fn: Any, spec: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(spec))
        return future


def make_pool(jobs: int, initializer: Any, initargs: tuple) -> Any:
    """`jobs` spawned worker processes, each set up by initializer(*initargs); jobs=1: this process."""
    if jobs == 1:
        initializer(*initargs)
        return InlinePool()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=initializer,
                               initargs=initargs)


def drive(pool: Any, worker: Any, needed: Any, runs: dict[str, dict[str, Any]], revision: str,
          finished: Any) -> None:
    """Submit every spec `needed(runs)` calls for and is not done or queued, collect results as
    they finish (each stamped with the git revision, stored in `runs`, then `finished(spec,
    result)`: print and save), and ask again, until nothing is pending: the plan may grow with the
    results (an LR sweep's edge, a combination chosen from a screen)."""
    pending: dict[Future, Any] = {}
    queued = set(runs)
    while True:
        for spec in needed(runs):
            if spec.key not in queued:
                queued.add(spec.key)
                pending[pool.submit(worker, spec)] = spec
        if not pending:
            return
        future = next(as_completed(list(pending)))
        spec = pending.pop(future)
        result = {**future.result(), "git_revision": revision}
        runs[result["key"]] = result
        finished(spec, result)


def load_results(path: Path, cfg: Any, ignored: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Finished runs (key -> run) of a previous invocation whose config, the fields `ignored` left
    out, equals cfg's; UserError if the file holds results of other settings."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    # a field added to the config since the file was written counts at its default
    defaults = {f.name: f.default for f in fields(cfg)}
    if {k: v for k, v in {**defaults, **saved.get("config", {})}.items() if k not in ignored} != \
            {k: v for k, v in asdict(cfg).items() if k not in ignored}:
        raise UserError(f"{path} holds results of other settings: pass another --out, or delete it to start over")
    return {run["key"]: run for run in saved.get("runs", [])}


# ---------------------------------------------------------------------------------------------
# reporting

def provenance(argv: list[str], module: str) -> dict[str, Any]:
    """What ran: the command, git revision and diff stat, machine and versions."""
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        galore = version("galore-torch")
    except PackageNotFoundError:
        galore = "not installed"
    return {"command": f"python -m {module} " + shlex.join(argv), "git": git_info(),
            "git_revision": run(["git", "rev-parse", "HEAD"]), "git_diff_stat": run(["git", "diff", "--stat", "HEAD"]),
            "machine": hardware_info(), "software": {**software_info(), "galore_torch": galore}}


def write_json(path: Path, value: dict[str, Any]) -> None:
    """`value` as JSON at `path`, atomically (a crash never leaves half a results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def print_goals(goals: dict[str, bool | None]) -> None:
    for goal, passed in goals.items():
        print0(f"  {'n/a ' if passed is None else 'PASS' if passed else 'FAIL'}  {goal}")


# ---------------------------------------------------------------------------------------------
# captured gradient energy

def block_matrices(model: GPT) -> dict[str, torch.nn.Module]:
    """'<layer>.<linear name>' -> the Linear, for every block."""
    return {f"{i}.{name}": block.get_submodule(name) for i, block in enumerate(model.transformer.h) for name in BLOCK_LINEARS}


def dense_twin(config: GPTConfig) -> GPT:
    """The model of `config` with dense weight gradients (no MoleGrad, no recompute): the probe's
    reference, loaded with the trained model's weights before each probe."""
    return GPT(replace(config, molegrad_rank_k=0, recompute="none", molegrad_keep_h=False, molegrad_momentum="dense",
                       molegrad_subspace="principal"))


def energy_of(grad: torch.Tensor, layer: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> float | None:
    """‖captured part of grad‖² / ‖grad‖² for a MoleGrad layer or a GaLore matrix; None for a dense
    one, or for a zero gradient (every block matrix but c_proj at init, as c_proj starts at 0)."""
    total = grad.square().sum()
    if total == 0:
        return None
    if isinstance(layer, MoleGradLinear):
        return float((grad @ layer.Q.to(grad.dtype)).square().sum() / total)  # ‖dW Q‖²
    for opt in optimizers:
        group = next((g for g in opt.param_groups if "rank" in g and any(p is layer.weight for p in g["params"])), None)
        if group is None:
            continue
        state = opt.state.get(layer.weight, {})
        if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
            # this step's projection is the top-r SVD of this gradient: it keeps the top-r energy
            singular = torch.linalg.svdvals(grad)
            return float(singular[:group["rank"]].square().sum() / singular.square().sum())
        ortho = state["projector"].ortho_matrix
        captured = grad @ ortho.t() if grad.shape[0] >= grad.shape[1] else ortho.t() @ grad
        return float(captured.square().sum() / total)
    return None


def dense_gradients(model: GPT, twin: GPT, batch: tuple[torch.Tensor, torch.Tensor], ctx: RunContext) -> dict[str, torch.Tensor]:
    """This step's dense weight gradient of every block matrix ('<layer>.<name>' -> (out, in) float32),
    from the dense twin loaded with the model's weights; the model itself is not touched."""
    twin_keys = twin.state_dict().keys()
    twin.load_state_dict({key: value for key, value in model.state_dict().items() if key in twin_keys})
    twin.zero_grad(set_to_none=True)
    with ctx.autocast():
        loss = twin(*batch)
    loss.backward()
    return {key: linear.weight.grad.float() for key, linear in block_matrices(twin).items()}


def mean_energy(model: GPT, gradients: dict[str, torch.Tensor], optimizers: list[torch.optim.Optimizer]) -> float | None:
    """Mean over compressed matrices of the energy of the dense gradients they capture (energy_of)."""
    energies = [energy_of(gradients[key], layer, optimizers) for key, layer in block_matrices(model).items()]
    energies = [e for e in energies if e is not None]
    return sum(energies) / len(energies) if energies else None


def captured_energy(model: GPT, twin: GPT, optimizers: list[torch.optim.Optimizer],
                    batch: tuple[torch.Tensor, torch.Tensor], ctx: RunContext) -> float | None:
    """Mean over compressed matrices of the energy of this step's dense gradient they capture."""
    return mean_energy(model, dense_gradients(model, twin, batch, ctx), optimizers)


# ---------------------------------------------------------------------------------------------
# subspace diagnostics (issue 26): where MoleGrad's Q stands against the gradient it compresses

# GPT's block Linears -> the layer types the diagnostics report
LAYER_TYPES = {"attn.c_q": "q", "attn.c_k": "k", "attn.c_v": "v", "attn.c_proj": "attn_proj",
               "mlp.c_fc": "mlp_fc", "mlp.c_proj": "mlp_proj"}


def molegrad_bases(model: GPT) -> dict[str, torch.Tensor]:
    """'<layer>.<name>' -> a copy of each MoleGrad layer's Q (in, k): what a later overlap compares with."""
    return {key: layer.Q.detach().clone() for key, layer in block_matrices(model).items() if isinstance(layer, MoleGradLinear)}


def layer_diagnostics(grad: torch.Tensor, layer: MoleGradLinear, earlier: torch.Tensor | None,
                      n_head: int | None) -> dict[str, Any]:
    """For one MoleGrad layer and this step's dense gradient D = dW (out, in), D ≠ 0; Q (in, k):
        captured            ‖D Q‖² / ‖D‖²: the share of the gradient's energy the update can see
        captured_principal  the same for Q's tracked principal columns alone (< captured only when unbiased)
        optimal             Σ_(i≤k) σ_i² / Σ σ_i²: the best any k-dim input subspace captures (D's own top-k)
        topk_overlap        ‖Qᵀ V_k‖²_F / k, V_k D's top-k right singular vectors: 1 = Q is D's subspace
        self_overlap        ‖Qᵀ Q_earlier‖²_F / k: 1 = Q has not moved (a frozen subspace, H2)
        q_max_row           max_i ‖Q[i, :]‖²: 1 = a column of Q is one input coordinate (massive activations, H3)
    and, with n_head (attention's c_proj, input = the heads side by side), per head h: head_share
    ‖D_h‖² / ‖D‖² and head_captured ‖(D Q Qᵀ)_h‖² / ‖D_h‖², D_h the head's input columns (H3)."""
    q = layer.Q.to(grad.dtype)
    total = grad.square().sum()
    singular, right = torch.linalg.svd(grad, full_matrices=False)[1:]  # (r,), (r, in)
    k = layer.rank_k
    top = right[:k].T                                                     # (in, ≤k)
    result: dict[str, Any] = {
        "captured": float((grad @ q).square().sum() / total),
        "captured_principal": float((grad @ q[:, :layer.principal_k]).square().sum() / total),
        "optimal": float(singular[:k].square().sum() / singular.square().sum()),
        "topk_overlap": float((q.T @ top).square().sum() / k),
        "self_overlap": None if earlier is None else float((q.T @ earlier.to(q.dtype)).square().sum() / k),
        "q_max_row": float(q.square().sum(dim=1).max()),
    }
    if n_head is not None:
        captured = grad @ q @ q.T                                         # (out, in)
        heads = grad.view(grad.shape[0], n_head, -1).square().sum(dim=(0, 2))          # (n_head,)
        kept = captured.view(grad.shape[0], n_head, -1).square().sum(dim=(0, 2))
        result["head_share"] = (heads / total).tolist()
        result["head_captured"] = [float(c / h) if h > 0 else None for c, h in zip(kept, heads)]
    return result


def subspace_diagnostics(model: GPT, gradients: dict[str, torch.Tensor],
                         earlier: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """Layer type (LAYER_TYPES) -> layer_diagnostics averaged over the blocks, for every MoleGrad layer
    whose dense gradient is not zero (c_proj starts at 0, so at init the other matrices' are); `earlier`:
    molegrad_bases() of some steps before, for the self overlap."""
    per_type: dict[str, list[dict[str, Any]]] = {}
    for key, layer in block_matrices(model).items():
        if not isinstance(layer, MoleGradLinear) or not bool(gradients[key].any()):
            continue
        name = key.split(".", 1)[1]
        heads = model.config.n_head if name == "attn.c_proj" else None
        previous = earlier.get(key) if earlier else None
        per_type.setdefault(LAYER_TYPES[name], []).append(layer_diagnostics(gradients[key], layer, previous, heads))
    return {kind: {metric: mean_of([entry[metric] for entry in entries]) for metric in entries[0]}
            for kind, entries in per_type.items()}


def mean_of(values: list[Any]) -> Any:
    """The mean of floats, elementwise of equal-length lists; None where any value is None."""
    if any(value is None for value in values):
        return None
    if isinstance(values[0], list):
        return [mean_of(list(column)) for column in zip(*values)]
    return sum(values) / len(values)
