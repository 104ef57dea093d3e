"""Two CPU processes against one, same global batch: equal results, and the bytes a step sends,
dense against MoleGrad.

    python -m bench.ddp                                    # width 512, 2 blocks, k=32, 3 steps
    python -m bench.ddp --n_embd=768 --molegrad_rank_k=16 --arms=dense,molegrad,molegrad_lowrank

Arms: dense, molegrad (MoleGrad on --molegrad_targets at --molegrad_rank_k, dense momentum),
molegrad_lowrank (the same, low-rank momentum); each is the memory flags with its ARMS overrides,
the precision flags (--param_dtype, --grad_dtype, --optim_state) included, for every arm.
Every arm trains the same model from the same init on the same global batches through
trainer.train_step, once in this process and once in two gloo processes that each take half of
every batch (the sharded optimizers, as under torchrun). Reported per arm: the loss after the last
step in both, the largest weight difference between them, whether the two ranks hold bitwise the
same model (MoleGrad's Q included), and the bytes each rank sends per step by what they carried
(nanochat.distributed's ring model). For the MoleGrad layers, their traffic (factors (out, k) and
sketch statistics (in, k+e)) is compared with what the same layers cost in the dense arm: the
dense arm's total minus everything the MoleGrad arm sends for the other layers. Table, then one
JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import distributed
from nanochat.common import RunContext
from nanochat.config import check, parse_args
from nanochat.distributed import record_traffic
from nanochat.gpt import GPT, GPTConfig
from nanochat.model_flags import MemoryFlags
from nanochat.molegrad import molegrad_layers
from nanochat.optim import Muon, setup_optimizers
from nanochat.trainer import train_step

# arm -> MemoryFlags overrides
ARMS = {"dense": {}, "molegrad": dict(molegrad=True, molegrad_momentum="dense"),
        "molegrad_lowrank": dict(molegrad=True, molegrad_momentum="lowrank")}
TAGS = ("gradient", "parameter", "molegrad factor", "molegrad statistics", "scalar")
OPTIMIZER = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)


@dataclass
class BenchConfig(MemoryFlags):
    """Two CPU processes against one: equal results, and the bytes a step sends, dense against MoleGrad."""

    n_embd: int = field(default=512, metadata={"help": "model width"})
    n_layer: int = field(default=2, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    n_kv_head: int = field(default=4, metadata={"help": "key/value heads"})
    vocab_size: int = field(default=1024, metadata={"help": "vocabulary (random tokens)"})
    seq_len: int = field(default=64, metadata={"help": "tokens per row"})
    batch_size: int = field(default=8, metadata={"help": "rows per step, all ranks together"})
    steps: int = field(default=3, metadata={"help": "optimizer steps per arm"})
    dtype: str = field(default="float32", metadata={"help": "weights and compute (Newton–Schulz included)",
                                                   "choices": ("float32", "float64")})
    arms: str = field(default="dense,molegrad", metadata={"help": f"comma-separated, from {'|'.join(ARMS)}"})
    seed: int = field(default=0, metadata={"help": "init and data seed"})

    def validate(self) -> None:
        super().validate()
        unknown = [name for name in self.arms.split(",") if name not in ARMS]
        check(not unknown, f"--arms: unknown arm(s) {unknown}, expected some of {'|'.join(ARMS)}")
        check(self.batch_size % 2 == 0, f"--batch_size: expected an even number of rows (two ranks), got {self.batch_size}")
        check(self.steps >= 1, f"--steps: expected >= 1, got {self.steps}")
        for name in self.arms.split(","):
            replace(self, **ARMS[name]).memory_options()  # a flag against the arm's preset: ConfigError


def build_model(cfg: BenchConfig, arm: str) -> GPT:
    config = GPTConfig(sequence_len=cfg.seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, **replace(cfg, **ARMS[arm]).memory_options())
    torch.manual_seed(cfg.seed)
    model = GPT(config)
    model.init_weights()
    model.to(getattr(torch, cfg.dtype))
    for layer in molegrad_layers(model):
        layer.reset_subspace()  # Q orthonormal to the precision of its dtype
    return model


def train_arm(cfg: BenchConfig, arm: str, ctx: RunContext) -> dict[str, Any]:
    """`cfg.steps` steps of one arm on this rank's rows of every global batch."""
    model = build_model(cfg, arm)
    # sharded when a process group is up
    optimizers = setup_optimizers(model, **OPTIMIZER, **replace(cfg, **ARMS[arm]).precision_options(), seed=cfg.seed)
    for opt in optimizers:
        if isinstance(opt, Muon):
            opt.ns_dtype = getattr(torch, cfg.dtype)  # bf16 Newton–Schulz would round the two runs apart
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    rows = cfg.batch_size // ctx.world_size
    mine = slice(ctx.rank * rows, (ctx.rank + 1) * rows)
    losses, traffic_per_step, shapes = [], [], set()
    for _ in range(cfg.steps):
        tokens = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=generator)
        batch = (tokens[mine, :-1], tokens[mine, 1:])
        with record_traffic() as traffic:
            loss, _ = train_step(model, optimizers, iter([batch]), 1, ctx)
        losses.append(loss)
        traffic_per_step.append(traffic.bytes_by_tag())
        shapes |= traffic.shapes()
    return {"losses": losses, "model": model.state_dict(), "parameters": [name for name, _ in model.named_parameters()],
            "traffic": traffic_per_step, "shapes": sorted(shapes),
            "optimizer_state_entries": [len(opt.state) for opt in optimizers],
            "molegrad_weights": [tuple(layer.weight.shape) for layer in molegrad_layers(model)]}


