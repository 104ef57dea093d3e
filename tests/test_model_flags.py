"""The model/memory flag group: declared once, the same in every training stage, the planner and
the benches; the seed's flag names as aliases; presets applied in one place."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from nanochat.config import ConfigError, format_help, parse_args_or_raise
from nanochat.gpt import MEMORY_OPTIONS, RECIPE_PIECES, GPTConfig
from nanochat.memory import PlanFlags
from nanochat.model_flags import MEMORY_MODES, MemoryFlags, ModelFlags
from nanochat.trainer import TrainFlags
from scripts.base_train import BaseTrainConfig
from scripts.chat_rl import ChatRLConfig
from scripts.chat_sft import ChatSFTConfig
from scripts.mid_train import MidTrainConfig

REPO = Path(__file__).resolve().parents[1]
MEMORY_FLAGS = [f.name for f in dataclasses.fields(MemoryFlags)]
PIECE_FLAGS = list(RECIPE_PIECES)
TRAINING_STAGES = [BaseTrainConfig, MidTrainConfig, ChatSFTConfig, ChatRLConfig]


def listed_flags(cls: type) -> list[str]:
    return re.findall(r"^  --(\w+)", format_help(cls), flags=re.MULTILINE)


@pytest.mark.parametrize("cls", TRAINING_STAGES + [PlanFlags])
def test_help_lists_each_memory_flag_once(cls):
    listed = listed_flags(cls)
    assert len(listed) == len(set(listed)), [name for name in listed if listed.count(name) > 1]
    assert all(listed.count(name) == 1 for name in MEMORY_FLAGS)


def test_model_pieces_only_where_the_architecture_is_chosen():
    for cls in (BaseTrainConfig, PlanFlags):
        assert set(PIECE_FLAGS) <= set(listed_flags(cls))
    for cls in (MidTrainConfig, ChatSFTConfig, ChatRLConfig):
        listed = set(listed_flags(cls))
        assert not listed & set(PIECE_FLAGS), cls
        assert "depth" not in listed and "target_param_data_ratio" not in listed, cls


def test_flags_are_named_like_the_config_fields_they_set():
    flags = MemoryFlags()
    assert set(flags.memory_options()) == set(MEMORY_OPTIONS)
    assert all(hasattr(flags, name) for name in MEMORY_OPTIONS)  # same names: no translation table
    assert set(ModelFlags().model_options()) == set(MEMORY_OPTIONS) | set(RECIPE_PIECES)
    assert issubclass(TrainFlags, MemoryFlags) and issubclass(PlanFlags, ModelFlags) and issubclass(BaseTrainConfig, ModelFlags)


def test_the_seed_flag_names_are_aliases():
    seed = parse_args_or_raise(MemoryFlags, ["--enable_streaming=True", "--streaming_rank_k=16", "--streaming_power_iters=2",
                                             "--streaming_target_layers=all", "--streaming_warm_start_decay=0.9",
                                             "--streaming_momentum=lowrank", "--streaming_keep_h=True"])
    now = parse_args_or_raise(MemoryFlags, ["--molegrad=True", "--molegrad_rank_k=16", "--molegrad_power_iters=2",
                                            "--molegrad_targets=all", "--molegrad_warm_start_decay=0.9",
                                            "--molegrad_momentum=lowrank", "--molegrad_keep_h=True"])
    assert seed == now and now.memory_options()["molegrad_rank_k"] == 16
    assert "(also --enable_streaming)" in format_help(MemoryFlags)


@pytest.mark.parametrize("mode", [mode for mode in MEMORY_MODES if MemoryFlags(memory_mode=mode).molegrad_on()])
def test_a_memory_mode_turns_molegrad_on_with_its_preset(mode):
    options = MemoryFlags(memory_mode=mode, molegrad_rank_k=8).memory_options()
    preset = {name: value for name, value in MEMORY_MODES[mode].items() if name in MEMORY_OPTIONS}  # precision: tests/test_precision.py
    assert options == {**MemoryFlags().memory_options(), **preset, "molegrad_rank_k": 8}
    assert GPTConfig(n_embd=64, n_head=2, n_kv_head=2, **options).molegrad


def test_molegrad_is_off_unless_asked_for():
    assert MemoryFlags().memory_options()["molegrad_rank_k"] == 0
    assert MemoryFlags(molegrad_rank_k=8).memory_options()["molegrad_rank_k"] == 0  # a rank alone does not turn it on
    assert MemoryFlags(molegrad=True, molegrad_rank_k=8).memory_options()["molegrad_rank_k"] == 8


def test_a_flag_against_the_preset_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"^--molegrad_targets=all: contradicts --memory_mode=low, which sets molegrad_targets=ffn_only$"):
        parse_args_or_raise(MemoryFlags, ["--memory_mode=low", "--molegrad_targets=all"])
    # a flag left at its default never contradicts (keep_h sets recompute=none, the default anyway)
    assert parse_args_or_raise(MemoryFlags, ["--memory_mode=keep_h", "--recompute=none"]).memory_options()["molegrad_keep_h"]


def test_model_value_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--molegrad_power_iters=0: expected >= 1$"):
        parse_args_or_raise(MemoryFlags, ["--molegrad_power_iters=0"])
    with pytest.raises(ConfigError, match=r"^--molegrad_rank_k=65: expected 1 <= molegrad_rank_k <= in_features=64"):
        parse_args_or_raise(PlanFlags, ["--depth=1", "--molegrad=True", "--molegrad_rank_k=65", "--vocab_size=256"])
    with pytest.raises(ValueError, match=r"^molegrad_power_iters=0: expected >= 1$"):  # the model's own error is plain
        GPTConfig(molegrad_power_iters=0)


def test_each_table_and_the_molegrad_on_rule_are_written_once():
    sources = [path for folder in ("nanochat", "scripts", "bench") for path in (REPO / folder).rglob("*.py")]
    text = {path: path.read_text() for path in sources}
    for pattern in (r"^MEMORY_MODES\s*=", r'memory_mode != "custom"', r"^\s*molegrad_rank_k: int = field",
                    r"^\s*layer_lambdas: bool = field"):
        hits = [str(path.relative_to(REPO)) for path, body in text.items() for _ in re.finditer(pattern, body, re.MULTILINE)]
        assert hits == ["nanochat/model_flags.py"], (pattern, hits)
