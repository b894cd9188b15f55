"""The one config parser shared by train.py, sample.py and bench.py (which reads the main job's config).

Each CLI declares its defaults as a dataclass. Arguments apply strictly left to right, later ones
overriding earlier ones: a config file (a Python file of plain assignments) sets every key it
assigns, a --key=value flag sets one key. So the nanoGPT habit works:

    python train.py configs/shakespeare_char.py --batch_size=32

Unlike nanoGPT's configurator (exec into module globals), every key is checked against the
dataclass: unknown keys get a did-you-mean suggestion and values are type-checked.
"""

import ast
import dataclasses
import difflib
import inspect
import json
import re
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from runtime import ConfigError

T = TypeVar("T")


def parse_config(defaults: T, argv: list[str] | None = None, prog: str = "", description: str = "") -> T:
    """Return a copy of the dataclass `defaults` with the config files and flags in argv (default:
    sys.argv[1:]) applied. --help prints the keys and exits 0; bad input raises ConfigError (exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(usage(defaults, prog, description))
        sys.exit(0)
    hints = _field_types(defaults)
    overrides: dict[str, Any] = {}
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, raw = arg[2:].partition("=")
            _check_known(key, hints, arg)
            if not has_value and bool not in _allowed_types(hints[key]):  # only a bool may be a bare --flag
                raise ConfigError(f"{arg} needs a value, e.g. {arg}={getattr(defaults, key)!r}")
            value = _parse_value(raw) if has_value else True
            overrides[key] = _check_type(key, value, hints[key], arg, raw if has_value else None)
        else:
            for key, value in read_config_file(arg).items():
                _check_known(key, hints, arg)
                overrides[key] = _check_type(key, value, hints[key], arg)
    return dataclasses.replace(defaults, **overrides)


# Range rules for check_values: (test of the value, what the message says it must be).
Rule = tuple[typing.Callable[[Any], bool], str]
AT_LEAST_1: Rule = (lambda v: v >= 1, "must be at least 1")
AT_LEAST_1_OR_NONE: Rule = (lambda v: v is None or v >= 1, "must be at least 1 or None")
NOT_NEGATIVE: Rule = (lambda v: v is None or v >= 0, "must not be negative")
POSITIVE: Rule = (lambda v: v > 0, "must be positive")
BELOW_ONE: Rule = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def one_of(*allowed: str) -> Rule:
    return (lambda v: v in allowed, f"must be one of {', '.join(allowed)}")


def check_values(cfg: Any, rules: dict[str, Rule]) -> None:
    """Refuse the first value of cfg that breaks its rule: ConfigError '<key> <must ...>, got <value>'."""
    for key, (ok, must) in rules.items():
        value = getattr(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key} {must}, got {value!r}")


def usage(defaults: Any, prog: str = "", description: str = "") -> str:
    comments = _field_comments(type(defaults))
    hints = _field_types(defaults)
    rows = []
    for f in dataclasses.fields(defaults):
        if f.name in hints:
            help_text = f.metadata.get("help") or comments.get(f.name, "")
            rows.append((f"--{f.name}={getattr(defaults, f.name)!r}", _type_name(hints[f.name]), help_text))
    w0, w1 = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
    lines = [f"usage: {prog or Path(sys.argv[0]).name} [config_file.py ...] [--key=value ...]", ""]
    if description:
        lines += [description, ""]
    lines += [
        "Arguments apply left to right and later ones win: a config file (Python assignments) sets",
        "every key it assigns, a --key=value flag sets one key. A bare --flag sets a bool key to True.",
        "",
        "keys (with defaults):",
    ]
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


def _field_types(defaults: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(defaults))  # resolves string annotations too
    return {f.name: hints[f.name] for f in dataclasses.fields(defaults) if f.init}


def read_config_file(path: str) -> dict[str, Any]:
    """The keys a config file sets: a Python file of assignments, or a JSON object (a run's config.json)."""
    try:
        source = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"cannot read config file '{path}': {reason} (arguments are config files or --key=value flags)"
        ) from None
    if path.endswith(".json"):
        try:
            values = json.loads(source)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file '{path}' is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{path}' must hold a JSON object of keys and values")
        return values
    namespace: dict[str, Any] = {}  # a fresh namespace, so a config cannot touch the caller's globals
    try:
        exec(compile(source, path, "exec"), namespace)
    except Exception as err:  # a syntax error, or an error raised while it runs
        line = err.lineno if isinstance(err, SyntaxError) else _line_in(path, err)
        raise ConfigError(f"config file '{path}', line {line}: {type(err).__name__}: {err}") from None
    # Keep plain values: a config may import modules, define helpers, and use _private temporaries.
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)
    }


def _line_in(path: str, err: Exception) -> int | str:
    """The line of path where err was raised, from its traceback."""
    frames = traceback.walk_tb(err.__traceback__)
    lines = [line for frame, line in frames if frame.f_code.co_filename == path]
    return lines[-1] if lines else "?"


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):  # not a Python literal: take it as a string, e.g. shakespeare_char
        return raw


def _check_known(key: str, hints: dict[str, Any], source: str) -> None:
    if key in hints:
        return
    close = difflib.get_close_matches(key, hints, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "run with --help to list the keys"
    raise ConfigError(f"unknown config key '{key}' (from {source}); {hint}")


def _allowed_types(hint: Any) -> tuple[type, ...]:
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(typing.get_origin(t) or t for t in members)  # list[int] is checked as list


def _type_name(hint: Any) -> str:
    return " | ".join("None" if t is type(None) else t.__name__ for t in _allowed_types(hint))


def _check_type(key: str, value: Any, hint: Any, source: str, raw: str | None = None) -> Any:
    allowed = _allowed_types(hint)
    if type(value) in allowed:  # exact type: a bool is an int to isinstance, but not here
        return value
    if type(value) is int and float in allowed:
        return float(value)
    if raw is not None and str in allowed:  # --start=42 for a str key means the string '42'
        return raw
    raise ConfigError(
        f"config key '{key}' (from {source}) expects {_type_name(hint)}, "
        f"got {value!r} ({type(value).__name__})"
    )


def _field_comments(cls: type) -> dict[str, str]:
    """Inline `# comments` on the dataclass's field lines, the project's config style, used as help."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source file, e.g. a class defined in a REPL
        return {}
    # Corner cut: a '#' inside a string default would be taken for the comment's start.
    return dict(re.findall(r"^\s*(\w+)\s*:[^#\n]*#\s*(.*?)\s*$", source, flags=re.MULTILINE))
