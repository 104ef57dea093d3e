"""MoleGrad against dense training, exact recompute and GaLore: same model, data and tokens, one run.

    python -m bench.molegrad                                     # every arm: 8-9 min, 1 thread of a 2-core CPU
    python -m bench.molegrad --arms=dense,molegrad_ffn_k32 --lr_sweep=False --steps=8

Arms (--arms, comma-separated, default all): a memory setting (nanochat.model_flags.MEMORY_SETTINGS,
applied to this bench's memory flags: MoleGrad at --molegrad_rank_k), or <setting>_k<rank> for
MoleGrad at that rank, or galore. All: dense; recompute_mlp (exact recompute of the MLP);
recompute_block; galore (galore_torch.GaLoreAdamW at rank --galore_rank on the six Linears of every
block, set up as below); molegrad_{ffn,all}_k{16,32,64} (MoleGrad on the MLP Linears or on all six,
dense Muon momentum, base_train's defaults otherwise); lowest, keep_h (--memory_mode=lowest /
keep_h).

Per arm, printed as a table, written to --out_dir/molegrad.json and plotted (plot-molegrad.png,
nanochat.report.plot_molegrad):
- saved_bytes_per_token: bytes one block saves for backward per token, measured with saved-tensor
  hooks (nanochat.memory_measure.measure_block_saved_bytes), also in units of d values of the compute dtype;
- peak_bytes: peak memory of a training step of this micro-batch predicted by nanochat.memory (for
  GaLore: the dense plan with Muon's momentum replaced by GaLore's moments and projectors; its
  gradients and activations are dense); --measure_peak also measures it on CPU (not for GaLore);
- step_s: median optimizer-step time over every run of the arm, the first --warmup steps of each
  run left out (train_step only: no data loading, no probes);
- val_bpb: after --steps steps of device_batch_size x max_seq_len tokens, the best over the arm's
  LR sweep (Muon matrix_lr in MATRIX_LRS, GaLore lr in GALORE_LRS; --lr_sweep=False: --matrix_lr /
  --galore_lr), which is reported as `lr`;
- energy: the share of the true weight gradient a compressed layer's update can see, mean over its
  compressed layers and over probes every --energy_every steps of the best run. A dense twin of the
  model, loaded with the current weights, computes the dense dW of the step's batch; MoleGrad's
  factor is Gᵀ(xQ) = dW Q, so it captures ‖dW Q‖²/‖dW‖²; GaLore captures ‖dW Pᵀ‖²/‖dW‖² (right
  projection P, r x in, for out >= in) or ‖Pᵀ dW‖²/‖dW‖² (left, P out x r), with the P it uses at
  that step (refreshed from this very gradient's SVD on its refresh steps).

GaLore setup: GaLoreAdamW(lr, betas (0.9, 0.999), eps 1e-6, no weight decay) on the block matrices
with rank = --galore_rank (default 32, MoleGrad's default k), proj_type "std" (the smaller side is
projected), scale --galore_scale (0.25, the GaLore paper's), projection refreshed every
--galore_update_proj_gap steps (10: the paper's 200 would freeze the subspace of the first step in a
run this short); the embedding and head keep base_train's AdamW. GaLore is an AdamW method, so its
LR grid is AdamW's, not Muon's: the comparison with MoleGrad is of two whole recipes.

Data: the local corpus and tokenizer under NANOCHAT_BASE_DIR if present (python -m nanochat.dataset
--source=local; python -m scripts.tok_train), tokenized once and replayed for every run; else a
deterministic synthetic stream (an order-1 Markov chain over --synthetic_vocab tokens; bpb is then
bits per token), which the output says. Table, goals, then one JSON line.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.runner import block_matrices, captured_energy, dense_twin, print_goals
from nanochat.common import RunContext, compute_init, print0
from nanochat.config import UserError, check, parse_args
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, GPTConfig, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.memory import FP32, ITEMSIZE, format_size, plan_memory, read_model
from nanochat.memory_measure import measure_block_saved_bytes, measure_peak
from nanochat.model_flags import MEMORY_SETTINGS, MemoryFlags
from nanochat.optim import get_lr_multiplier, get_muon_momentum, setup_optimizers
from nanochat.report import plot_molegrad, report_dir
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.trainer import train_step

MATRIX_LRS = (0.02, 0.04, 0.08)  # Muon (36 steps favour high LRs: 0.01 was never best)
GALORE_LRS = (0.01, 0.02, 0.04)  # AdamW under GaLore
MOLEGRAD_RANKS = (16, 32, 64)
# --arms=all (arm_setting reads the names): the rank sweep, and lowest and keep_h at --molegrad_rank_k
# (lowest against recompute_block, keep_h against dense)
ARM_NAMES = ("dense", "recompute_mlp", "recompute_block", "galore") + tuple(
    f"{setting}_k{k}" for setting in ("molegrad_ffn", "molegrad_all") for k in MOLEGRAD_RANKS) + ("lowest", "keep_h")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}  # nanochat.memory's --dtype


@dataclass
class MoleGradBenchConfig(MemoryFlags):
    """MoleGrad vs dense, exact recompute and GaLore on the same model, data and tokens."""

    arms: str = field(default="all", metadata={"help": f"comma-separated from {'|'.join(ARM_NAMES)}, or all; any memory "
                                                       f"setting ({'|'.join(MEMORY_SETTINGS)}), MoleGrad ones also <setting>_k<rank>"})
    depth: int = field(default=4, metadata={"help": "transformer blocks (4 -> width 256)"})
    max_seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    device_batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    steps: int = field(default=36, metadata={"help": "optimizer steps per run (the token budget)"})
    warmup: int = field(default=2, metadata={"help": "steps of each run left out of the step time"})
    eval_tokens: int = field(default=16384, metadata={"help": "val tokens for val bpb"})
    lr_sweep: bool = field(default=True, metadata={"help": "run each arm at every LR of its grid, keep the best"})
    matrix_lr: float = field(default=0.02, metadata={"help": "Muon LR without --lr_sweep"})
    galore_lr: float = field(default=0.01, metadata={"help": "GaLore's AdamW LR without --lr_sweep"})
    galore_rank: int = field(default=32, metadata={"help": "GaLore rank"})
    galore_update_proj_gap: int = field(default=10, metadata={"help": "steps between GaLore's SVD refreshes"})
    galore_scale: float = field(default=0.25, metadata={"help": "GaLore's update scale"})
    energy_every: int = field(default=9, metadata={"help": "dense shadow pass every N steps for the energy (0 = never)"})
    measure_peak: bool = field(default=False, metadata={"help": "also measure each arm's peak on CPU (~10 s per arm)"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": ("auto", "float32", "bfloat16")})
    threads: int = field(default=1, metadata={"help": "CPU threads (1: bf16 with 2 threads stalls, docs/cpu_notes.md)"})
    seed: int = field(default=42, metadata={"help": "model init seed (the same for every run)"})
    synthetic_vocab: int = field(default=4096, metadata={"help": "vocabulary of the synthetic stream (no corpus)"})
    out_dir: str = field(default="", metadata={"help": "where molegrad.json and plot-molegrad.png go "
                                                       "(default $NANOCHAT_BASE_DIR/report)"})

    def validate(self) -> None:
        super().validate()
        for name in ("depth", "max_seq_len", "device_batch_size", "steps", "eval_tokens", "galore_rank",
                     "galore_update_proj_gap", "synthetic_vocab"):
            check(getattr(self, name) >= 1, f"--{name}: expected >= 1, got {getattr(self, name)}")
        check(0 <= self.warmup < self.steps, f"--warmup: expected 0 <= warmup < steps={self.steps}, got {self.warmup}")
        check(self.energy_every >= 0, f"--energy_every: expected >= 0, got {self.energy_every}")
        unknown = [name for name in self.arm_names() if arm_setting(name) is None]
        check(not unknown, f"--arms: unknown arm(s) {', '.join(unknown)}; expected some of {'|'.join(ARM_NAMES)}, "
                           f"or all, or a setting of {'|'.join(MEMORY_SETTINGS)} (MoleGrad ones + _k<rank>)")
        width = config_from_depth(self.depth, 2, self.max_seq_len).n_embd
        for name in self.arm_names():
            rank = arm_flags(name, self).memory_options()["molegrad_rank_k"]
            check(rank <= width, f"--arms: {name} needs rank {rank} <= the width {width} of --depth={self.depth}")

    def arm_names(self) -> list[str]:
        return list(ARM_NAMES) if self.arms == "all" else [name for name in self.arms.split(",") if name]


# ---------------------------------------------------------------------------------------------
# arms

def arm_setting(name: str) -> tuple[str, int | None] | None:
    """(memory setting, rank) of an arm: 'lowest' -> ('lowest', None), at --molegrad_rank_k;
    'molegrad_ffn_k16' -> ('molegrad_ffn', 16); 'galore' -> ('dense', None): GaLore trains the dense
    model. None: not an arm."""
    if name == "galore":
        return "dense", None
    if name in MEMORY_SETTINGS:
        return name, None
    setting, _, rank = name.rpartition("_k")
    if setting in MEMORY_SETTINGS and rank.isdigit() and int(rank) >= 1 and \
            replace(MemoryFlags(), **MEMORY_SETTINGS[setting]).molegrad_on():
        return setting, int(rank)
    return None


def arm_flags(name: str, cfg: MoleGradBenchConfig) -> MemoryFlags:
    """This bench's memory flags with the arm's setting applied."""
    setting, rank = arm_setting(name)
    return replace(cfg, **MEMORY_SETTINGS[setting], **({"molegrad_rank_k": rank} if rank else {}))


def lr_grid(name: str, cfg: MoleGradBenchConfig) -> tuple[float, ...]:
    if name == "galore":
        return GALORE_LRS if cfg.lr_sweep else (cfg.galore_lr,)
    return MATRIX_LRS if cfg.lr_sweep else (cfg.matrix_lr,)


def make_optimizers(model: GPT, name: str, lr: float, cfg: MoleGradBenchConfig) -> list[torch.optim.Optimizer]:
    """base_train's [AdamW(embedding, head), Muon(blocks)] at matrix_lr = lr; for GaLore, Muon is
    replaced by GaLoreAdamW over the same block matrices (module docstring)."""
    if name != "galore":
        return setup_optimizers(model, matrix_lr=lr)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from galore_torch import GaLoreAdamW  # its import pulls bitsandbytes, which prints about missing kernels
    except ImportError:
        raise UserError("galore-torch is not installed: pip install -e '.[bench]' (the bench extra)") from None

    adamw = setup_optimizers(model)[0]
    matrices = [linear.weight for linear in block_matrices(model).values()]
    galore = GaLoreAdamW([{"params": matrices, "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_proj_gap,
                           "scale": cfg.galore_scale, "proj_type": "std"}],
                         lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)
    for group in galore.param_groups:
        group["initial_lr"] = group["lr"]
    return [adamw, galore]


def galore_state_bytes(config: GPTConfig, rank: int) -> int:
    """GaLore's state for the block matrices: two moments of the projected gradient and the
    projection, fp32: (out, r) moments and (r, in) projection for out >= in, else (r, in) and (out, r)."""
    per_block = 0
    for out, inp in read_model(config).linears.values():
        r = min(rank, out, inp)
        projected, projection = (out * r, r * inp) if out >= inp else (r * inp, out * r)
        per_block += FP32 * (2 * projected + projection)
    return config.n_layer * per_block


# ---------------------------------------------------------------------------------------------
# data

@dataclass
class BenchData:
    train: list[tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    token_bytes: torch.Tensor  # bytes per token id (ones for the synthetic stream: bpb = bits per token)
    vocab_size: int
    source: str


def markov_batches(vocab_size: int, count: int, batch_size: int, seq_len: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of an order-1 Markov chain: every token has 4 successors with probabilities
    0.6, 0.25, 0.1, 0.05 (the same chain for every seed; `seed` picks the samples)."""
    successors = torch.randint(0, vocab_size, (vocab_size, 4), generator=torch.Generator().manual_seed(0))
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_size, (batch_size,), generator=generator)
        for t in range(seq_len):
            choice = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
            tokens[:, t + 1] = successors[tokens[:, t], choice]
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def load_data(cfg: MoleGradBenchConfig) -> BenchData:
    val_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len))
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes()
        train = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train")
        val = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val")
        return BenchData([train.next_batch() for _ in range(cfg.steps)], [val.next_batch() for _ in range(val_steps)],
                         token_bytes, tokenizer.get_vocab_size(), "local corpus")
    except FileNotFoundError as e:
        print0(f"no corpus or tokenizer ({e}); falling back to a synthetic Markov-chain token stream: "
               f"val bpb below is bits per token")
    vocab = cfg.synthetic_vocab
    return BenchData(markov_batches(vocab, cfg.steps, cfg.device_batch_size, cfg.max_seq_len, seed=1),
                     markov_batches(vocab, val_steps, cfg.device_batch_size, cfg.max_seq_len, seed=2),
                     torch.ones(vocab, dtype=torch.int32), vocab, "synthetic Markov chain")


