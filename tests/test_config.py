import dataclasses
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from nanochat.config import ConfigError, check, format_help, parse_args, parse_args_or_raise, to_dict


@dataclass
class DemoConfig:
    """Demo flags."""

    depth: int = field(default=4, metadata={"help": "number of blocks"})
    lr: float = 0.02
    molegrad: bool = False
    target: str = field(default="ffn_only", metadata={"choices": ("ffn_only", "attn_only", "all")})
    source: str = field(default="sft", metadata={"short": "-i"})
    run: str = "dummy"

    def validate(self) -> None:
        check(self.depth >= 1, f"--depth: expected >= 1, got {self.depth}")


def test_both_value_forms_and_types():
    cfg = parse_args_or_raise(DemoConfig, ["--depth=6", "--lr", "0.5", "--target", "all", "-i", "rl"])
    assert (cfg.depth, cfg.lr, cfg.target, cfg.source) == (6, 0.5, "all", "rl")


@pytest.mark.parametrize("raw,expected", [("True", True), ("False", False), ("1", True), ("0", False), ("true", True)])
def test_booleans(raw, expected):
    assert parse_args_or_raise(DemoConfig, [f"--molegrad={raw}"]).molegrad is expected


def test_bare_boolean_switches_on():
    assert parse_args_or_raise(DemoConfig, ["--molegrad", "--depth=2"]).molegrad is True


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--nope=1"], "--nope: unknown flag"),
        (["--depth=abc"], "--depth: expected an integer, got 'abc'"),
        (["--lr=fast"], "--lr: expected a number"),
        (["--molegrad=maybe"], "--molegrad: expected a boolean"),
        (["--target=mlp"], "--target: expected one of ffn_only|attn_only|all"),
        (["--depth=0"], "--depth: expected >= 1, got 0"),
        (["--depth"], "--depth: expected a value"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_errors_name_the_flag(argv, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("|", r"\|").replace("(", r"\(")):
        parse_args_or_raise(DemoConfig, argv)


def test_bad_flag_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(DemoConfig, ["--depth=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --depth: expected an integer, got 'x'"]


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(DemoConfig, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(DemoConfig):
        assert f"--{f.name}" in out
    assert "default=4" in out and "default='ffn_only'" in out and "ffn_only|attn_only|all" in out
    assert format_help(DemoConfig) in out


def test_to_dict_is_plain():
    d = to_dict(parse_args_or_raise(DemoConfig, ["--depth=3"]))
    assert d == {"depth": 3, "lr": 0.02, "molegrad": False, "target": "ffn_only", "source": "sft", "run": "dummy"}


@pytest.mark.multiprocess
def test_script_help_and_error_exit_codes():
    """A real entry point: --help exits 0 and lists flags; a bad flag exits 2 with one line."""
    ok = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--num_files" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--num_files=many"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --num_files: expected an integer, got 'many'"]
