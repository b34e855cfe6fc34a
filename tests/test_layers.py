"""The architecture, checked: packages form layers (docs/architecture.md), each importing only from the layers
below it; no module imports another inside a function (the graph is what the top of each file says), and the
graph of imports between modules has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "posttrain"

# lowest first; a module may import from its own layer and the ones before it
LAYERS = ["core", "objectives", "data", "model", "rollout", "rewards", "infer", "evaluate", "train", "apps"]
TOP_LEVEL = {"posttrain": "core", "posttrain.__main__": "apps", "posttrain.cli": "apps"}  # version; entry points


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = SRC.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported posttrain module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("posttrain"):
            submodules = [f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")]
            found += [(name, node.lineno, id(node) in nested) for name in submodules or [node.module]]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in nested) for a in node.names if a.name.startswith("posttrain")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            pytest.fail(f"{path}:{node.lineno}: relative import (write the whole posttrain.* path)")
    return found


def layer(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    package = module.split(".")[1]
    assert package in LAYERS, f"{module}: package {package} is in no layer (add it to LAYERS and docs/architecture.md)"
    return package


GRAPH = {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_package_is_a_layer():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS)
    assert {module_name(p) for p in SRC.glob("*.py")} == set(TOP_LEVEL)


def test_no_import_from_a_higher_layer():
    upward = [f"{module} (line {line}) imports {target}: {layer(module)} is below {layer(target)}"
              for module, found in GRAPH.items() for target, line, _ in found
              if LAYERS.index(layer(target)) > LAYERS.index(layer(module))]
    assert not upward, "\n".join(upward)


def test_no_posttrain_import_inside_a_function():
    hidden = [f"{module} (line {line}) imports {target} inside a function"
              for module, found in GRAPH.items() for target, line, nested in found if nested]
    assert not hidden, "\n".join(hidden)


def test_the_import_graph_has_no_cycle():
    edges = {module: sorted({target for target, _, _ in found if target != module}) for module, found in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in edges.get(module, []):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else path + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = 2
        return None

    for module in edges:
        if module not in state and (cycle := visit(module, [module])):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The checks read what they should: a lower module importing a higher one is found."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from posttrain.apps import cli\n")
    (target, line, nested), = imports(fake)
    assert (target, line, nested) == ("posttrain.apps.cli", 2, True)
    assert LAYERS.index(layer(target)) > LAYERS.index(layer("posttrain.core.errors"))


LOSS_KEYS = {"loss", "name", "advantage", "policy_loss"}  # the recipe keys that name a registered loss


def loss_name_comparisons(path: Path) -> list[str]:
    """``x.loss == "dpo"`` and the like: what a loss needs is declared on its registry entry instead."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = any(isinstance(s, ast.Attribute) and s.attr in LOSS_KEYS for s in sides)
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                          isinstance(s, (ast.Tuple, ast.List, ast.Set)) and s.elts and
                          all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts) for s in sides)
            if named and literal:
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_train_compares_no_loss_name():
    found = [hit for path in sorted((SRC / "train").rglob("*.py")) for hit in loss_name_comparisons(path)]
    assert not found, "loss names compared in train/ (declare the need on the registry entry): " + ", ".join(found)


def test_the_loss_name_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(cfg):\n    return cfg.loss == "distill" or cfg.policy_loss in ("reinforce",)\n')
    assert loss_name_comparisons(probe) == ["probe.py:2", "probe.py:2"]