# ---------------------------------------------------------------------------------------------
# one run, one arm

def train_run(name: str, config: GPTConfig, lr: float, data: BenchData, cfg: MoleGradBenchConfig,
              ctx: RunContext) -> dict[str, Any]:
    """--steps optimizer steps from the seeded init; val bpb, step times and energy probes."""
    torch.manual_seed(cfg.seed)
    model = GPT(config)
    optimizers = make_optimizers(model, name, lr, cfg)
    compressed = name == "galore" or config.molegrad_rank_k > 0
    twin = dense_twin(config) if compressed and cfg.energy_every > 0 else None
    times, energies, finite = [], [], True
    for step, batch in enumerate(data.train):
        if twin is not None and step % cfg.energy_every == 0:
            energy = captured_energy(model, twin, optimizers, batch, ctx)
            if energy is not None:
                energies.append(energy)
        t0 = time.perf_counter()
        loss, _ = train_step(model, optimizers, iter([batch]), 1, ctx, get_lr_multiplier(step, cfg.steps),
                             get_muon_momentum(step))
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            finite = False
            break
    val_bpb = evaluate_bpb(model, iter(data.val), len(data.val), data.token_bytes, ctx) if finite else math.inf
    return {"lr": lr, "val_bpb": val_bpb, "times": times[cfg.warmup:],
            "energy": sum(energies) / len(energies) if energies else None}