def run_rank(rank: int, world_size: int, cfg: BenchConfig, work_dir: str) -> None:
    """One process: every arm, results to work_dir/{arm}_w{world_size}_r{rank}.pt."""
    if world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        distributed.init_process_group("gloo", init_method=f"file://{work_dir}/store", rank=rank, world_size=world_size)
    ctx = RunContext(torch.device("cpu"), "cpu", torch.float32, world_size > 1, rank, rank, world_size)  # no autocast
    try:
        for arm in cfg.arms.split(","):
            torch.save(train_arm(cfg, arm, ctx), Path(work_dir) / f"{arm}_w{world_size}_r{rank}.pt")
        if world_size > 1:
            dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run_all(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """{arm: {"single": result, "ranks": [rank 0 result, rank 1 result]}}: one process here, two spawned."""
    with tempfile.TemporaryDirectory() as work_dir:
        run_rank(0, 1, cfg, work_dir)
        mp.spawn(run_rank, args=(2, cfg, work_dir), nprocs=2, join=True)
        load = lambda name: torch.load(Path(work_dir) / name, weights_only=True)  # noqa: E731
        return {arm: {"single": load(f"{arm}_w1_r0.pt"), "ranks": [load(f"{arm}_w2_r{r}.pt") for r in range(2)]}
                for arm in cfg.arms.split(",")}


def weight_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> dict[str, Any]:
    """Largest |a - b| over the parameters `names` (and where), and ‖a - b‖ / ‖a‖ over all of them.

    In float32 the largest difference sits in AdamW's parameters: its first steps are about
    lr · g / |g| per element, so an element whose gradient is a near-cancelling sum moves by a
    visibly different amount when the sum is taken in another order."""
    largest, where, diff_sq, norm_sq = 0.0, "", 0.0, 0.0
    for name in names:
        diff = (a[name] - b[name]).double()
        if float(diff.abs().max()) > largest:
            largest, where = float(diff.abs().max()), name
        diff_sq, norm_sq = diff_sq + float(diff.square().sum()), norm_sq + float(a[name].double().square().sum())
    return {"max_weight_diff": largest, "max_weight_diff_at": where, "weight_rel_diff": (diff_sq / norm_sq) ** 0.5}


def summarize(arm: str, result: dict[str, Any]) -> dict[str, Any]:
    single, (rank0, rank1) = result["single"], result["ranks"]
    steps = len(rank0["traffic"])
    by_tag = {tag: sum(step.get(tag, 0) for step in rank0["traffic"]) / steps for tag in TAGS}
    return {
        "arm": arm,
        "loss_1proc": single["losses"][-1],
        "loss_2proc": rank0["losses"][-1],
        **weight_differences(single["model"], rank0["model"], single["parameters"]),
        "ranks_bitwise_equal": all(torch.equal(x, rank1["model"][name]) for name, x in rank0["model"].items()),
        "bytes_per_step": sum(by_tag.values()),
        "bytes_by_tag": by_tag,
        "molegrad_bytes_per_step": by_tag["molegrad factor"] + by_tag["molegrad statistics"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(BenchConfig, argv, prog="python -m bench.ddp")
    rows = [summarize(arm, result) for arm, result in run_all(cfg).items()]
    print(f"width {cfg.n_embd}, {cfg.n_layer} blocks, vocab {cfg.vocab_size}, {cfg.batch_size}x{cfg.seq_len} tokens/step, "
          f"{cfg.steps} steps, {cfg.dtype}; MoleGrad k={cfg.molegrad_rank_k} on {cfg.molegrad_targets}; bytes = sent per rank per step (ring model)")
    print(f"{'arm':<18}{'loss 1 proc':>12}{'loss 2 procs':>13}{'|dW|/|W|':>10}{'max |dW|':>10}  {'at':<26}{'ranks ==':>9}"
          f"{'bytes/step':>12}" + "".join(f"{tag:>20}" for tag in TAGS))
    for r in rows:
        print(f"{r['arm']:<18}{r['loss_1proc']:>12.7f}{r['loss_2proc']:>13.7f}{r['weight_rel_diff']:>10.1e}"
              f"{r['max_weight_diff']:>10.1e}  {r['max_weight_diff_at']:<26}{str(r['ranks_bitwise_equal']):>9}"
              f"{r['bytes_per_step']:>12,.0f}" + "".join(f"{r['bytes_by_tag'][tag]:>20,.0f}" for tag in TAGS))
    summary: dict[str, Any] = {"bench": "ddp", "config": asdict(cfg), "arms": rows}
    dense = next((r for r in rows if r["arm"] == "dense"), None)
    for r in rows:
        if dense is None or r is dense:
            continue
        others = r["bytes_per_step"] - r["molegrad_bytes_per_step"]  # every non-MoleGrad layer, as in dense
        dense_same_layers = dense["bytes_per_step"] - others
        r["molegrad_layers_ratio"] = r["molegrad_bytes_per_step"] / dense_same_layers
        r["whole_model_ratio"] = r["bytes_per_step"] / dense["bytes_per_step"]
        print(f"{r['arm']}: MoleGrad layers send {r['molegrad_bytes_per_step']:,.0f} B/step against "
              f"{dense_same_layers:,.0f} dense: ratio {r['molegrad_layers_ratio']:.3f} (goal <= 0.1); "
              f"whole model {r['whole_model_ratio']:.3f}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
