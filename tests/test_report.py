"""Report card: sections from a tiny run, summary table, plots that are real images."""

import json

import pytest

from nanochat import report
from scripts import base_loss, base_train
from tests.helpers import build_tiny_base_dir, needs_extra


def test_report_from_a_tiny_run(tmp_path, monkeypatch):
    mpimg = needs_extra("matplotlib.image", "plot")
    base = build_tiny_base_dir(tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    report.reset()
    base_train.main(["--depth=1", "--max_seq_len=32", "--device_batch_size=4", "--total_batch_size=128", "--num_iterations=8",
                     "--eval_every=4", "--eval_tokens=256", "--sample_every=-1", "--threads=1", "--dtype=float32"])
    base_loss.main(["--split_tokens=256", "--device_batch_size=4", "--sample_tokens=2"])
    report.log_section("Chat evaluation sft", {"ARC-Easy": 0.25, "GSM8K": 0.0, "ChatCORE": 0.01})
    path = report.generate()
    text = path.read_text()
    for heading in ("# nanochat-mole report card", "## Environment", "## Summary", "## Base model training",
                    "## Base model loss", "## Chat evaluation sft", "## Plots"):
        assert heading in text, heading
    assert "- git: " in text and "- hardware: " in text and "estimated cost: $0.00" in text
    loss = json.loads((base / "report" / "base-model-loss.json").read_text())["data"]
    assert f"| val bpb, pretraining text | {loss['val_bpb']:.4f} | - | - | - |" in text  # BASE column
    assert report.VAL_BPB_NOTE in text and "Smoke tests" not in text
    assert "| ARC-Easy | - | - | 0.2500 | - |" in text  # SFT column
    png = base / "report" / "plot-base-model-training.png"
    assert "![plot-base-model-training](plot-base-model-training.png)" in text
    image = mpimg.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01  # a real picture, not blank


def test_summary_separates_the_val_bpb_measurements_and_marks_smoke_tests():
    sections = [
        ("base-model-loss", {"val_bpb": 1.5}, ""),
        ("midtraining", {"val_bpb": 0.8}, ""),
        ("chat-sft", {"val_bpb": 0.7}, ""),
        ("chat-evaluation-sft", {"ARC-Easy": 0.5, "Arithmetic": 0.75, "smoke_tests": {"ARC-Easy": 6}}, ""),
    ]
    table = report.summary_table(sections)
    assert "| val bpb, pretraining text | 1.5000 | - | - | - |" in table
    assert "| val bpb, assistant tokens of held-out chats | - | 0.8000 | 0.7000 | - |" in table
    assert "| ARC-Easy (smoke test) | - | - | 0.5000 | - |" in table
    assert "| Arithmetic (held-out, calculator) | - | - | 0.7500 | - |" in table
    assert report.VAL_BPB_NOTE in table and "Smoke tests: ARC-Easy (6 rows)" in table
    plain = report.summary_table([("chat-evaluation-rl", {"Arithmetic": 0.5}, "")])
    assert "smoke" not in plain.lower() and report.VAL_BPB_NOTE not in plain


def test_curve_plots_have_labelled_axes(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    plt = needs_extra("matplotlib.pyplot", "plot")

    saved = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    sections = [("base-model-training", {"curves": {"train_loss": [[1, 3.0], [2, 2.5]], "val_bpb": [[0, 2.0], [2, 1.5]]}}, "")]
    report.plot_curves(sections, tmp_path)
    (fig,) = saved
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [("step", "train loss"), ("step", "val bpb")]


def test_cli_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["publish"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: action: expected one of reset|generate, got 'publish'\n"
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and "usage: python -m nanochat.report ACTION" in capsys.readouterr().out
