"""Command-line flags generated from dataclass fields.

Every script declares its knobs as a dataclass; `parse_args` turns each field into a flag:

    @dataclass
    class TrainConfig:
        depth: int = field(default=4, metadata={"help": "number of transformer blocks"})
        target_layers: str = field(default="ffn_only", metadata={"choices": ("ffn_only", "all")})

    cfg = parse_args(TrainConfig, argv)      # --depth=6, --depth 6, --enable_x=True/False/1/0

Errors (unknown flag, bad value, failed validation) print ONE line naming the flag and what was
expected, and exit with status 2. A dataclass may define `validate(self)` raising ConfigError
for cross-field checks. `to_dict(cfg)` gives the plain dict stored in checkpoint metadata.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A bad flag or value; the message names the flag and what was expected."""


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
    lines = [f"usage: {prog or 'python -m ...'} [--flag=value ...]", ""]
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc and not doc[0].startswith(cls.__name__ + "("):
        lines += [doc[0], ""]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        short = f.metadata.get("short")
        name = f"--{f.name}" + (f", {short}" if short else "")
        extra = f" (one of: {'|'.join(f.metadata['choices'])})" if "choices" in f.metadata else ""
        lines.append(f"  {name:<32} {_type_name(types[f.name]):<6} default={default!r}{extra}")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def parse_args_or_raise(cls: type[T], argv: Sequence[str]) -> T:
    """Parse `argv` into an instance of the dataclass `cls`; raise ConfigError on any problem."""
    types = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    shorts = {f.metadata["short"]: f.name for f in fields.values() if f.metadata.get("short")}
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
            raw = raw if eq else None
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
            raise ConfigError(f"--{name}: expected one of {'|'.join(map(str, choices))}, got {raw!r}")
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
