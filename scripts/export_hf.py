"""Export a checkpoint as a Hugging Face transformers NanoChat folder: python -m scripts.export_hf -i sft -c d12 --out DIR

Writes config.json, model.safetensors (weights only), generation_config.json, tokenizer.json and
tokenizer_config.json (with the chat template) into --out; `AutoModelForCausalLM.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)` then run it (nanochat/hf.py). A model with recipe pieces
(--layer_lambdas, --smear_gate, --backout, --value_embeds) also gets modeling_nanochat_mole.py, and
both its model and its tokenizer load with `trust_remote_code=True`. Needs `pip install -e .[hf]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import load_chat_model
from nanochat.common import print0, run_main
from nanochat.config import CheckpointFlags, check, parse_args
from nanochat.hf import export_hf


@dataclass
class ExportConfig(CheckpointFlags):
    """Export a checkpoint (-i/-c/--step) and the tokenizer to an HF NanoChat folder."""

    out: str = field(default="", metadata={"help": "output folder (created; existing files of the same names are replaced)"})

    def validate(self) -> None:
        super().validate()
        check(self.out != "", "--out: expected the output folder, e.g. --out=hf/d12")


def export(cfg: ExportConfig) -> dict[str, Any]:
    model, tokenizer, meta = load_chat_model(cfg, torch.device("cpu"), "float32")
    out = export_hf(model, tokenizer, Path(cfg.out))
    print0(f"exported {meta['checkpoint_dir']} step {meta['step']} ({model.num_params():,} parameters) to {out}")
    trained_in = meta.get("flags", {}).get("param_dtype", "float32")
    print0("weights: float32" + (f" (the {trained_in} weights of a --param_dtype={trained_in} run, exactly: twice "
                                 f"their size on disk)" if trained_in != "float32" else ""))
    pieces = model.config.recipe_pieces()
    if pieces:
        print0(f"recipe pieces {'+'.join(pieces)}: transformers' NanoChat lacks them, so the folder carries its own code; "
               f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) and "
               f"AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return {"out": str(out), "checkpoint": meta["checkpoint_dir"], "step": meta["step"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_args(ExportConfig, argv, prog="python -m scripts.export_hf")
    return run_main(export, cfg)


if __name__ == "__main__":
    main()
