"""The report card of a run: each stage appends its section, `generate` writes report.md.

    python -m nanochat.report reset       # start a new run's report (records the start time)
    python -m nanochat.report generate    # header + every section + summary table + plots

Stages call `log_section(title, data)`: it writes `$NANOCHAT_BASE_DIR/report/<slug>.md` (human
readable) and `<slug>.json` (for the summary table and plots). A section may carry curves
(`{"curves": {"train_loss": [[step, value], ...]}}`) that `generate` plots. Only rank 0 writes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat.common import get_base_dir, get_rank, run_main
from nanochat.config import Flags, UserError, parse_args

# (slug, title) in pipeline order; sections with other titles are appended after these
SECTIONS = (
    ("tokenizer-training", "Tokenizer training"),
    ("tokenizer-evaluation", "Tokenizer evaluation"),
    ("base-model-training", "Base model training"),
    ("base-model-loss", "Base model loss"),
    ("base-model-evaluation", "Base model evaluation"),
    ("midtraining", "Midtraining"),
    ("chat-evaluation-mid", "Chat evaluation mid"),
    ("chat-sft", "Chat SFT"),
    ("chat-evaluation-sft", "Chat evaluation sft"),
    ("chat-rl", "Chat RL"),
    ("chat-evaluation-rl", "Chat evaluation rl"),
    ("chat-format-rl", "Chat format rl"),
)
# metrics of the summary table: (key in a section's data, row label, the stages whose value it shows).
# val bpb is two rows because it is two measurements: BASE on pretraining text, MID and SFT on the
# assistant tokens of one held-out chat set (see VAL_BPB_NOTE).
SUMMARY_METRICS = (
    ("val_bpb", "val bpb, pretraining text", ("BASE",)),
    ("val_bpb", "val bpb, assistant tokens of held-out chats", ("MID", "SFT")),
    ("CORE", "CORE", None),
    ("ARC-Easy", "ARC-Easy", None),
    ("ARC-Challenge", "ARC-Challenge", None),
    ("MMLU", "MMLU", None),
    ("GSM8K", "GSM8K", None),
    ("HumanEval", "HumanEval", None),
    ("Arithmetic", "Arithmetic (held-out, calculator)", None),
    ("SpellingBee", "SpellingBee (held-out words)", None),
    ("ChatCORE", "ChatCORE", None),
    ("ends_turn", "ends turn with <|assistant_end|>", None),
    ("python_call", "well-formed calculator call", None),
)
VAL_BPB_NOTE = (
    "val bpb rows: BASE is bits per byte of the pretraining val split's text. MID and SFT are bits per "
    "byte of the assistant tokens only (what the model says; prompts and tool outputs excluded) of one "
    "held-out chat set, the test splits of the chat tasks (tasks.registry.chat_val_mixture), so MID and "
    "SFT compare with each other but not with BASE. Each reads that set up to its --eval_tokens (MID, "
    "packed rows) or --eval_examples (SFT, one conversation per row) budget; runcpu.sh sets both past "
    "the offline set's size, so both read all of it. A MID row also sees the conversations packed before it."
)
STAGE_OF_SECTION = {
    "base-model-loss": "BASE", "base-model-evaluation": "BASE", "base-model-training": "BASE",
    "midtraining": "MID", "chat-evaluation-mid": "MID",
    "chat-sft": "SFT", "chat-evaluation-sft": "SFT",
    "chat-rl": "RL", "chat-evaluation-rl": "RL", "chat-format-rl": "RL", "chat-format-sft": "SFT", "chat-format-mid": "MID",
}
# rough on-demand prices (USD/hour) for the cost line; override with NANOCHAT_HOURLY_USD
HOURLY_USD = {"RTX 5090": 0.70, "H100": 2.50, "H200": 3.50, "A100": 1.50, "RTX 4090": 0.40}


def report_dir() -> Path:
    path = get_base_dir() / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def log_section(title: str, data: dict[str, Any]) -> Path | None:
    """Write one section (markdown + json). Values that are dicts/lists other than curves are
    rendered as nested bullets; `curves` are kept for plots only."""
    if get_rank() != 0:
        return None
    slug = slugify(title)
    directory = report_dir()
    lines = [f"## {title}", f"timestamp: {dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", ""]
    for key, value in data.items():
        if key == "curves":
            continue
        if isinstance(value, dict):
            lines.append(f"- {key}:")
            lines += [f"    - {k}: {_format_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"- {key}: {_format_value(value)}")
    (directory / f"{slug}.md").write_text("\n".join(lines) + "\n")
    (directory / f"{slug}.json").write_text(json.dumps({"title": title, "data": data}, default=str, indent=1))
    return directory / f"{slug}.md"


def reset() -> None:
    """Forget the previous run's sections and record this run's start time."""
    directory = report_dir()
    for path in directory.iterdir():
        if path.suffix in (".md", ".json", ".png"):
            path.unlink()
    (directory / "run_start.json").write_text(json.dumps({"start": dt.datetime.now().isoformat()}))
    print(f"report reset: {directory}")


# ---------------------------------------------------------------------------------------------
# header facts

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info() -> dict[str, str]:
    repo = Path(__file__).resolve().parent.parent
    commit = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = bool(_run(["git", "-C", str(repo), "status", "--porcelain"]))
    return {"commit": commit + (" (dirty)" if dirty else ""), "branch": _run(["git", "-C", str(repo), "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"}


def hardware_info() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpus": gpus}


def software_info() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def run_cost(hours: float, gpus: list[str]) -> tuple[float, str]:
    """Estimated USD for `hours` of this machine, and how it was estimated."""
    if os.environ.get("NANOCHAT_HOURLY_USD"):
        rate = float(os.environ["NANOCHAT_HOURLY_USD"])
        return rate * hours, f"{rate:.2f} USD/h from NANOCHAT_HOURLY_USD"
    if not gpus:
        return 0.0, "CPU run: no GPU rental cost (set NANOCHAT_HOURLY_USD to price the machine)"
    rate = 0.0
    for name in gpus:
        rate += next((usd for key, usd in HOURLY_USD.items() if key.lower() in name.lower()), 2.0)
    return rate * hours, f"{rate:.2f} USD/h for {len(gpus)} GPU(s) at typical on-demand prices"


# ---------------------------------------------------------------------------------------------
# generate

def load_sections() -> list[tuple[str, dict[str, Any], str]]:
    """(slug, data, markdown) for every logged section, pipeline order first."""
    directory = report_dir()
    known = [slug for slug, _ in SECTIONS]
    found = sorted(p.stem for p in directory.glob("*.json") if p.stem not in ("run_start", "summary"))
    ordered = [s for s in known if s in found] + [s for s in found if s not in known]
    out = []
    for slug in ordered:
        payload = json.loads((directory / f"{slug}.json").read_text())
        md_path = directory / f"{slug}.md"
        out.append((slug, payload.get("data", {}), md_path.read_text() if md_path.exists() else ""))
    return out


def summary_table(sections: list[tuple[str, dict[str, Any], str]]) -> str:
    """The metrics by stage, then what the val bpb rows measure and which tasks are smoke tests."""
    stages = ("BASE", "MID", "SFT", "RL")
    table: dict[str, dict[str, Any]] = {}
    smoke_tests: dict[str, int] = {}  # task -> rows of the offline stand-in it was scored on
    for slug, data, _ in sections:
        stage = STAGE_OF_SECTION.get(slug)
        if stage is None:
            continue
        smoke_tests.update(data.get("smoke_tests") or {})
        for key, label, only in SUMMARY_METRICS:
            if key in data and isinstance(data[key], (int, float)) and (only is None or stage in only):
                table.setdefault(label, {})[stage] = data[key]
    if not table:
        return "_no metrics logged yet_\n"
    lines = ["| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for key, label, _ in SUMMARY_METRICS:
        if label in table:
            row = [f"{table[label][s]:.4f}" if s in table[label] else "-" for s in stages]
            shown = f"{label} (smoke test)" if key in smoke_tests else label
            lines.append(f"| {shown} | " + " | ".join(row) + " |")
    if any(label.startswith("val bpb") for label in table):
        lines += ["", VAL_BPB_NOTE]
    if smoke_tests:
        listed = ", ".join(f"{name} ({rows} rows)" for name, rows in smoke_tests.items())
        lines += ["", f"Smoke tests: {listed} were scored on the offline stand-ins (a few handwritten rows in the "
                      "hub's schema, tasks/fixtures.py, used because the hub was unreachable): they show that the "
                      "stage runs end to end; their accuracies mean nothing (nor does ChatCORE, which averages them in)."]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; one line naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed: pip install -e '.[plot]' (the plot extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(sections: list[tuple[str, dict[str, Any], str]], directory: Path) -> list[Path]:
    """One PNG per section with curves (x: step, y: the metric), labelled axes."""
    plt = pyplot()

    paths = []
    for slug, data, _ in sections:
        curves = data.get("curves")
        if not curves:
            continue
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
        for ax, (name, points) in zip(axes[0], curves.items()):
            xs, ys = zip(*points) if points else ((), ())
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(name.replace("_", " "))
            ax.set_title(f"{slug.replace('-', ' ')}: {name.replace('_', ' ')}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = directory / f"plot-{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_molegrad(directory: Path) -> Path | None:
    """Memory and quality of the MoleGrad bench arms, if bench/molegrad.py left its JSON here."""
    source = directory / "molegrad.json"
    if not source.exists():
        return None
    plt = pyplot()

    arms = json.loads(source.read_text())["arms"]
    names = [a["arm"] for a in arms]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [a["saved_bytes_per_token"] / 1024 for a in arms])
    ax1.set_ylabel("saved for backward (KiB / token)")
    ax1.set_xlabel("arm")
    ax1.set_title("activation memory")
    bpb = [a["val_bpb"] for a in arms]
    ax2.bar(names, bpb)
    spread = max(bpb) - min(bpb)
    ax2.set_ylim(min(bpb) - spread - 1e-3, max(bpb) + 0.5 * spread + 1e-3)  # zoom in: the arms differ by ~1%
    ax2.set_ylabel("val bpb after the token budget")
    ax2.set_xlabel("arm")
    ax2.set_title("quality (lower is better)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    path = directory / "plot-molegrad.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def generate() -> Path:
    directory = report_dir()
    sections = load_sections()
    start_file = directory / "run_start.json"
    start = dt.datetime.fromisoformat(json.loads(start_file.read_text())["start"]) if start_file.exists() else None
    now = dt.datetime.now()
    hours = (now - start).total_seconds() / 3600 if start else 0.0
    git, hw, sw = git_info(), hardware_info(), software_info()
    cost, cost_note = run_cost(hours, hw["gpus"])
    plots = plot_curves(sections, directory)
    molegrad_plot = plot_molegrad(directory)
    if molegrad_plot:
        plots.append(molegrad_plot)

    out = ["# nanochat-mole report card", "", f"generated: {now.strftime('%Y-%m-%d %H:%M:%S')}", "",
           "## Environment", f"- git: {git['commit']} on {git['branch']}",
           f"- hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gb']} GB RAM, GPUs: {', '.join(hw['gpus']) or 'none'}",
           f"- software: python {sw['python']}, torch {sw['torch']}, {sw['platform']}",
           f"- total wall time: {hours * 60:.1f} min" + ("" if start else " (no `report reset` recorded)"),
           f"- estimated cost: ${cost:.2f} ({cost_note})", "",
           "## Summary", summary_table(sections)]
    for _, _, markdown in sections:
        out.append(markdown)
    if plots:
        out.append("## Plots")
        out += [f"![{p.stem}]({p.name})" for p in plots]
    path = directory / "report.md"
    path.write_text("\n".join(out) + "\n")
    print(f"report written: {path} ({len(sections)} sections, {len(plots)} plots)")
    return path


@dataclass
class ReportConfig(Flags):
    """Start a new report card (reset: drop the logged sections) or write it (generate)."""

    action: str = field(default="generate", metadata={"positional": True, "choices": ("reset", "generate"),
                                                      "help": "reset | generate"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(ReportConfig, argv, prog="python -m nanochat.report")
    run_main(lambda cfg: reset() if cfg.action == "reset" else generate(), cfg)


if __name__ == "__main__":
    main()
