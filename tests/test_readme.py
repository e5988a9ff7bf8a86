"""The README's "Your own data" section runs as written: its Python blocks in one namespace, then its shell lines.

The section reads ``my_data.npy``; the test writes one (10 standardised
features from a 2-d code) into a fresh folder and runs everything there.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def section(title):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_section_has_the_examples_this_test_runs():
    own = section("Your own data")
    assert len(blocks(own, "python")) == 2 and len(blocks(own, "bash")) == 1
    first = blocks(own, "python")[0]
    assert len([line for line in first.splitlines() if line.strip()]) <= 10  # fit, save, reload: under ten lines


@pytest.mark.slow
def test_the_your_own_data_examples_run(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1000, 2))
    x = np.tanh(z @ rng.normal(size=(2, 10)) + rng.normal(size=10)) + 0.05 * rng.normal(size=(1000, 10))
    np.save(tmp_path / "my_data.npy", (x - x.mean(0)) / x.std(0))
    monkeypatch.chdir(tmp_path)
    own = section("Your own data")
    namespace = {}
    for code in blocks(own, "python"):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the README's own examples)
    assert namespace["codes"].shape == (1000, 2) and (tmp_path / "my_vae.npz").exists()
    assert namespace["new"].shape == (10, 10)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for line in blocks(own, "bash")[0].splitlines():
        argv = shlex.split(line.split("#")[0])
        assert argv[:3] == ["python", "-m", "scratchvae"], line
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, (line, proc.stderr)
    assert (tmp_path / "runs" / "mine" / "samples.npy").exists() and np.load(tmp_path / "samples.npy").shape == (10, 10)
