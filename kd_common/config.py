"""One config mechanism for every command (prep, train, export, eval, finetune).

A command's settings are typed sections: pydantic dataclasses (`@section`) whose fields are declared with
`setting(default, help, ge=..., ...)`. From one declaration come:

- loading: a YAML file, then `key.sub=value` overrides (values in YAML syntax), then `--flag` options generated
  from the fields (`--max-seq-len 128`, `--train.max-steps 10`, `--no-dedup` for booleans, lists as several
  values), later sources winning;
- checking, in one pass: names (unknown keys with a "did you mean"), types, finiteness and ranges of every
  field, then every cross-field rule (a section's `problems()` method), all reported together as one
  `ConfigError` whose message names each key;
- `--help` (every flag with its doc and default) and `describe()` (one line per key).

Sections stay dataclasses (`dataclasses.replace`, `asdict` and `fields` work), and constructing one in code
validates it too. Nothing here executes code from a config: YAML is read with `safe_load`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Iterator, Optional

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from kd_common.errors import UserError

__all__ = [
    "ConfigError",
    "Float",
    "Int",
    "Bool",
    "Str",
    "section",
    "setting",
    "build",
    "load",
    "parse_overrides",
    "add_arguments",
    "from_arguments",
    "describe",
    "leaves",
    "to_yaml",
]


class ConfigError(UserError, ValueError):
    """The configuration names an unknown key, has a wrong type or an invalid value (the message names each).

    Built from one message or a list of them (`problems`, joined with "; " for the one-line message)."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-4" as a string
        except ValueError:
            return value
    return value


Float = Annotated[float, BeforeValidator(_number)]
Int = StrictInt  # no silent bool -> int or 3.0 -> 3
Bool = StrictBool
Str = StrictStr
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def section(cls: type) -> type:
    """Make `cls` a checked settings section (a pydantic dataclass: unknown keys refused, floats finite)."""
    return _pydantic_dataclass(config=_STRICT)(cls)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
    flag: Optional[str] = None,
    positional: bool = False,
    repeat: bool = False,
) -> Any:
    """A documented field; `gt/ge/lt/le` bound it (and each element of a list / value of a mapping: write the bound
    on the element type instead, `list[Annotated[Float, Field(ge=0)]]`); `flag` names its command-line option
    (default `--field-name`); `repeat` (a list): the flag takes one value and may be given again (`--compare A --compare B`)."""
    extra = {"flag": flag, "positional": positional, "repeat": repeat}
    if isinstance(default, (list, dict)):
        value = default
        return Field(default_factory=lambda: type(value)(value), description=help, gt=gt, ge=ge, lt=lt, le=le, json_schema_extra=extra)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return Field(default_factory=default, description=help, json_schema_extra=extra)
    if default is dataclasses.MISSING:
        return Field(description=help, gt=gt, ge=ge, lt=lt, le=le, json_schema_extra=extra)
    return Field(default, description=help, gt=gt, ge=ge, lt=lt, le=le, json_schema_extra=extra)


# ------------------------------------------------------------------------------------------------
# Reading


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.max_steps=10", "loss.weights={mlm: 1}"]` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # e.g. a path with a colon: kept as text, the type check decides
        _set_path(nested, key.strip(), value)
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    """`extra` over `base`, nested mappings merged key by key except those named in `replace` (taken whole)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replace:
            out[key] = merge(out[key], value, replace)
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------
# Checking


def _field_names(cls: type, loc: tuple) -> list[str]:
    """Field names of the section at `loc` inside `cls` (for "did you mean")."""
    for part in loc:
        hints = typing.get_type_hints(cls, include_extras=True)
        tp = _unwrap(hints.get(part)) if isinstance(part, str) else None
        if tp is None or not dataclasses.is_dataclass(tp):
            return []
        cls = tp
    return [f.name for f in dataclasses.fields(cls)]


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(inner[0]) if len(inner) == 1 else tp
    return tp


def _key(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _number(value: Any) -> str:
    """A bound as the user would write it: integers whole (1048576, not 1.04858e+06), other floats short (%g)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bound_text(ctx: dict) -> str:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(f"{symbols[k]} {_number(v)}" for k, v in ctx.items() if k in symbols)


