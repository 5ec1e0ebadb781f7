"""Methods by name, and the settings every method, learner and task is made of.

A method is a config dataclass with `make_session(lm) -> Session`, registered under its name with
`@register_method(name)`. Every field of a config is a **setting**, declared with `setting(default, help, ...)`:
its default, help text, command-line flag and parser live in the field itself, so each front (the CLI's flags,
a run spec from a server request, a benchmark naming a method) reads them from one place and a new method is
one file plus its registration.

  method_config("longcache", window=2048, temp_lora=True)   a validated config, no model needed
  settings_of(config)                                       the settings that decide its results (a run's key)
"""

from __future__ import annotations

from dataclasses import field, fields, is_dataclass
from typing import Callable

from .errors import InfinictxError

METHODS: dict[str, type] = {}
_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default, help: str, *, flag: str | None = None, short: str | None = None,
            parse: Callable | None = None, choices: tuple | None = None, identity: bool = True, cli: bool = True,
            positional: bool = False, kw_only: bool = False):
    """A config field with what the fronts need to know about it:
    flag/short   the command-line flag (default --field-name) and a short form (-W)
    parse        turns the flag's text into the value (default: the field's type)
    choices      the allowed values
    identity     False for settings that do not change results (an output path): left out of a run's key
    cli          False for settings no flag sets
    positional   the flag is a positional argument (a file name)"""
    meta = {"help": help, "flag": flag, "short": short, "parse": parse, "choices": choices, "identity": identity,
            "cli": cli, "positional": positional}
    return field(default=default, metadata=meta, kw_only=kw_only)


def setting_type(f) -> Callable | None:
    """The type a setting's value must have (int, float, str, bool), its parser, or None (checked by its owner)."""
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    annotation = f.type.__name__ if isinstance(f.type, type) else str(f.type)   # a class, or its text
    names = [t.strip() for t in annotation.split("|") if t.strip() != "None"]
    return _SIMPLE.get(names[0]) if len(names) == 1 else None


def _checked(owner: str, f, value):
    kind = setting_type(f)
    if value is None:
        if f.default is None or "None" in str(f.type):
            return None
        raise InfinictxError(f"{owner}: setting {f.name} needs a value")
    if kind in (int, float, bool, str):
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}[kind](value)
        if not ok:
            raise InfinictxError(f"{owner}: setting {f.name} must be {kind.__name__}, got {value!r}")
    elif kind is not None and isinstance(value, str):
        value = kind(value)   # a parser: text from a flag or a request
    return value


def build(cls: type, settings: dict, owner: str | None = None):
    """`cls(**settings)`, with a clear error for an unknown setting or a value of the wrong type."""
    owner = owner or cls.__name__
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise InfinictxError(f"{owner} has no setting {', '.join(unknown)}; its settings are: {', '.join(known)}")
    return cls(**{k: _checked(owner, known[k], v) for k, v in settings.items()})


def _plain(value):
    if is_dataclass(value) and not isinstance(value, type):
        return settings_of(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def settings_of(config) -> dict:
    """Every setting of `config` that can change its results (nested configs as dicts, tuples as lists): what a
    report shows and what a checkpoint's key is made of, so no field can be forgotten."""
    return {f.name: _plain(getattr(config, f.name)) for f in fields(config) if f.metadata.get("identity", True)}


def register_method(name: str):
    """Class decorator: make a config class known under `name` to every front."""
    def register(cls):
        cls.method = name
        METHODS[name] = cls
        return cls
    return register


def method_config(name: str, /, **settings):
    """The config of the method called `name`, built from `settings` and validated (no model needed)."""
    if name not in METHODS:
        raise InfinictxError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return build(METHODS[name], settings, f"method {name}")


def parse_value(f, text: str):
    """A setting's value from text ("none" is None; booleans: true/false/1/0/yes/no)."""
    if text.lower() == "none":
        return None
    kind = setting_type(f)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise InfinictxError(f"setting {f.name} takes true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text) if kind is not None else text
    except ValueError:
        raise InfinictxError(f"setting {f.name} takes {kind.__name__}, got {text!r}")


def method_from_spec(spec: str, **overrides):
    """A config from one line of text, "name:setting=value:setting=value" (e.g. "razor:prefill=dense:sinks=8";
    values may hold commas, "memory:mem_layers=8,15,22"), `overrides` on top: how a benchmark or a job list names
    a method and its settings."""
    name, *pairs = spec.split(":")
    if name not in METHODS:
        raise InfinictxError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    known = {f.name: f for f in fields(METHODS[name])}
    settings = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or key not in known:
            raise InfinictxError(f"{spec!r}: {pair!r} is not setting=value for a setting of {name} "
                                 f"({', '.join(known)})")
        settings[key] = parse_value(known[key], text)
    return method_config(name, **{**settings, **overrides})
