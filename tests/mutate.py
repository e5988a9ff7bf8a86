"""A mutation pass: how many single-token changes to the reference modules do the fast tests catch?

Each *mutant* changes one token of one module: an arithmetic or comparison
operator swapped for its opposite (``+``/``-``, ``*``/``/``, ``<``/``<=``,
``==``/``!=``, ...), a number ``n`` made ``n + 1``, or ``True``/``False``
flipped. For each, a copy of the repository is changed and the fast tests
run on it (``-m "not slow"``, derandomized hypothesis, stopping at the first
failure). A mutant that no test fails on *survives*: either a gap in the
tests, or a change that does not change the numbers (an equivalent mutant:
``x * 1`` for ``x / 1``). The tests that compare source text
(``test_derivation_doc.py``, ``test_layout.py``) are left out: they would
fail on every change of a quoted line without saying anything about the
numbers.

Usage (from the repository root; a few minutes to an hour, with two workers)::

    python tests/mutate.py scratchvae/losses.py scratchvae/layers.py --workers 2 --out /tmp/mutants.json

It prints one line per mutant and, at the end, the kill rate and the survivors.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWAPS = {
    "+": "-", "-": "+", "*": "/", "/": "*", "**": "*", "//": "/",
    "<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==",
    "+=": "-=", "-=": "+=", "*=": "/=", "/=": "*=",
}  # fmt: skip
NAMES = {"True": "False", "False": "True"}
TESTS = [
    "tests/test_gradients.py", "tests/test_numerics.py", "tests/test_models.py", "tests/test_objectives.py",
    "tests/test_engines.py", "tests/test_identities.py", "tests/test_statistics.py", "tests/test_train.py",
]  # fmt: skip


def docstring_lines(source: str) -> set:
    """Line numbers covered by docstrings (a number in a docstring is text, not code)."""
    import ast

    lines = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                lines |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def mutants(path: Path):
    """``(line, column, old, new)`` for every single-token mutant of the module at ``path``."""
    source = path.read_text(encoding="utf-8")
    skip = docstring_lines(source)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        (row, col), text = tok.start, tok.string
        if row in skip:
            continue
        if tok.type == tokenize.OP and text in SWAPS:
            out.append((row, col, text, SWAPS[text]))
        elif tok.type == tokenize.NUMBER and not text.endswith(("j", "J")):
            value = int(text, 0) if text.isdigit() or text.startswith(("0x", "0o", "0b")) else float(text)
            out.append((row, col, text, repr(value + 1)))
        elif tok.type == tokenize.NAME and text in NAMES:
            out.append((row, col, text, NAMES[text]))
    return out


def apply(source: str, row: int, col: int, old: str, new: str) -> str:
    lines = source.splitlines(keepends=True)
    line = lines[row - 1]
    assert line[col : col + len(old)] == old, (row, col, old, line)
    lines[row - 1] = line[:col] + new + line[col + len(old) :]
    return "".join(lines)


def run_tests(tree: Path, timeout: float) -> tuple[str, str]:
    """``("killed", test)`` or ``("survived", "")`` (``("timeout", "")`` counts as killed)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HYPOTHESIS_PROFILE": "ci", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           "--no-header", "-rf", *TESTS]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    if proc.returncode == 0:
        return "survived", ""
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return "killed", failed[0] if failed else proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="+", help="module files to mutate, e.g. scratchvae/losses.py")
    p.add_argument("--workers", type=int, default=2, help="repository copies tested at once (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as killed")
    p.add_argument("--out", type=Path, default=None, help="write every mutant's outcome to this JSON file")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="scratchvae-mutants-"))
    trees = []
    for w in range(args.workers):
        tree = work / f"tree{w}"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "runs", "*.egg-info", "__pycache__",
                                                                   ".hypothesis", ".pytest_cache"))  # fmt: skip
        trees.append(tree)
    baseline = run_tests(trees[0], args.timeout)
    if baseline[0] != "survived":
        print(f"the unmutated tests fail ({baseline[1]}): nothing to measure", file=sys.stderr)
        return 1
    jobs = [(m, *mut) for m in args.modules for mut in mutants(ROOT / m)]
    print(f"{len(jobs)} mutants of {', '.join(args.modules)}; {args.workers} workers", flush=True)
    free = list(trees)
    results = []
    t0 = time.perf_counter()

    def one(job):
        module, row, col, old, new = job
        tree = free.pop()
        target = tree / module
        original = target.read_text(encoding="utf-8")
        try:
            target.write_text(apply(original, row, col, old, new), encoding="utf-8")
            outcome, test = run_tests(tree, args.timeout)
        finally:
            target.write_text(original, encoding="utf-8")
            free.append(tree)
        line = original.splitlines()[row - 1].strip()
        result = {"module": module, "line": row, "col": col, "old": old, "new": new, "outcome": outcome,
                  "test": test, "code": line}  # fmt: skip
        print(f"{outcome:8s} {module}:{row}:{col} {old!r} -> {new!r}  {test}", flush=True)
        return result

    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, jobs))
    shutil.rmtree(work, ignore_errors=True)
    killed = [r for r in results if r["outcome"] != "survived"]
    survivors = [r for r in results if r["outcome"] == "survived"]
    print(f"\n{len(killed)} of {len(results)} mutants killed ({100 * len(killed) / max(len(results), 1):.1f}%) "
          f"in {time.perf_counter() - t0:.0f} s; survivors:")  # fmt: skip
    for r in survivors:
        print(f"  {r['module']}:{r['line']}: {r['old']!r} -> {r['new']!r} in: {r['code']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