def run_arm(name: str, data: BenchData, cfg: MoleGradBenchConfig, ctx: RunContext) -> dict[str, Any]:
    dtype = DTYPE_NAMES[ctx.dtype]
    config = config_from_depth(cfg.depth, data.vocab_size, cfg.max_seq_len, **arm_flags(name, cfg).memory_options())
    saved = measure_block_saved_bytes(config, dtype).per_token
    plan = plan_memory(config, cfg.device_batch_size, dtype, grad_accum_steps=1, device_type="cpu")
    peak = plan.peak
    if name == "galore":
        peak += galore_state_bytes(config, cfg.galore_rank) - plan.components["Muon momentum"]
    runs = [train_run(name, config, lr, data, cfg, ctx) for lr in lr_grid(name, cfg)]
    best = min(runs, key=lambda run: run["val_bpb"])
    measured = None
    if cfg.measure_peak and name != "galore":
        measured = measure_peak(config, cfg.device_batch_size, dtype, grad_accum_steps=1)
    times = [t for run in runs for t in run["times"]]
    return {
        "arm": name,
        "saved_bytes_per_token": saved,
        "saved_d": saved / (config.n_embd * ITEMSIZE[dtype]),
        "val_bpb": best["val_bpb"],
        "step_s": statistics.median(times) if times else math.nan,
        "peak_bytes": peak,
        "peak_measured_bytes": measured,
        "energy": best["energy"],
        "lr": best["lr"],
        "lr_runs": {str(run["lr"]): run["val_bpb"] for run in runs},
    }


