"""Web chat: a single-page UI and an HTTP API (nanochat-style SSE and OpenAI-compatible).

    python -m scripts.chat_web                          # newest sft checkpoint on http://127.0.0.1:8000
    python -m scripts.chat_web -i mid -c d6 --num_workers=2 --port=8080

The API (chat and text completions, models, health, stats; the contract at /docs and
/openapi.json) is nanochat.serving; this script loads the engines and runs uvicorn. A bad
--device, --host or --port is one line before the model loads.

Workers: --num_workers engines, each generating one reply at a time in its own thread (torch
releases the GIL, so the event loop stays responsive). On CPU they share one read-only copy of
the weights and split the CPU threads; on CUDA there is one model per GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import uvicorn

from nanochat.checkpoint import load_chat_model
from nanochat.common import RunContext, get_logger, run_main, set_cpu_threads
from nanochat.config import CheckpointFlags, RuntimeFlags, parse_args
from nanochat.engine import NO_COMPILE, Engine
from nanochat.serving import ServingFlags, bind_socket, build_app

log = get_logger("chat_web")


@dataclass
class ChatWebConfig(RuntimeFlags, CheckpointFlags, ServingFlags):
    """Serve a checkpoint: web chat UI + HTTP API."""

    compile_refused: ClassVar[str] = NO_COMPILE


def load_engines(cfg: ChatWebConfig, device_type: str) -> tuple[list[Engine], str]:
    """(one Engine per worker, model name). CUDA: one model per GPU; elsewhere one shared model."""
    if device_type == "cuda":
        num_workers = cfg.num_workers or torch.cuda.device_count()
        if num_workers > torch.cuda.device_count():
            raise ValueError(f"--num_workers: {num_workers} workers need as many GPUs, found {torch.cuda.device_count()}")
        devices = [torch.device("cuda", i) for i in range(num_workers)]
    else:
        devices = [torch.device(device_type)] * (cfg.num_workers or 1)
    models: dict[torch.device, tuple[torch.nn.Module, Any, dict]] = {}
    for device in devices:
        if device not in models:
            models[device] = load_chat_model(cfg, device, cfg.dtype)
    engines = [Engine(models[device][0], models[device][1]) for device in devices]
    meta = models[devices[0]][2]
    return engines, f"nanochat-{cfg.source}-{Path(meta['checkpoint_dir']).name}"


def serve(cfg: ChatWebConfig, ctx: RunContext) -> None:
    sock = bind_socket(cfg.host, cfg.port)  # before the model loads: a bad host or a busy port is one line
    try:
        engines, model_name = load_engines(cfg, ctx.device_type)
        if ctx.device_type == "cpu":  # concurrent workers split the cores rather than oversubscribe them
            set_cpu_threads(max(1, (cfg.threads or os.cpu_count() or 1) // len(engines)))
        app = build_app(engines, model_name, cfg)
        log.info(f"serving {model_name} with {len(engines)} worker(s) on {ctx.device_type}, "
                 f"{torch.get_num_threads()} CPU thread(s) each: http://{cfg.host}:{cfg.port}/")
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(ChatWebConfig, argv, prog="python -m scripts.chat_web")
    run_main(serve, cfg)


if __name__ == "__main__":
    main()
