"""``optimize explain RECIPE``: a recipe's passes with every declared option, its value and where it comes from."""

from __future__ import annotations

import argparse

from onnxsmith.optimizer.aliases import ALIASES
from onnxsmith.optimizer.subcommands import subcommand_parser
from onnxsmith.optimizer.recipes import Recipe, load_recipe
from onnxsmith.optimizer.registry import PASSES

COMMAND = "explain"


def recipe_lines(recipe: Recipe, with_help: bool = True) -> list[str]:
    """The recipe's passes in order, each with its options: value (``*`` where the recipe sets it, else the
    declared default), allowed values, the flags that set it and, with ``with_help``, the help line."""
    flags: dict[str, list[str]] = {}
    for alias in ALIASES:
        for target in alias.targets():
            flags.setdefault(target, []).append(alias.flag)
    lines = [f"{recipe.name}: {recipe.description}", f"  source: {recipe.source}"]
    for index, name in enumerate(recipe.passes, 1):
        cls = PASSES[name]
        lines.append(f"  {index:2}. {name} ({'lossless' if cls.lossless else 'lossy'}): {cls.description}")
        table = recipe.options.get(name, {})
        for spec in cls.Options.specs():
            value = table.get(spec.name, spec.default)
            mark = "*" if spec.name in table else " "
            set_by = ", ".join([f"--set {name}.{spec.name}=...", *flags.get(f"{name}.{spec.name}", [])])
            lines.append(f"        {mark}{spec.name} = {_shown(value)}  [{spec.describe()}]  {set_by}")
            if with_help and spec.help:
                lines.append(f"            {spec.help}")
    return lines


def build_explain_parser() -> argparse.ArgumentParser:
    """The ``optimize explain`` argument parser."""
    parser = subcommand_parser(
        COMMAND,
        "Print a recipe's passes and every option each declares: its value (* set by the recipe, else the\n"
        "default), the allowed values and the flags that change it.",
        [("w8a8", "a built-in recipe"), ("my-recipe.toml", "a recipe file")])
    parser.add_argument("recipe", help="built-in recipe name or a .toml recipe file")
    return parser


def run_explain(args: argparse.Namespace) -> int:
    """Print :func:`recipe_lines` for ``args.recipe``."""
    print("\n".join(recipe_lines(load_recipe(args.recipe))))
    return 0


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)
