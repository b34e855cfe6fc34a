"""Load a recipe for a command: a YAML file or a shipped recipe's name, ``key=value`` overrides, validation against
the command's schema."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from posttrain.core.config import apply_override, format_validation_error, parse_override, resolve_recipe_path
from posttrain.core.errors import UserError
from posttrain.train.commands import COMMANDS
from posttrain.train.recipes import Recipe


def load_recipe(command: str, path: str | None, overrides: list[str] = ()) -> Recipe:
    tree: dict = {}
    if path is not None:
        recipe_path = resolve_recipe_path(path)
        try:
            tree = yaml.safe_load(recipe_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{recipe_path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise UserError(f"{recipe_path}: a recipe must be a mapping of keys to values")
        importable_beside(recipe_path)
    for override in overrides:
        apply_override(tree, *parse_override(override))
    return validate_recipe(command, tree, source=path or "overrides")


def importable_beside(recipe_path: Path) -> None:
    """``module:function`` rewards and eval tasks may live next to the recipe: its directory joins the import path
    last, so installed packages (and the standard library) are never shadowed by a file there. Nothing is ever
    imported from a name inside a data record."""
    directory = str(recipe_path.resolve().parent)
    if directory not in sys.path:
        sys.path.append(directory)


def validate_recipe(command: str, tree: dict, source: str = "recipe") -> Recipe:
    schema = COMMANDS[command].schema
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{source}: invalid recipe\n" + format_validation_error(exc, schema)) from None
