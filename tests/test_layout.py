"""The package's layout keeps its promises: a small backend switch, no private names used across modules,
no code in the package that only the tests use.

All checks read the source with :mod:`ast` (the package is imported only for its ``__all__``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import scratchvae

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scratchvae"
MODULES = sorted(PACKAGE.rglob("*.py"))
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str):
    """``(line, what)`` for each use of another module's or object's private name in ``source``.

    Allowed: a private attribute of ``self`` or ``cls`` (``self._g``), and a
    module's own private functions (plain names). Refused: ``obj._name`` for
    anything else, and ``from module import _name`` or ``from ._module import``.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, f"{ast.unparse(node)}"))
        elif isinstance(node, ast.ImportFrom):
            if node.module and any(is_private(part) for part in node.module.split(".")):
                found.append((node.lineno, f"from {'.' * node.level}{node.module} import ..."))
            found += [(node.lineno, f"import {a.name}") for a in node.names if is_private(a.name)]
    return found


@pytest.mark.parametrize("path", MODULES + SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    uses = private_uses(path.read_text(encoding="utf-8"))
    assert not uses, "\n".join(f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in uses)


def test_the_private_name_check_finds_each_kind_of_use():
    source = """
from .model import _Model
from ._files import atomic_write
import numpy as np
x = model._work
y = self._g.state
z = cls._cache
w = np.random._bounded_integers
v = obj.__class__
"""
    assert [what for _, what in sorted(private_uses(source))] == [
        "import _Model",
        "from ._files import ...",
        "model._work",
        "np.random._bounded_integers",
    ]


def test_the_backend_module_is_only_the_switch():
    lines = (PACKAGE / "backend.py").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 120, f"backend.py has {len(lines)} lines"
    source = "\n".join(lines)
    for concept in ("ctypes", "threading", "Generator", "STREAM_"):  # BLAS threads and random streams live elsewhere
        assert concept not in source, concept


def defined_names(path):
    """Module-level functions and classes defined in ``path``, with their line numbers."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.name, n.lineno) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_no_code_in_the_package_is_there_for_the_tests_only():
    """Every module-level function or class is used by the package or the benchmarks, exported, or documented.

    Exported: named in the package's ``__all__`` or a module's ``__all__``;
    documented: named in README.md or docs/. A helper only the tests call
    belongs in ``tests/``.
    """
    package_text = {p: p.read_text(encoding="utf-8") for p in MODULES}
    elsewhere = "\n".join(p.read_text(encoding="utf-8") for p in SCRIPTS)
    documents = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    exported = set(scratchvae.__all__)  # the package's, built from its table of lazily loaded names
    for text in package_text.values():
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                if isinstance(node.value, ast.List):
                    exported |= {ast.literal_eval(e) for e in node.value.elts}
    unused = []
    for path in package_text:
        for name, line in defined_names(path):
            if is_private(name) or name in exported or (name.startswith("__") and name.endswith("__")):
                continue  # dunder functions (a module's __getattr__) are called by Python itself
            word = re.compile(rf"\b{re.escape(name)}\b")
            uses_in_package = sum(len(word.findall(t)) for t in package_text.values()) - 1  # minus the definition
            if uses_in_package > 0 or word.search(elsewhere) or word.search(documents):
                continue
            unused.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not unused, "used by nothing but the tests (move to tests/ or delete):\n" + "\n".join(unused)
