"""The lean core install: plotting and GaLore are extras, and code that needs one says which."""

import sys
import tomllib
from pathlib import Path

import pytest

from nanochat.config import UserError

REPO = Path(__file__).resolve().parent.parent


def test_core_dependencies_leave_out_the_heavy_extras():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "matplotlib" not in core and "galore" not in core
    assert any(dep.startswith("matplotlib") for dep in project["optional-dependencies"]["plot"])
    assert any(dep.startswith("galore-torch") for dep in project["optional-dependencies"]["bench"])
    setup = (REPO / "runs" / "setup_env.sh").read_text()
    extras = setup.split('pip install -q -e ".[', 1)[1].split("]", 1)[0].split(",")
    assert {"dev", "plot", "bench"} <= set(extras)  # tests and benches get them


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    from nanochat.report import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[plot\]'") as info:
        pyplot()
    assert "\n" not in str(info.value)


def test_missing_galore_names_the_bench_extra(monkeypatch):
    from bench.molegrad import MoleGradBenchConfig, make_optimizers
    from nanochat.gpt import GPT, config_from_depth

    monkeypatch.setitem(sys.modules, "galore_torch", None)
    model = GPT(config_from_depth(1, vocab_size=64, sequence_len=16))
    with pytest.raises(UserError, match=r"pip install -e '\.\[bench\]'"):
        make_optimizers(model, "galore", 0.01, MoleGradBenchConfig())
