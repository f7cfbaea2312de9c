"""Declared pass options: each pass names its options once, typed, with defaults, choices, bounds and help.

A pass's options are a frozen dataclass deriving from :class:`PassOptions` whose fields are made with
:func:`option`. Construction validates every value against its declaration (type, choices, bounds, a custom
check) and then the cross-option rules of :meth:`PassOptions.check`; a violation is an :class:`OptionError`
(a ``ValueError``) whose message names the option. Recipes, the command line (``--set PASS.OPTION=VALUE``) and
``optimize explain`` all read these declarations, so no option list is written twice.

Supported types: ``bool``, ``int``, ``float``, ``str``, ``tuple[str, ...]`` (a list of strings) and any of
those ``| None``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class OptionError(ValueError):
    """An option value that its declaration refuses, or an option that does not exist."""


def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, minimum: float | None = None,
           maximum: float | None = None, above: float | None = None,
           check: Callable[[Any], object] | None = None) -> Any:
    """A declared option field: ``minimum``/``maximum`` bound it inclusively, ``above`` exclusively; ``check``
    raises ``ValueError`` for values it refuses (its message is shown)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
                "maximum": maximum, "above": above, "check": check}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One declared option as tools show it."""

    name: str
    kind: str
    """``bool``, ``int``, ``float``, ``str`` or ``strings`` (a list of strings)."""
    optional: bool
    """``None`` is a valid value."""
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    check: Callable[[Any], object] | None = None
    """Raises ``ValueError`` for values the declaration refuses beyond type, choices and bounds."""

    def describe(self) -> str:
        """The type and the allowed values in a few words, e.g. ``int in 2..8`` or ``one of minmax, mse``."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = "list of strings" if self.kind == "strings" else self.kind
            if self.minimum is not None and self.maximum is not None:
                text += f" in {self.minimum:g}..{self.maximum:g}"
            elif self.minimum is not None:
                text += f" >= {self.minimum:g}"
            elif self.above is not None and self.maximum is not None:
                text += f" > {self.above:g} and <= {self.maximum:g}"
            elif self.above is not None:
                text += f" > {self.above:g}"
        return text + (" or none" if self.optional else "")

    def parse(self, text: str) -> Any:
        """The value ``text`` (a command-line string) stands for; raises :class:`OptionError`."""
        if self.optional and text.lower() in ("none", "null"):
            return None
        try:
            if self.kind == "bool":
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                return text.lower() in _TRUE
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
        except ValueError:
            raise OptionError(f"option {self.name!r} must be {self.describe()}, got {text!r}") from None
        if self.kind == "strings":
            return tuple(part for part in text.split(",") if part)
        return text

    def validate(self, value: Any) -> Any:
        """``value`` normalised (a list of strings becomes a tuple, an int for a float option a float); raises
        :class:`OptionError` when the declaration refuses it."""
        if value is None and self.optional:
            return None
        if self.kind == "strings":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                    not all(isinstance(v, str) for v in value):
                raise OptionError(f"option {self.name!r} must be a list of strings, got {value!r}")
            value = tuple(value)
        elif self.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, {"bool": bool, "int": int, "float": float, "str": str}[self.kind]) or \
                (self.kind == "int" and isinstance(value, bool)):
            raise OptionError(f"option {self.name!r} must be {self.describe()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"option {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.kind in ("int", "float") and not _within(value, self.minimum, self.maximum, self.above):
            raise OptionError(f"option {self.name!r} must be {self.describe()}, got {value!r}")
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as exc:
                raise OptionError(f"option {self.name!r}: {exc}") from None
        return value


class PassOptions:
    """Base of a pass's option dataclass (declare subclasses ``@dataclass(frozen=True)``).

    ``check`` holds the rules that tie options together; it raises ``ValueError``.
    """

    _specs: ClassVar[dict[type, tuple[OptionSpec, ...]]] = {}

    def __post_init__(self) -> None:
        for spec in self.specs():
            object.__setattr__(self, spec.name, spec.validate(getattr(self, spec.name)))
        try:
            self.check()
        except OptionError:
            raise
        except ValueError as exc:
            raise OptionError(str(exc)) from None

    def check(self) -> None:
        """Raise ``ValueError`` when the options contradict each other."""

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        """The declarations, in field order."""
        if cls not in PassOptions._specs:
            hints = typing.get_type_hints(cls)
            PassOptions._specs[cls] = tuple(
                OptionSpec(field.name, *_kind(hints[field.name], cls, field.name), field.default,
                           field.metadata.get("help", ""), field.metadata.get("choices"),
                           field.metadata.get("minimum"), field.metadata.get("maximum"), field.metadata.get("above"),
                           field.metadata.get("check"))
                for field in dataclasses.fields(cls))
        return PassOptions._specs[cls]

    @classmethod
    def spec(cls, name: str) -> OptionSpec:
        """The declaration of option ``name``; raises :class:`OptionError` naming the valid options."""
        for spec in cls.specs():
            if spec.name == name:
                return spec
        raise OptionError(f"no option {name!r}; options: {cls.option_names()}")

    @classmethod
    def option_names(cls) -> str:
        """The option names, comma-separated (``none`` when there are none)."""
        return ", ".join(spec.name for spec in cls.specs()) or "none"

    @classmethod
    def build(cls, values: dict[str, Any]) -> PassOptions:
        """Options from ``values`` (missing ones default); unknown names are an :class:`OptionError`."""
        unknown = sorted(set(values) - {spec.name for spec in cls.specs()})
        if unknown:
            raise OptionError(f"no option {', '.join(map(repr, unknown))}; options: {cls.option_names()}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every option's value by name."""
        return {spec.name: getattr(self, spec.name) for spec in self.specs()}


@dataclass(frozen=True)
class NoOptions(PassOptions):
    """A pass without options."""


def _within(value: float, minimum: float | None, maximum: float | None, above: float | None) -> bool:
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum) and \
        (above is None or value > above)


def _kind(hint: Any, owner: type, name: str) -> tuple[str, bool]:
    """(kind, optional) of a field's type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if hint in _KINDS:
        return _KINDS[hint], optional
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, Ellipsis):
        return "strings", optional
    raise TypeError(f"{owner.__name__}.{name}: unsupported option type {hint!r}")


def check_patterns(patterns: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first of ``patterns`` that is not a valid regular expression (an
    :func:`option` ``check`` for node-name pattern lists)."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"bad pattern {pattern!r}: {exc}") from None
