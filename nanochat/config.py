"""Command-line flags generated from dataclass fields.

Every script declares its knobs as a dataclass; `parse_args` turns each field into a flag (a field
with metadata {"positional": True} also takes a bare word: `python -m nanochat.report generate`):

    @dataclass
    class TrainConfig:
        depth: int = field(default=4, metadata={"help": "number of transformer blocks"})
        target_layers: str = field(default="ffn_only", metadata={"choices": ("ffn_only", "all")})

    cfg = parse_args(TrainConfig, argv)      # --depth=6, --depth 6, --enable_x=True/False/1/0

A field may also answer to older names: metadata {"aliases": ("enable_streaming",)} (kept for the
command lines of earlier releases; --help lists them beside the field's own name).

Errors (unknown flag, bad value, failed validation) print ONE line naming the flag and what was
expected, and exit with status 2. A dataclass may define `validate(self)` raising ConfigError
for cross-field checks (call super().validate() first). `to_dict(cfg)` gives the plain dict
stored in checkpoint metadata.

The flag groups every entry point shares are defined here once and inherited:
`RuntimeFlags` (where and how it runs) and `CheckpointFlags` (which checkpoint it reads).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence, TypeVar

T = TypeVar("T")

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class UserError(Exception):
    """An expected failure the user can fix (a bad flag, a missing file, a lost peer): its message
    is one line that names what is wrong, and entry points print it as `error: ...` (exit != 0)
    instead of a traceback. Every such exception class of the library derives from it."""


class ConfigError(UserError, ValueError):
    """A bad flag or value; the message names the flag and what was expected."""


CHECKPOINT_KINDS = ("base", "mid", "sft", "rl")  # the training stages, in pipeline order
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("cuda", "mps", "cpu")
TASK_SOURCES = ("auto", "online", "offline")  # hub tasks: online, offline stand-ins, or online when reachable


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(flag: str, raw: str, typ: Any) -> Any:
    """Turn the string `raw` into `typ`, or raise ConfigError naming `flag`."""
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":  # Optional[X] / X | None
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", ""):
            return None
        return _convert(flag, raw, args[0])
    if typ is bool:
        low = raw.lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
        raise ConfigError(f"--{flag}: expected a boolean (True/False/1/0), got {raw!r}")
    if typ is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--{flag}: expected an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--{flag}: expected a number, got {raw!r}") from None
    if typ is str:
        return raw
    raise ConfigError(f"--{flag}: unsupported flag type {typ!r}")


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ).replace("typing.", ""))


def format_help(cls: type, prog: str = "") -> str:
    """One line per flag: name, type, default, help."""
    types = _field_types(cls)
    positionals = "".join(f" {f.name.upper()}" for f in dataclasses.fields(cls) if f.metadata.get("positional"))
    lines = [f"usage: {prog or 'python -m ...'}{positionals} [--flag=value ...]", ""]
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc and not doc[0].startswith(cls.__name__ + "("):
        lines += [doc[0], ""]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        short = f.metadata.get("short")
        name = f.name.upper() if f.metadata.get("positional") else f"--{f.name}" + (f", {short}" if short else "")
        extra = f" (one of: {'|'.join(f.metadata['choices'])})" if "choices" in f.metadata else ""
        aliases = f" (also {', '.join('--' + alias for alias in f.metadata['aliases'])})" if f.metadata.get("aliases") else ""
        lines.append(f"  {name:<32} {_type_name(types[f.name]):<6} default={default!r}{extra}{aliases}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def parse_args_or_raise(cls: type[T], argv: Sequence[str]) -> T:
    """Parse `argv` into an instance of the dataclass `cls`; raise ConfigError on any problem."""
    types = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    shorts = {f.metadata["short"]: f.name for f in fields.values() if f.metadata.get("short")}
    aliases = {alias: f.name for f in fields.values() for alias in f.metadata.get("aliases", ())}
    positionals = [f.name for f in fields.values() if f.metadata.get("positional")]
    values: dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in shorts:
            name, raw = shorts[arg], None
        elif arg.startswith("--"):
            name, eq, raw = arg[2:].partition("=")
            name = name.replace("-", "_")
            name = aliases.get(name, name)
            raw = raw if eq else None
        elif positionals:
            name, raw = positionals.pop(0), arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --name=value")
        if name not in fields:
            raise ConfigError(f"--{name}: unknown flag (see --help)")
        if raw is None:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not (nxt.startswith("--") or nxt in shorts):
                raw, i = nxt, i + 1
            elif types[name] is bool:
                raw = "true"  # a bare boolean flag switches it on
            else:
                raise ConfigError(f"--{name}: expected a value ({_type_name(types[name])})")
        value = _convert(name, raw, types[name])
        choices = fields[name].metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{'' if fields[name].metadata.get('positional') else '--'}{name}: expected one of {'|'.join(map(str, choices))}, got {raw!r}")
        values[name] = value
        i += 1
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        validate()
    return cfg


def parse_args(cls: type[T], argv: Sequence[str] | None = None, prog: str = "") -> T:
    """Like parse_args_or_raise, but prints --help / one-line errors and exits (status 0 / 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(format_help(cls, prog))
        raise SystemExit(0)
    try:
        return parse_args_or_raise(cls, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The parsed config as a plain dict (for checkpoint metadata and the report)."""
    return dataclasses.asdict(cfg)


def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds: for `validate` methods."""
    if not condition:
        raise ConfigError(message)


# ---------------------------------------------------------------------------------------------
# the flag groups every entry point shares

@dataclass
class Flags:
    """Base of every config dataclass: flag groups combine by multiple inheritance, and each
    validate() calls super().validate() so that every group's checks run."""

    def validate(self) -> None:
        pass


@dataclass
class RuntimeFlags(Flags):
    """Where and how a script runs: every entry point that runs a model takes these."""

    device: str = field(default="", metadata={"help": "cuda|mps|cpu (empty = autodetect)"})
    dtype: str = field(default="auto", metadata={
        "help": "compute dtype (auto = bfloat16 where the hardware has it, float32 elsewhere)", "choices": DTYPES})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = all cores, split among ranks)"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model's forward"})
    # why an entry point cannot honour --compile (empty: it can); --compile=True there is refused
    compile_refused: ClassVar[str] = ""

    def validate(self) -> None:
        """Checked at parse time, before any model or data loads: a bad device is one line."""
        super().validate()
        check(not (self.compile and self.compile_refused), f"--compile: not supported here: {self.compile_refused}")
        check(self.threads >= 0, f"--threads: expected >= 0 (0 = all cores), got {self.threads}")
        if self.device != "":
            check_device(self.device)