def _message(cls: type, error: dict, data: dict) -> str:
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    key = _key(loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        names = _field_names(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        prefix = _key(loc[:-1]) + "." if len(loc) > 1 else ""
        hint = f" (did you mean {prefix}{close[0]}?)" if close else (f" (known: {', '.join(names)})" if names else "")
        return f"unknown config key {key}{hint}"
    if kind == "missing_argument" or kind == "missing":
        return f"{key} is required"
    if kind == "finite_number":
        return f"{key}={value!r} is not a finite number"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}={value!r} is out of range: it must be {_bound_text(error.get('ctx', {}))}"
    if kind == "literal_error":
        return f"{key}={value!r} is not one of {error['ctx']['expected'].replace(' or ', ', ')}"
    for name, words in (("int", "int"), ("float", "float"), ("bool", "bool"), ("string", "str"), ("list", "a list"), ("dict", "a mapping")):
        if kind.startswith(name) or kind == f"{name}_type":
            return f"{key} must be {words}, got {value!r}"
    if kind in ("dataclass_type", "dataclass_exact_type", "model_type"):
        return f"{key} must be a mapping of settings, got {value!r}"
    if kind == "value_error" and "boolean is not a number" in error["msg"]:
        return f"{key} must be float, got {value!r}"
    return f"{key}: {error['msg']} (got {value!r})"


def _drop(data: dict, loc: tuple) -> None:
    """Remove the value at `loc` so the rest can still be checked (its default is used in its place)."""
    if not loc:
        return  # a required top-level setting is missing: nothing to remove
    node: Any = data
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)
    elif isinstance(node, list) and isinstance(loc[-1], int) and loc[-1] < len(node):
        node.pop(loc[-1])


def build(cls: type, data: dict[str, Any]) -> Any:
    """Check `data` against section `cls` and its cross-field rules in one pass; every problem in one ConfigError."""
    problems: list[str] = []
    work = copy.deepcopy(data)
    adapter = TypeAdapter(cls)
    config = None
    for _ in range(8):  # each round drops what failed, so that the rest (and the cross-field rules) are still checked
        try:
            config = adapter.validate_python(work)
            break
        except ValidationError as exc:
            errors = exc.errors()
            problems += [m for m in (_message(cls, e, data) for e in errors) if m not in problems]
            for error in errors:
                loc = tuple(error["loc"])
                _drop(work, loc[:-1] if error["type"] in ("missing", "missing_argument") else loc)
                if len(loc) > 1 and isinstance(loc[-1], int):
                    _drop(work, loc[:-1])  # a bad list element: drop the whole list
    if config is not None:
        problems += [p for p in collect_problems(config) if p not in problems]
    if problems or config is None:
        raise ConfigError(problems or ["invalid configuration"])
    return config


def collect_problems(config: Any) -> list[str]:
    """The cross-field rules: every section's `problems()` (a list of messages), nested sections included."""
    found = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found += collect_problems(value)
    if hasattr(config, "problems"):
        found += list(config.problems())
    return found


