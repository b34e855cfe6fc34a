"""Recipe schema: one typed config per command, loaded from YAML plus ``key=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting silently ignored.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from posttrain.core.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    expand_in_help: ClassVar[bool] = True  # --help lists its keys (False: a list item, shown as one key)

    def changed(self, names=None) -> set[str]:
        """The settings (of ``names``, default all) that differ from their defaults: what a recipe asked for. Not
        ``model_fields_set``, which holds every field of a run's full recipe.yaml loaded back as a recipe."""
        fields = type(self).model_fields
        return {n for n in (fields if names is None else names)
                if getattr(self, n) != fields[n].get_default(call_default_factory=True)}

    def unused(self, names: tuple[str, ...], why: str) -> None:
        """Refuse settings that differ from their defaults where nothing reads them (a setting silently ignored
        looks like one that had no effect). Defaults pass, so a run's full recipe.yaml stays a valid recipe."""
        changed = [n for n in names if n in self.changed(names)]
        if changed:
            raise ValueError(f"{', '.join(changed)}: {why}")


def recipes_dir() -> Path:
    return Path(str(importlib.resources.files("posttrain") / "recipes"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped recipe (``posttrain sft quickstart``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = recipes_dir() / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if shipped.exists():
        return shipped
    available = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
    raise UserError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({available})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value, e.g. train.lr=5e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {'.'.join(keys)}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def format_validation_error(exc: ValidationError, schema: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = schema
            for part in err["loc"][:-1]:
                field = parent.model_fields.get(str(part)) if isinstance(part, str) else None
                parent = section_type(field) if field else None
                if parent is None:
                    break
            allowed = ", ".join(parent.model_fields) if parent else "see --help"
            lines.append(f"  {key}: unknown key (allowed here: {allowed})")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def section_type(field) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def describe_schema(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Lines of ``key  default  description`` for ``--help``."""
    lines = []
    for name, field in schema.model_fields.items():
        key = prefix + name
        section = section_type(field)
        if section is not None and section.expand_in_help:
            lines.append(f"{key}:")
            lines.extend(describe_schema(section, key + "."))
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"  {key:32s} {default:14s} {field.description or ''}")
    return lines


def dump_recipe(recipe: BaseModel) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