def check_device(device: str) -> None:
    """ConfigError unless `device` is one of DEVICES and available here (the one device check)."""
    check(device in DEVICES, f"--device: expected one of {'|'.join(DEVICES)} (or empty = autodetect), got {device!r}")
    import torch

    check(device != "cuda" or torch.cuda.is_available(), f"--device=cuda: {cuda_unavailable_reason()}")
    check(device != "mps" or torch.backends.mps.is_available(),
          "--device=mps: MPS is not available here (torch.backends.mps.is_available() is False)")


def cuda_unavailable_reason() -> str:
    """Why torch sees no GPU, and what to do, in one line (the build, the environment, the driver)."""
    import torch

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: install the CUDA build (bash runs/setup_env.sh)"
    if hidden is not None and hidden.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no usable GPU: no GPU, or an "
            f"NVIDIA driver too old for CUDA {torch.version.cuda} (nvidia-smi shows the driver's CUDA version): "
            f"update the driver, or install a torch build for an older CUDA (runs/setup_env.sh's TORCH_INDEX_URL)")


def source_field(default: str, kinds: tuple[str, ...] = CHECKPOINT_KINDS) -> Any:
    """The `-i/--source` field: which stage's checkpoints to read (a script narrows `kinds`)."""
    return field(default=default, metadata={"short": "-i", "help": "checkpoint kind to read", "choices": kinds})


@dataclass
class CheckpointFlags(Flags):
    """Which checkpoint a script reads: every entry point that loads a trained model takes these."""

    source: str = source_field("sft")
    model_tag: str = field(default="", metadata={"short": "-c", "help": (
        "checkpoint: a tag (d12), a checkpoint directory, or a model_NNNNNN.pt file (that step) (empty = the newest)")})
    step: int = field(default=-1, metadata={"help": "checkpoint step (-1 = the last complete one, or the -c file's)"})
    init_from_hf: str = field(default="", metadata={
        "help": "a Hugging Face NanoChat folder (model + tokenizer) to start from instead of -i/-c/--step"})

    def validate(self) -> None:
        super().validate()
        check(self.step >= -1, f"--step: expected a step >= 0 (or -1 = the last), got {self.step}")
