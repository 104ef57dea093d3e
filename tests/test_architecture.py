"""The layout holds: the library's imports form no cycle (module-level imports and those inside
functions alike), the library never imports tasks/, scripts/ or bench/, and every entry point
shares the same flag groups."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

from nanochat.config import CheckpointFlags, RuntimeFlags
from nanochat.model_flags import MemoryFlags

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "nanochat"
OUTSIDE = ("tasks", "scripts", "bench", "tests")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere in its body (functions, classes, TYPE_CHECKING blocks
    included), as absolute dotted names; `from pkg import name` counts as pkg.name when that is
    a module of the repo, else as pkg."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (REPO / Path(*candidate.split("."))).with_suffix(".py").exists()
                found.add(candidate if is_module else base)
    return found


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in LIBRARY.glob("*.py")}
    return {name: {m for m in imported_modules(path) if m.split(".")[0] in ("nanochat",) + OUTSIDE} - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; plain depth-first search."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_walker_sees_imports_inside_functions(tmp_path, monkeypatch):
    source = "import os\n\ndef f():\n    from nanochat import gpt\n    from nanochat.checkpoint import load_model\n"
    path = LIBRARY / "_probe_for_test.py"
    path.write_text(source)
    try:
        assert {"os", "nanochat.gpt", "nanochat.checkpoint"} <= imported_modules(path)
    finally:
        path.unlink()


def test_the_library_has_no_import_cycle():
    cycle = find_cycle(library_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_library_never_imports_tasks_scripts_or_bench():
    leaks = {name: sorted(m for m in deps if m.split(".")[0] in OUTSIDE) for name, deps in library_graph().items()}
    assert not {name: deps for name, deps in leaks.items() if deps}


ENTRY_POINTS = sorted(module_name(p) for p in (REPO / "scripts").glob("*.py") if p.name != "__init__.py")
CHECKPOINT_READERS = ("scripts.base_eval", "scripts.base_loss", "scripts.chat_eval", "scripts.chat_cli",
                      "scripts.chat_web", "scripts.mid_train", "scripts.chat_sft", "scripts.chat_rl", "scripts.export_hf")
MODEL_RUNNERS = tuple(m for m in ENTRY_POINTS if m not in ("scripts.tok_train", "scripts.tok_eval", "scripts.export_hf"))


@pytest.mark.parametrize("name", ENTRY_POINTS + ["nanochat.report", "nanochat.dataset", "nanochat.memory"])
def test_every_entry_point_has_help_with_the_shared_flags(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m " + name)
    groups = ([RuntimeFlags] if name in MODEL_RUNNERS else []) + ([CheckpointFlags] if name in CHECKPOINT_READERS else [])
    for group in groups:
        for f in dataclasses.fields(group):
            assert f"--{f.name}" in out, f"{name} --help lacks the shared flag --{f.name}"
    if name in CHECKPOINT_READERS:
        assert "--source, -i" in out and "--model_tag, -c" in out


@pytest.mark.parametrize("name", ["scripts.chat_cli", "scripts.chat_web"])
def test_an_entry_point_that_cannot_compile_refuses_the_flag(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--compile=True"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --compile: not supported here: ")


BENCHES = sorted(module_name(p) for p in (REPO / "bench").glob("*.py") if p.name not in ("__init__.py", "runner.py"))
# the benches that build models with memory options: they take the memory flag group
MEMORY_BENCHES = ("bench.ddp", "bench.gpu_check", "bench.memory_modes", "bench.molegrad", "bench.train_throughput")


def test_benches_share_code_only_through_bench_runner():
    for path in (REPO / "bench").glob("*.py"):
        others = sorted(m for m in imported_modules(path) if m.startswith("bench.") and m != "bench.runner")
        assert not others, f"{path.name} imports {others}: shared bench code belongs in bench/runner.py"


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_has_help_and_those_with_memory_options_take_the_memory_flags(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(name).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m " + name) and "--rank_k " not in out
    if name in MEMORY_BENCHES:
        for f in dataclasses.fields(MemoryFlags):
            assert f"--{f.name} " in out, f"{name} --help lacks the memory flag --{f.name}"