# ---------------------------------------------------------------------------------------------
# report

def goals(results: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """The issue's goals, checked on this run's numbers (None: an arm it needs was not run)."""
    def get(arm: str, key: str) -> Any:
        return results[arm][key] if arm in results else None

    def compare(a: Any, b: Any, test) -> bool | None:
        return None if a is None or b is None else bool(test(a, b))

    default = "molegrad_ffn_k32"
    return {
        "default MoleGrad block saves <= 6d per token": compare(get(default, "saved_d"), 6.0, lambda a, b: a <= b),
        "default MoleGrad saves less than recompute_mlp": compare(get(default, "saved_bytes_per_token"),
                                                                  get("recompute_mlp", "saved_bytes_per_token"), lambda a, b: a < b),
        "default MoleGrad step time <= recompute_mlp": compare(get(default, "step_s"), get("recompute_mlp", "step_s"),
                                                               lambda a, b: a <= b),
        "default MoleGrad step time <= dense": compare(get(default, "step_s"), get("dense", "step_s"), lambda a, b: a <= b),
        "MoleGrad k=32 val bpb within +2% of dense": compare(get(default, "val_bpb"), get("dense", "val_bpb"),
                                                             lambda a, b: a <= 1.02 * b),
        "MoleGrad k=64 val bpb within +1% of dense": compare(get("molegrad_ffn_k64", "val_bpb"), get("dense", "val_bpb"),
                                                             lambda a, b: a <= 1.01 * b),
        "MoleGrad all k=32 val bpb below GaLore rank 32": compare(get("molegrad_all_k32", "val_bpb"), get("galore", "val_bpb"),
                                                                  lambda a, b: a < b),
        "lowest >= 1.15x the tokens/s of recompute_block": compare(get("lowest", "step_s"), get("recompute_block", "step_s"),
                                                                   lambda a, b: 1.15 * a <= b),
        "keep_h >= 1.10x the tokens/s of dense": compare(get("keep_h", "step_s"), get("dense", "step_s"),
                                                         lambda a, b: 1.10 * a <= b),
    }


def print_table(results: list[dict[str, Any]], dense_bpb: float | None) -> None:
    print0(f"{'arm':<18}{'saved B/tok':>12}{'(d)':>7}{'peak pred':>12}{'peak meas':>12}{'step s':>8}"
           f"{'val bpb':>9}{'vs dense':>9}{'energy':>8}{'lr':>7}")
    for r in results:
        measured = format_size(r["peak_measured_bytes"]) if r["peak_measured_bytes"] is not None else "-"
        delta = f"{100 * (r['val_bpb'] / dense_bpb - 1):+.1f}%" if dense_bpb else "-"
        energy = f"{r['energy']:.2f}" if r["energy"] is not None else "-"
        print0(f"{r['arm']:<18}{r['saved_bytes_per_token']:>12.0f}{r['saved_d']:>7.2f}{format_size(r['peak_bytes']):>12}"
               f"{measured:>12}{r['step_s']:>8.3f}{r['val_bpb']:>9.4f}{delta:>9}{energy:>8}{r['lr']:>7.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(MoleGradBenchConfig, argv, prog="python -m bench.molegrad")
    names = cfg.arm_names()
    ctx = compute_init(device="cpu", dtype=cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    data = load_data(cfg)
    t0 = time.perf_counter()
    results = [run_arm(name, data, cfg, ctx) for name in names]
    elapsed = time.perf_counter() - t0
    by_name = {r["arm"]: r for r in results}
    dense_bpb = by_name["dense"]["val_bpb"] if "dense" in by_name else None
    width = config_from_depth(cfg.depth, data.vocab_size, cfg.max_seq_len).n_embd
    print0(f"depth {cfg.depth} (width {width}), {cfg.device_batch_size} x {cfg.max_seq_len} tokens x {cfg.steps} steps "
           f"= {cfg.steps * cfg.device_batch_size * cfg.max_seq_len:,} tokens per run, {DTYPE_NAMES[ctx.dtype]}, "
           f"{torch.get_num_threads()} thread(s), data: {data.source} (vocab {data.vocab_size:,}), "
           f"LR sweep {'on' if cfg.lr_sweep else 'off'}, {elapsed:.0f} s; step times are noisy on a shared machine")
    print_table(results, dense_bpb)
    checked = goals(by_name)
    print_goals(checked)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "molegrad.json").write_text(json.dumps({"config": asdict(cfg), "data": data.source, "arms": results}, indent=1))
    plot = plot_molegrad(out_dir)
    print0(f"wrote {out_dir / 'molegrad.json'} and {plot}")
    summary = {"bench": "molegrad", "config": asdict(cfg), "data": data.source, "seconds": elapsed,
               "arms": results, "goals": checked}
    print0(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
