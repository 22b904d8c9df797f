"""One configuration mechanism: settings dataclasses that read and write plain dicts the same way.

A settings class is a dataclass that also derives from `Config`. Its `to_dict` gives JSON- and
weights_only-safe values (tuples as lists, nested settings as dicts); `from_dict` is its inverse:
missing keys take the defaults, an unknown key or a value of the wrong type is a one-line IkrError
naming the key and where the dict came from, and a field declared with `setting(choices=...)`
only takes one of those names. `add_flags` builds command-line options from the same fields, so a
default, a choice list or a help text is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Self

from .errors import IkrError


def setting(default: Any = dataclasses.MISSING, *, choices: tuple[str, ...] | None = None, help: str = "", **kw: Any):
    """A dataclass field with the names it may take (`choices`) and a help text for its command-line flag."""
    metadata = {"choices": choices, "help": help}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


class Config:
    """Mixin of the settings dataclasses: one `to_dict` / `from_dict` behaviour for all of them."""

    def to_dict(self) -> dict:
        """Plain values: tuples as lists, nested settings as dicts."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict, source: object | None = None) -> Self:
        """The settings in `data` (missing keys: defaults); unknown keys, wrong types and unknown names refused."""
        if not isinstance(data, dict):
            raise IkrError(f"{_label(cls)}: expected a mapping of settings, got {type(data).__name__}", source)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise IkrError(f"unknown {_label(cls)} setting {unknown[0]!r} (known: {', '.join(known)})", source)
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():
            values[name] = _convert(value, hints[name], f"{_label(cls)} setting {name!r}", source)
            choices = known[name].metadata.get("choices")
            if choices and values[name] not in choices:
                raise IkrError(
                    f"{_label(cls)} setting {name!r} is {value!r}; choose one of {', '.join(choices)}", source
                )
        return cls(**values)


def _label(cls: type) -> str:
    """'RegistrationConfig' -> 'RegistrationConfig' (the class name, as users see it in errors)."""
    return cls.__name__


def _plain(value: Any) -> Any:
    """A settings value as plain data."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _convert(value: Any, hint: Any, what: str, source: object | None) -> Any:
    """`value` checked against the type hint (lists become tuples, dicts become nested settings)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, what, source)
            except IkrError as err:
                errors.append(err)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise IkrError(f"{what} must be a list, not {value!r}", source)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], what, source) for v in value)
        if len(value) != len(args):
            raise IkrError(f"{what} must have {len(args)} values, not {len(value)}", source)
        return tuple(_convert(v, a, what, source) for v, a in zip(value, args, strict=True))
    if isinstance(hint, type) and issubclass(hint, Config):
        return value if isinstance(value, hint) else hint.from_dict(value, source)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    elif hint is Any:
        return value
    raise IkrError(f"{what} must be {getattr(hint, '__name__', hint)}, not {value!r}", source)


def add_flags(parser: argparse.ArgumentParser, cls: type[Config], flags: dict[str, str]) -> None:
    """Command-line options for some fields of a settings class: {field name: flag}, e.g. {'alignment': '--align'}.

    Type, default, choices and help come from the field; the option's dest is the flag's name
    (`--max-keypoints` -> args.max_keypoints).
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for name, flag in flags.items():
        f = known[name]
        hint = hints[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text or None)
            continue
        if default is not None:
            help_text = f"{help_text} (default {default})".strip()
        parser.add_argument(
            flag,
            type=None if kind in (str, bool, Path) else kind,
            default=default,
            choices=f.metadata.get("choices"),
            help=help_text or None,
        )


def flag_values(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The values parsed for the options of `add_flags`: {field name: value}."""
    return {name: getattr(args, flag.lstrip("-").replace("-", "_")) for name, flag in flags.items()}
