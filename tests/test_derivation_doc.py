"""docs/derivation.md cites real code and real tests.

Every `path::name` citation (and every plain repository path) in backticks must
resolve: the file exists; a name in a ``scratchvae/`` module is an attribute
reached by import (``Class.method`` included); a name in a ``tests/`` file is
a ``def`` or ``class`` found in its source by :mod:`ast` (without importing or
running it). Every "Code:" line is followed by a "Test:" line, and every test
in ``tests/test_identities.py`` is cited, so the document and the tests that
execute it stay in step.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "derivation.md"

CITATION = re.compile(r"`((?:scratchvae|tests|docs)/[\w./-]+\.(?:py|md))(?:::([A-Za-z_][\w.]*))?`")


def citations(text):
    """``(path, name or None)`` for every backticked repository path in ``text``, in order, without repeats."""
    return list(dict.fromkeys(CITATION.findall(text)))


def _defined_in_source(path, qualname):
    """Whether ``qualname`` (``f`` or ``Class.method``) is a def or class in the source file ``path``."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    for part in qualname.split("."):
        match = [
            node
            for node in body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part
        ]
        if not match:
            return False
        body = match[0].body
    return True


def _importable(path, qualname):
    """Whether ``qualname`` is reached by getattr from the module at ``path`` (e.g. ``scratchvae/model.py``)."""
    module = importlib.import_module(path[: -len(".py")].replace("/", "."))
    obj = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def broken(path, name, root=ROOT):
    """Why the citation ``path::name`` does not resolve, or ``None`` if it does."""
    file = root / path
    if not file.is_file():
        return f"{path}: no such file"
    if not name:
        return None
    if path.startswith("scratchvae/") and path.endswith(".py"):
        return None if _importable(path, name) else f"{path}::{name}: no such attribute"
    if path.endswith(".py"):
        return None if _defined_in_source(file, name) else f"{path}::{name}: no such def or class"
    return f"{path}::{name}: a name can only be cited in a .py file"


DOC_TEXT = DOC.read_text(encoding="utf-8")
DOC_CITATIONS = citations(DOC_TEXT)


@pytest.mark.parametrize(("path", "name"), DOC_CITATIONS, ids=[f"{p}::{n}" if n else p for p, n in DOC_CITATIONS])
def test_citation_resolves(path, name):
    assert broken(path, name) is None, broken(path, name)


def test_every_code_line_is_followed_by_a_test_line_and_both_cite():
    lines = [line.strip() for line in DOC_TEXT.splitlines() if line.strip()]
    code_lines = [i for i, line in enumerate(lines) if line.startswith("Code:")]
    assert len(code_lines) >= 20, "the derivation lost its Code:/Test: citations"
    for i in code_lines:
        assert citations(lines[i]), f"'{lines[i]}' cites no code"
        test_line = lines[i + 1] if i + 1 < len(lines) else ""
        assert test_line.startswith("Test:"), f"'{lines[i]}' is not followed by a Test: line"
        assert any(p.startswith("tests/") and n for p, n in citations(test_line)), f"'{test_line}' cites no test"


def test_every_identity_test_is_cited():
    source = ast.parse((ROOT / "tests" / "test_identities.py").read_text(encoding="utf-8"))
    tests = [node.name for node in source.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    cited = {n for p, n in DOC_CITATIONS if p == "tests/test_identities.py"}
    assert tests and not set(tests) - cited, f"not cited in {DOC.name}: {sorted(set(tests) - cited)}"


def test_checker_reports_broken_citations():
    """The checker itself: real citations pass, and each kind of broken one is reported."""
    text = (
        "`scratchvae/losses.py::kl_normal_std` `scratchvae/model.py::VAE._loss_and_grad` "
        "`tests/test_identities.py::test_elbo_plus_kl_is_log_marginal` `docs/derivation.md` "
        "`scratchvae/losses.py::kl_normal_sdt` `scratchvae/model.py::VAE.no_such_method` "
        "`tests/test_identities.py::test_no_such_test` `scratchvae/no_such_module.py` "
        "`docs/derivation.md::section`"
    )
    found = citations(text)
    assert len(found) == 9
    assert [broken(p, n) is not None for p, n in found] == [False] * 4 + [True] * 5
