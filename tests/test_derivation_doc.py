"""docs/derivation.md cites real code and real tests, and quotes the code as it is.

Every `path::name` citation (and every plain repository path) in backticks must
resolve: the file exists; a name in a ``scratchvae/`` module is an attribute
reached by import (``Class.method`` included); a name in a ``tests/`` file is
a ``def`` or ``class`` found in its source by :mod:`ast` (without importing or
running it). Every "Code:" line is followed by a "Test:" line, and every test
in ``tests/test_identities.py`` is cited, so the document and the tests that
execute it stay in step.

A line ``Quotes: `path::function``` starts a walk through that function's
code, up to the next heading: every code span in it that is a Python
statement (an assignment, a call, a ``return``) must be a line of the
function, and every line of the function from its ``# forward`` comment on
must be quoted. Change a line of the step, or of its walk-through, and the
test says which.
"""

import ast
import importlib
import inspect
import io
import re
import tokenize
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
        "`scratchvae/losses.py::kl_normal_std` `scratchvae/model.py::VAE.loss_and_grad` "
        "`tests/test_identities.py::test_elbo_plus_kl_is_log_marginal` `docs/derivation.md` "
        "`scratchvae/losses.py::kl_normal_sdt` `scratchvae/model.py::VAE.no_such_method` "
        "`tests/test_identities.py::test_no_such_test` `scratchvae/no_such_module.py` "
        "`docs/derivation.md::section`"
    )
    found = citations(text)
    assert len(found) == 9
    assert [broken(p, n) is not None for p, n in found] == [False] * 4 + [True] * 5


# --------------------------------------------------------------------------------------
# Quoted code is the code.
# --------------------------------------------------------------------------------------

QUOTES = re.compile(r"^Quotes: `(scratchvae/[\w./]+\.py)::([A-Za-z_][\w.]*)`[ \t]*$", re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")


def quoted_walks(text):
    """``(path, name, region)`` for each ``Quotes:`` line: the text from it to the next heading."""
    walks = []
    for m in QUOTES.finditer(text):
        end = text.find("\n#", m.end())
        walks.append((m[1], m[2], text[m.end() : end if end >= 0 else len(text)]))
    return walks


def is_statement(span):
    """Whether a code span is one Python statement: an assignment, a call or a ``return`` (not a bare name)."""
    try:
        (stmt,) = ast.parse("def _():\n    " + span).body[0].body
    except (SyntaxError, ValueError):
        return False
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, ast.Call)
    return isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return))


def code_lines(source):
    """The lines of a function's source from its ``# forward`` comment on, comments and blank lines removed."""
    lines = source.splitlines()
    cut = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            cut[tok.start[0] - 1] = tok.start[1]
    start = next(i for i, line in enumerate(lines) if line.strip() == "# forward")
    out = []
    for i in range(start + 1, len(lines)):
        line = lines[i][: cut.get(i, len(lines[i]))].strip()
        if line:
            out.append(line)
    return out


def function_source(path, qualname):
    obj = importlib.import_module(path[: -len(".py")].replace("/", "."))
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


def quote_problems(region, source):
    """What is wrong between a walk-through ``region`` and the function ``source``: [] when they match."""
    quoted = [span for span in CODE_SPAN.findall(region) if is_statement(span)]
    lines = code_lines(source)
    problems = [f"quoted but not a line of the function: {q!r}" for q in quoted if q not in lines]
    problems += [f"a line of the function the walk-through does not quote: {line!r}" for line in lines if line not in quoted]
    return problems


WALKS = quoted_walks(DOC_TEXT)


def test_sections_10_to_12_walk_through_the_reference_steps():
    assert [(p, n) for p, n, _ in WALKS] == [
        ("scratchvae/model.py", "Autoencoder.loss_and_grad"),
        ("scratchvae/model.py", "VAE.loss_and_grad"),
        ("scratchvae/objectives.py", "iwae_loss_and_grad"),
    ]


@pytest.mark.parametrize(("path", "name", "region"), WALKS, ids=[f"{p}::{n}" for p, n, _ in WALKS])
def test_quoted_code_is_the_code_line_for_line(path, name, region):
    problems = quote_problems(region, function_source(path, name))
    assert not problems, "\n".join(problems)


def test_quote_checker_reports_a_changed_line_either_way():
    source = """def step(x):
    x = check(x)
    # forward
    y = f(x)  # F1
    loss = g(y)
    # backward
    d_y = g_backward(1.0, y)
    return loss
"""
    walk = "F1 `y = f(x)`, F2 `loss = g(y)`; back: `d_y = g_backward(1.0, y)`, then `return loss`. Names: `y`, `(B, J)`."
    assert quote_problems(walk, source) == []
    assert quote_problems(walk.replace("f(x)", "f(2 * x)"), source) == [
        "quoted but not a line of the function: 'y = f(2 * x)'",
        "a line of the function the walk-through does not quote: 'y = f(x)'",
    ]
    assert quote_problems(walk, source.replace("    return loss", "    d_x = f_backward(d_y)\n    return loss")) == [
        "a line of the function the walk-through does not quote: 'd_x = f_backward(d_y)'"
    ]
