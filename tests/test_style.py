"""Size and style, checked: no function over 60 lines, no class over 250, no file over 500, lines of at most 120
characters and no unused imports or variables (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "src" / "posttrain").rglob("*.py"))
LIMITS = {"function": 60, "class": 250, "file": 500}


def oversized(path: Path) -> list[str]:
    text = path.read_text()
    where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    found = []
    if len(text.splitlines()) > LIMITS["file"]:
        found.append(f"{where}: {len(text.splitlines())} lines (at most {LIMITS['file']})")
    for node in ast.walk(ast.parse(text)):
        kind = "class" if isinstance(node, ast.ClassDef) else "function" if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if kind is None:
            continue
        lines = node.end_lineno - node.lineno + 1
        if lines > LIMITS[kind]:
            found.append(f"{where}:{node.lineno}: {kind} {node.name} has {lines} lines (at most {LIMITS[kind]})")
    return found


def test_no_function_class_or_file_over_its_size():
    found = [line for path in SOURCES for line in oversized(path)]
    assert not found, "\n".join(found)


def test_the_size_check_sees_a_long_function(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 61)
    assert oversized(long) == ["long.py:1: function f has 62 lines (at most 60)"]


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is a test dependency: pip install -e .[test]")
def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", "--no-cache", "src", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
