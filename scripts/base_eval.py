"""The CORE metric (DCLM eval bundle) of a trained model.

    python -m scripts.base_eval --model_tag=d6 --max_per_task=500
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

Prints a table (task, accuracy, centered) and CORE; logs the report card section "Base model evaluation"
and core_<step>.csv in the checkpoint's directory. The bundle is downloaded once (--bundle_url or
$NANOCHAT_EVAL_BUNDLE_URL to use a mirror).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import load_chat_model
from nanochat.common import RunContext, atomic_write, print0, run_main
from nanochat.config import CheckpointFlags, RuntimeFlags, check, parse_args, source_field
from nanochat.core_eval import ensure_eval_bundle, evaluate_core
from nanochat.download import DownloadError
from nanochat.report import log_section


@dataclass
class BaseEvalConfig(RuntimeFlags, CheckpointFlags):
    """Evaluate the CORE metric of a checkpoint."""

    source: str = source_field("base")
    max_per_task: int = field(default=-1, metadata={"help": "items evaluated per task (-1 = all)"})
    bundle_url: str = field(default="", metadata={"help": "eval bundle zip URL (empty = $NANOCHAT_EVAL_BUNDLE_URL or the DCLM bundle)"})

    def validate(self) -> None:
        super().validate()
        check(self.max_per_task == -1 or self.max_per_task >= 1, f"--max_per_task: expected -1 (all) or >= 1, got {self.max_per_task}")


def results_csv(out: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "accuracy", "centered"])
    for label, accuracy in out["results"].items():
        writer.writerow([label, f"{accuracy:.6f}", f"{out['centered_results'][label]:.6f}"])
    writer.writerow(["CORE", "", f"{out['core_metric']:.6f}"])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(BaseEvalConfig, argv, prog="python -m scripts.base_eval")
    return run_main(evaluate, cfg)


def evaluate(cfg: BaseEvalConfig, ctx: RunContext) -> dict[str, Any]:
    model, tokenizer, meta = load_chat_model(cfg, ctx.device, "float32")  # float32 weights; autocast computes in --dtype
    try:
        bundle_dir = ensure_eval_bundle(cfg.bundle_url or None)
    except DownloadError as e:  # offline: say so in the report card too, then fail
        log_section("Base model evaluation", {"CORE": f"not measured: the eval bundle could not be downloaded ({e.reason})"})
        raise
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    with ctx.autocast():
        out = evaluate_core(forward, tokenizer, bundle_dir, ctx.device, cfg.max_per_task, verbose=True)
    results = {"source": cfg.source, "checkpoint": meta["checkpoint_dir"], "step": meta["step"], "max_per_task": cfg.max_per_task, **out}
    print0(f"\n{'task':<35} {'accuracy':>9} {'centered':>9}")
    for label, accuracy in out["results"].items():
        print0(f"{label:<35} {accuracy:>9.4f} {out['centered_results'][label]:>9.4f}")
    print0(f"{'CORE':<35} {'':>9} {out['core_metric']:>9.4f}")
    if ctx.master:
        log_section("Base model evaluation", {"checkpoint": meta["checkpoint_dir"], "step": meta["step"],
                                              "max_per_task": cfg.max_per_task, "CORE": out["core_metric"],
                                              "centered": out["centered_results"], "accuracy": out["results"]})
        table = Path(meta["checkpoint_dir"]) / f"core_{meta['step']:06d}.csv"
        atomic_write(table, lambda f: f.write(results_csv(out).encode()))
        print0(f"wrote {table}")
    return results


if __name__ == "__main__":
    main()
