"""Recipes: TOML files naming an ordered pass list with per-pass options.

A recipe file has ``description`` (one line), ``passes`` (pass names, in order) and optionally
``[options.PASS-NAME]`` tables of that pass's declared options (:mod:`onnxsmith.core.options`), validated when
the recipe is read: unknown keys and refused values are errors.
Built-in recipes are the ``*.toml`` files of the ``onnxsmith.recipes`` package; users copy and edit one.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from onnxsmith.core.errors import UserError
from onnxsmith.core.options import OptionError, PassOptions
from onnxsmith.core.pass_base import Pass
from onnxsmith.optimizer.aliases import ALIASES_BY_NAME
from onnxsmith.optimizer.registry import PASSES

DEFAULT_RECIPE = "cleanup"
_TOP_LEVEL_KEYS = {"description", "passes", "options"}


@dataclass(frozen=True)
class Recipe:
    """A named, ordered pass list with options for individual passes."""

    name: str
    description: str
    passes: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def overrides(self, pass_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """``pass_options`` as option values by pass name, for this recipe's passes.

        A key is a pass of the recipe with a table of its options (``{"prune-nm": {"n": 4, "m": 8}}``), or a
        global alias (:mod:`onnxsmith.optimizer.aliases`, e.g. ``{"nm": (2, 4)}``), which sets its options in
        the recipe's passes it names; a pass's own table wins over aliases. Anything else is a
        :class:`UserError`.
        """
        pass_options = dict(pass_options or {})
        nested: dict[str, dict[str, Any]] = {}
        tables = {}
        for key, value in pass_options.items():
            if key in PASSES:
                if key not in self.passes:
                    raise UserError(f"recipe {self.name!r} has no pass {key!r}; its passes: {', '.join(self.passes)}")
                if not isinstance(value, Mapping):
                    raise UserError(f"options of pass {key!r} must be a table of option values, got {value!r}")
                tables[key] = dict(value)
                continue
            alias = ALIASES_BY_NAME.get(key)
            if alias is None:
                raise UserError(f"unknown option {key!r}: give a pass name with a table of its options, or one of "
                                f"the aliases {', '.join(ALIASES_BY_NAME)}")
            targets = [name for name in alias.passes if name in self.passes]
            if not targets:
                raise UserError(f"recipe {self.name!r} has no pass that takes {alias.flag} "
                                f"(it sets {', '.join(alias.targets())})")
            try:
                values = alias.values(value)
            except ValueError as exc:
                raise UserError(f"{alias.flag}: {exc}") from None
            for name in targets:
                nested.setdefault(name, {}).update(values)
        for name, table in tables.items():
            nested.setdefault(name, {}).update(table)
        return nested

    def settings(self, pass_options: Mapping[str, Any] | None = None) -> dict[str, PassOptions]:
        """Every pass's validated options: its declared defaults, the recipe's table, then ``pass_options``
        (see :meth:`overrides`); a value a declaration refuses is a :class:`UserError` naming pass and option."""
        overrides = self.overrides(pass_options)
        settings = {}
        for name in dict.fromkeys(self.passes):
            values = {**self.options.get(name, {}), **overrides.get(name, {})}
            try:
                settings[name] = PASSES[name].Options.build(values)
            except OptionError as exc:
                raise UserError(f"recipe {self.name!r}: pass {name!r}: {exc}") from None
        return settings

    def build(self, pass_options: Mapping[str, Any] | None = None) -> list[Pass]:
        """Instantiate the passes with :meth:`settings` (a pass named twice shares its options)."""
        settings = self.settings(pass_options)
        return [PASSES[name](settings[name]) for name in self.passes]


def builtin_recipes() -> dict[str, Recipe]:
    """Every built-in recipe by name, sorted."""
    folder = resources.files("onnxsmith.recipes")
    recipes = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name.removesuffix(".toml")
            recipes[name] = parse_recipe(entry.read_text(), name, f"built-in {entry.name}")
    return recipes


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a recipe file by path (anything ending in ``.toml`` or that exists)."""
    builtin = builtin_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        return parse_recipe(path.read_text(), path.stem, str(path))
    raise UserError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin)} (or give a .toml file)")


def parse_recipe(text: str, name: str, source: str) -> Recipe:
    """Parse and validate recipe TOML; every problem is a :class:`UserError` naming the source."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {source}: invalid TOML: {exc}") from exc
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise UserError(f"recipe {source}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP_LEVEL_KEYS)}")
    passes = data.get("passes")
    if not isinstance(passes, list) or not passes or not all(isinstance(p, str) for p in passes):
        raise UserError(f"recipe {source}: 'passes' must be a non-empty list of pass names")
    for pass_name in passes:
        if pass_name not in PASSES:
            raise UserError(f"recipe {source}: unknown pass {pass_name!r}; known: {', '.join(sorted(PASSES))}")
    options = data.get("options", {})
    for pass_name, pass_options in options.items():
        if pass_name not in passes or not isinstance(pass_options, dict):
            raise UserError(f"recipe {source}: [options.{pass_name}] names no pass of this recipe")
        try:
            PASSES[pass_name].Options.build(pass_options)
        except OptionError as exc:
            raise UserError(f"recipe {source}: pass {pass_name!r}: {exc}") from None
    return Recipe(name, str(data.get("description", "")), tuple(passes), options, source)
