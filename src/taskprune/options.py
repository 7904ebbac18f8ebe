"""Settings objects as typed, frozen dataclasses, and what is derived from them: the options of a
command (argparse) and the checked construction from a YAML mapping (a study config).

A field is declared once, with `option()`: its type hint (with `Literal` for fixed choices), its
default, its help text and its value rules. `add_options` turns the fields of a settings class into
command-line options; `from_args` reads them back; `build` makes the object from a mapping, where
unknown keys, wrong types and values outside the rules are `ConfigError`s naming the key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import types
from dataclasses import MISSING, Field, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and the fix."""


def option(default: Any = MISSING, *, help: str = "", flag: str | None = None, default_factory: Any = MISSING,
           was: Any = MISSING, **rules: Any) -> Any:
    """A settings field. `help` is its one-line description (the default is appended on the command line);
    `flag` replaces the derived `--field-name`. `was` is the field's default before it changed: identities
    (`non_default`) leave that value out instead of the new default, so a study begun under the old default
    and now naming that value keeps its hash. Rules, on the
    value or on every element of a list or mapping value: `min`, `max` (inclusive), `gt`, `lt` (exclusive),
    `choices` (for names from a registry; fixed choices are a `Literal` type) and `nonempty`."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "flag": flag, "rules": rules, "was": was})


def _rules(f: Field) -> dict:
    return f.metadata.get("rules", {})


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _identity_default(f: Field) -> Any:
    """The value an identity leaves out: the default the field had before it changed (`was`), else its default."""
    was = f.metadata.get("was", MISSING)
    return _default(f) if was is MISSING else was


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


# -- identity -------------------------------------------------------------------------------------


def non_default(obj) -> dict:
    """A settings object's fields that differ from their defaults (nested ones likewise).

    This is what identifies a study or its evaluation: an option added later with a default leaves
    the hash of every existing study, and so its resumable directory, as it was. An option whose default
    changed is compared with its old default (`option(was=...)`): a study begun under the old default
    keeps its hash when its config names that value, and one that does not is told what differs.
    """
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            value = non_default(value)
            if value:
                out[f.name] = value
        elif _required(f) or value != _identity_default(f):
            out[f.name] = value
    return out


def settings_hash(obj) -> str:
    return hashlib.sha256(json.dumps(non_default(obj), sort_keys=True, default=list).encode()).hexdigest()


# -- from a mapping (YAML) -------------------------------------------------------------------------


def _alternatives(hint) -> tuple:
    """The non-None members of a union hint (the hint itself otherwise)."""
    if get_origin(hint) in (Union, types.UnionType):
        return tuple(a for a in get_args(hint) if a is not type(None))
    return (hint,)


def _describe(hint) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in _alternatives(hint)) + (" (or null)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return f"a mapping of {_describe(args[0]).removeprefix('a ')} to {_describe(args[1]).removeprefix('an ')}"
    if is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            Path: "a path"}[hint]


def _convert(value, hint, where: str):
    """`value` as the field type `hint`, or a ConfigError naming `where`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in _alternatives(hint):
            try:
                return _convert(value, inner, where)
            except ConfigError:
                shaped = {dict: dict, tuple: (list, tuple)}.get(get_origin(inner) or inner)
                if shaped and isinstance(value, shaped):  # the right shape, a wrong element: say which
                    raise
        raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}") from None
    if is_dataclass(hint):
        return build(hint, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: unknown {value!r}; use {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            hint_text = f" (write [{value}])" if isinstance(value, (int, float, str)) else ""
            raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}{hint_text}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
        if not args:
            return dict(value)
        return {_convert(k, args[0], f"{where} key"): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint in (str, Path):
        ok = isinstance(value, str)
        value = hint(value) if ok else value
    else:
        raise TypeError(f"settings field {where} has a type the loader does not know: {hint!r}")
    if not ok:
        raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
    return value


def _check(value, rules: dict, where: str) -> None:
    """A field's rules; list and mapping values are checked element by element."""
    if value is None:
        return
    if rules.get("nonempty") and not value:
        raise ConfigError(f"{where} is empty; give at least one")
    if isinstance(value, dict):
        items = [(f"{where}.{k}", v) for k, v in value.items()]
    elif isinstance(value, tuple):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [(where, value)]
    for where, v in items:
        if "choices" in rules and v not in rules["choices"]:
            raise ConfigError(f"{where}: unknown {v!r}; use {', '.join(rules['choices'])}")
        if isinstance(v, str):  # a word of an `int | Literal[...]` field: the bounds are for its numbers
            continue
        if "min" in rules and v < rules["min"]:
            raise ConfigError(f"{where}: {v} is below the minimum {rules['min']}")
        if "max" in rules and v > rules["max"]:
            raise ConfigError(f"{where}: {v} is above the maximum {rules['max']}")
        if "gt" in rules and "lt" in rules and not rules["gt"] < v < rules["lt"]:
            raise ConfigError(f"{where}: {v} is not strictly between {rules['gt']} and {rules['lt']}")
        elif "gt" in rules and "lt" not in rules and not v > rules["gt"]:
            raise ConfigError(f"{where}: {v} is not above {rules['gt']}")


def build(cls, data: dict, where: str = ""):
    """`cls` from a mapping: every key known, every value of its field's type and within its rules."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in {where or 'the config'}; known: {', '.join(known)}")
    missing = [n for n, f in known.items() if n not in data and _required(f)]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(missing)}{' in ' + where if where else ''}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        kwargs[key] = _convert(value, hints[key], name)
        _check(kwargs[key], _rules(known[key]), name)
    return cls(**kwargs)


# -- command line ----------------------------------------------------------------------------------


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: `kind` (int or float) within the bounds, else a message saying which."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if low is not None and high is not None:
                if low_open and high_open:
                    want = f"strictly between {low:g} and {high:g}"
                else:
                    want = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                want = f"{'greater than' if low_open else 'at least'} {low:g}"
            else:
                want = f"{'less than' if high_open else 'at most'} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


class Items(argparse.Action):
    """A list option: repeat it or comma-separate its values; each checked against `choices`."""

    def __init__(self, *args, item_choices=None, **kwargs):
        self.item_choices = item_choices
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v for v in values.split(",") if v]
        for v in items:
            if self.item_choices is not None and v not in self.item_choices:
                raise argparse.ArgumentError(self, f"unknown {v!r}; use {', '.join(self.item_choices)}")
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*(current if isinstance(current, list) else []), *items])


def _dest(cls, f: Field) -> str:
    return f"{cls.__name__}.{f.name}"


def _cli_type(hint) -> tuple[Any, tuple | None]:
    """The scalar type a command-line value is parsed as, and its fixed choices (a Literal's)."""
    scalar = next((a for a in _alternatives(hint) if get_origin(a) is not dict and a is not dict), None)
    if get_origin(scalar) is Literal:
        return str, get_args(scalar)
    return scalar, None


def _words(hint) -> tuple:
    """The words a number field also takes (`int | Literal["auto"]`: ("auto",))."""
    return tuple(w for a in _alternatives(hint) if get_origin(a) is Literal for w in get_args(a))


def _number_or_words(parse, words: tuple):
    """An argparse type: one of `words`, else a number parsed by `parse`."""
    def parse_any(text: str):
        if text in words:
            return text
        try:
            return parse(text)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (or use {' or '.join(words)})") from None
    parse_any.__name__ = parse.__name__
    return parse_any


def _help(f: Field, default) -> str:
    text = f.metadata.get("help", "")
    if default is None or default is False or isinstance(default, bool) or "default" in text:
        return text
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default {shown})" if text else f"default {shown}"


def add_options(parser, cls, required: bool | tuple[str, ...] | None = None,
                only: tuple[str, ...] | None = None) -> None:
    """The command-line options of `cls`'s fields (of them, `only` these). The fields without a default
    are required, unless `required` is False (none is) or names the required fields."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = None if _required(f) else _default(f)
        kwargs = {"dest": _dest(cls, f), "default": default, "help": _help(f, default)}
        rules, hint = _rules(f), hints[f.name]
        if isinstance(required, tuple):
            kwargs["required"] = f.name in required
        elif _required(f):
            kwargs["required"] = required is not False
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif get_origin(hint) is tuple:
            _, choices = _cli_type(get_args(hint)[0])
            kwargs.update(action=Items, metavar=f.name.upper(), item_choices=choices or rules.get("choices"))
        else:
            kind, choices = _cli_type(hint)
            choices = choices or rules.get("choices")
            if choices:
                kwargs["choices"] = choices
            elif kind in (int, float):
                low, low_open = (rules["gt"], True) if "gt" in rules else (rules.get("min"), False)
                high, high_open = (rules["lt"], True) if "lt" in rules else (rules.get("max"), False)
                kwargs["type"] = number(kind, low, high, low_open, high_open)
                if _words(hint):
                    kwargs["type"] = _number_or_words(kwargs["type"], _words(hint))
            elif kind is Path:
                kwargs["type"] = Path
            kwargs["metavar"] = None if choices else f.name.upper()
        parser.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, **extra):
    """`cls` from the options `add_options` added (list options as tuples), plus `extra` fields."""
    values = {}
    for f in fields(cls):
        if hasattr(args, _dest(cls, f)):
            value = getattr(args, _dest(cls, f))
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **extra})


__all__ = ["ConfigError", "option", "non_default", "settings_hash", "build", "number", "add_options", "from_args"]