def load(
    cls: type,
    path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    values: Optional[dict[str, Any]] = None,
    replace: tuple[str, ...] = (),
) -> Any:
    """YAML file, then `key=value` overrides, then `values` (nested dict, e.g. from flags); checked by `build`."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides or []), replace)
    data = merge(data, values or {}, replace)
    return build(cls, data)


# ------------------------------------------------------------------------------------------------
# Command line and help


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, type, pydantic FieldInfo) of every setting, nested sections expanded."""
    hints = typing.get_type_hints(cls, include_extras=True)
    infos = cls.__pydantic_fields__
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(_unwrap(tp)) and isinstance(_unwrap(tp), type):
            yield from leaves(_unwrap(tp), prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, infos[f.name]


def _default(info: Any) -> Any:
    if info.default_factory is not None:
        return info.default_factory()
    return None if info.is_required() else info.default


def _extra(info: Any) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _is_list(tp: Any) -> bool:
    return typing.get_origin(_unwrap(tp)) is list


def _scalar(tp: Any) -> Any:
    base = _unwrap(tp)
    if typing.get_origin(base) is list:
        base = _unwrap(typing.get_args(base)[0])
    return base


def _bounds(info: Any) -> str:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    parts = []
    for item in info.metadata:
        for name, symbol in symbols.items():
            if getattr(item, name, None) is not None:
                parts.append(f"{symbol} {_number(getattr(item, name))}")
    return ", ".join(parts)


def describe(cls: type) -> list[str]:
    """One line per setting: `key = default  # doc [range]`."""
    lines = []
    for key, _, info in leaves(cls):
        bounds = _bounds(info)
        lines.append(f"{key} = {_default(info)!r}  # {info.description or ''}" + (f" [{bounds}]" if bounds else ""))
    return lines


def _flag_name(key: str, info: Any) -> str:
    return _extra(info).get("flag") or "--" + key.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, config_file: bool = True, overrides: bool = True, skip: tuple[str, ...] = ()
) -> None:
    """`--config FILE`, positional `key=value` overrides and one `--flag` per setting of `cls`, with its doc as help."""
    if config_file:
        parser.add_argument("--config", help="YAML file of settings (any key below); flags and key=value overrides win over it")
    if overrides:
        parser.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="settings in YAML syntax, named as the flags below without the dashes (e.g. max_seq_len=128, train.max_steps=100)",
        )
    for key, tp, info in leaves(cls):
        if key in skip:
            continue
        base = _scalar(tp)
        default = _default(info)
        bounds = _bounds(info)
        text = (
            (info.description or "")
            + (f" [{bounds}]" if bounds else "")
            + (f" (default: {default!r})" if default not in (None, "", [], {}) else "")
        )
        text = text.replace("%", "%%")
        name = _flag_name(key, info)
        dest = "setting:" + key
        if _extra(info).get("positional"):
            parser.add_argument(dest, nargs="+" if _is_list(tp) else None, metavar=key.upper(), help=text)
        elif _extra(info).get("repeat"):
            parser.add_argument(name, dest=dest, action="append", default=argparse.SUPPRESS, metavar=key.split(".")[-1].upper(), help=text)
        elif base is bool and not _is_list(tp):
            parser.add_argument(name, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(
                name,
                dest=dest,
                nargs="+" if _is_list(tp) else None,
                default=argparse.SUPPRESS,
                metavar=key.split(".")[-1].upper(),
                help=text,
            )


def _convert(raw: Any, tp: Any) -> Any:
    """A flag's text as the setting's type: text stays text for str settings, anything else is read as YAML."""
    if isinstance(raw, list):
        return [_convert(item, _scalar(tp)) for item in raw]
    if not isinstance(raw, str) or _scalar(tp) is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def from_arguments(cls: type, args: argparse.Namespace, replace: tuple[str, ...] = ()) -> Any:
    """The checked section from parsed arguments: `--config` file < key=value overrides < flags."""
    types_of = {key: tp for key, tp, _ in leaves(cls)}
    values: dict[str, Any] = {}
    for dest, raw in vars(args).items():
        if dest.startswith("setting:") and raw is not None:
            key = dest[len("setting:") :]
            _set_path(values, key, _convert(raw, types_of[key]))
    return load(cls, getattr(args, "config", None), getattr(args, "overrides", None), values, replace)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def reference_markdown(cls: type, command: str) -> str:
    """A Markdown table of every setting of `cls` (key, flag, default, meaning, range), from the fields' own docs."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = [f"## `{command}`", "", "| key | flag | default | meaning | range |", "|---|---|---|---|---|"]
    for key, _, info in leaves(cls):
        rows.append(
            f"| `{key}` | `{_flag_name(key, info)}` | `{cell(repr(_default(info)))}` | {cell(info.description or '')} | {cell(_bounds(info))} |"
        )
    return "\n".join(rows) + "\n"
