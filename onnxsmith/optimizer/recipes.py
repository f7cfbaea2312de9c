"""Recipes: TOML files naming an ordered pass list with per-pass options.

A recipe file has ``description`` (one line), ``passes`` (pass names, in order) and optionally
``[options.PASS-NAME]`` tables whose keys are that pass's constructor arguments. Unknown keys are errors.
Built-in recipes are the ``*.toml`` files of the ``onnxsmith.recipes`` package; users copy and edit one.
"""

from __future__ import annotations

import inspect
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from onnxsmith.errors import UserError
from onnxsmith.optimizer.pass_base import Pass

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

    def build(self, overrides: Mapping[str, Any] | None = None) -> list[Pass]:
        """Instantiate the passes (a pass named twice shares its options).

        ``overrides`` (e.g. ``{"calibrator": "entropy"}`` from the command line) go to every pass whose
        constructor takes that argument; a key no pass of the recipe takes is a :class:`UserError`.
        """
        from onnxsmith.passes import PASSES

        overrides = dict(overrides or {})
        unused = set(overrides)
        built = []
        for pass_name in self.passes:
            accepted = set(inspect.signature(PASSES[pass_name]).parameters)
            applicable = {k: v for k, v in overrides.items() if k in accepted}
            unused -= set(applicable)
            kwargs = {**self.options.get(pass_name, {}), **applicable}
            try:
                built.append(PASSES[pass_name](**kwargs))
            except (TypeError, ValueError) as exc:
                raise UserError(f"recipe {self.name!r}: bad options for pass {pass_name!r}: {exc}") from exc
        if unused:
            raise UserError(f"recipe {self.name!r} has no pass that takes {sorted(unused)}")
        return built


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
    from onnxsmith.passes import PASSES

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
        accepted = set(inspect.signature(PASSES[pass_name]).parameters)
        unknown_options = set(pass_options) - accepted
        if unknown_options:
            raise UserError(
                f"recipe {source}: unknown options {sorted(unknown_options)} for pass {pass_name!r}; "
                f"allowed: {sorted(accepted) or 'none'}"
            )
    return Recipe(name, str(data.get("description", "")), tuple(passes), options, source)
