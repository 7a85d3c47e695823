"""Report the code base's size limits: modules over 600 lines, classes over 25 methods, functions over 60 lines
(docstrings left out; argparse tables, the commands' ``parser()``/``build_parser()`` functions, left out), and the
modules that sit directly in ``autoseg/``. It reports and exits 0; it does not judge.

Usage (from the repository root)::

    python tools/layout_report.py [--root .]
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("autoseg", "planners", "trainers")
MAX_MODULE_LINES = 600
MAX_CLASS_METHODS = 25
MAX_FUNCTION_LINES = 60
ARGPARSE_TABLES = {"parser", "build_parser"}


def _docstring_lines(node: ast.AST) -> int:
    """Lines taken by the docstring of a module, class or function (0 without one)."""
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            return body[0].end_lineno - body[0].lineno + 1
    return 0


def _lines(node: ast.AST) -> int:
    """Lines of a definition (decorators included), less its docstring's."""
    start = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    return node.end_lineno - start + 1 - _docstring_lines(node)


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every module-level function and method (qualified name), not the functions nested inside them."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def report(root: Path) -> list[str]:
    """The report's lines."""
    modules, classes, functions = [], [], []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = str(path.relative_to(root))
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
            lines = len(text.splitlines())
            if lines > MAX_MODULE_LINES:
                modules.append(f"  {name}: {lines} lines")
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    methods = sum(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) for item in node.body)
                    if methods > MAX_CLASS_METHODS:
                        classes.append(f"  {name}::{node.name}: {methods} methods")
            for qualified, function in _functions(tree):
                if function.name in ARGPARSE_TABLES:
                    continue
                length = _lines(function)
                if length > MAX_FUNCTION_LINES:
                    functions.append(f"  {name}::{qualified}: {length} lines")
    top = sorted(path.name for path in (root / "autoseg").glob("*.py") if path.name != "__init__.py")
    return [
        f"modules over {MAX_MODULE_LINES} lines: {len(modules)}",
        *modules,
        f"classes over {MAX_CLASS_METHODS} methods: {len(classes)}",
        *classes,
        f"functions over {MAX_FUNCTION_LINES} lines (docstrings and argparse tables excluded): {len(functions)}",
        *functions,
        f"modules directly in autoseg/ (besides __init__.py): {len(top)}",
        *(f"  {module}" for module in top),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    args = parser.parse_args(argv)
    print("\n".join(report(args.root)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
