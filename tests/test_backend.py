"""The CPU/GPU switch: choosing a backend, its errors, host/device copies, the seeded generator, lazy imports.

The package must import, and train with every engine, with numpy alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import scratchvae
from scratchvae import VAE, BackendError
from scratchvae.backend import (
    ENV_VAR,
    backend_name,
    cupy_available,
    device_name,
    get_array_module,
    get_xp,
    to_device,
    to_numpy,
)

from scratchvae.rng import Generator

CUPY_OK, CUPY_WHY = cupy_available()
REPO_ROOT = Path(scratchvae.__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# Choosing a backend.
# --------------------------------------------------------------------------------------


def test_numpy_backend_is_numpy():
    assert get_xp("numpy") is np
    assert get_xp("NumPy") is np
    assert backend_name(np) == "numpy"
    assert isinstance(device_name(np), str) and device_name(np)


def test_environment_variable_chooses_the_default_backend(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_xp() is np and get_xp(None) is np
    monkeypatch.setenv(ENV_VAR, "")
    assert get_xp() is np
    monkeypatch.setenv(ENV_VAR, "numpy")
    assert get_xp() is np
    # a name that cannot be used proves the variable is read, by get_xp and by the models ...
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        get_xp()
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        VAE(4, (3,), 2)
    # ... and an explicit name wins over it
    assert get_xp("numpy") is np
    assert VAE(4, (3,), 2, backend="numpy").xp is np


@pytest.mark.skipif(CUPY_OK, reason="cupy and a GPU are available here, so backend 'cupy' does not fail")
def test_environment_variable_cupy_without_cupy_is_a_backend_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cupy")
    with pytest.raises(BackendError, match="backend 'cupy' needs"):
        get_xp()


def test_auto_is_cupy_where_a_gpu_answers_else_numpy():
    xp = get_xp("auto")
    if CUPY_OK:
        assert xp.__name__ == "cupy"
    else:
        assert xp is np


@pytest.mark.skipif(CUPY_OK, reason="cupy and a GPU are available here, so backend 'cupy' does not fail")
def test_cupy_without_cupy_or_gpu_is_one_clear_backend_error():
    with pytest.raises(BackendError) as info:
        get_xp("cupy")
    err = info.value
    assert isinstance(err, ValueError) and not isinstance(err, ImportError)
    assert "backend 'cupy' needs" in str(err)
    assert str(err) == CUPY_WHY  # the reason the cupy tests are skipped with
    assert err.__cause__ is None and err.__suppress_context__  # no chained ImportError traceback


def _fake_cupy(device_count):
    """A stand-in ``cupy`` module whose CUDA runtime reports ``device_count`` (or raises it)."""

    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    cupy = types.ModuleType("cupy")
    cupy.ndarray = type("ndarray", (), {})
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return cupy


@pytest.mark.parametrize(
    "module, message",
    [
        (None, r"backend 'cupy' needs the cupy package, which could not be imported .*pip install"),
        (
            _fake_cupy(RuntimeError("no CUDA-capable device is detected")),
            "needs an NVIDIA GPU, but CUDA reported: no CUDA",
        ),
        (_fake_cupy(0), "needs an NVIDIA GPU, but none was found"),
    ],
    ids=["cupy missing", "CUDA error", "no GPU"],
)
def test_each_way_cupy_can_fail_gives_a_backend_error_saying_what_is_missing(monkeypatch, module, message):
    monkeypatch.setitem(sys.modules, "cupy", module)  # None makes `import cupy` raise ImportError
    with pytest.raises(BackendError, match=message):
        get_xp("cupy")
    ok, why = cupy_available()
    assert not ok and why.startswith("backend 'cupy' needs")
    assert get_xp("auto") is np  # auto falls back quietly


def test_backend_error_is_a_value_error_exported_at_top_level():
    assert issubclass(BackendError, ValueError)
    assert scratchvae.BackendError is BackendError


# --------------------------------------------------------------------------------------
# Host and device copies.
# --------------------------------------------------------------------------------------


def test_to_device_and_to_numpy_round_trip(backend, xp, dtype):
    host = np.linspace(-2.0, 3.0, 12).reshape(3, 4)
    dev = to_device(host, xp, dtype)
    assert isinstance(dev, xp.ndarray) and dev.dtype == np.dtype(dtype) and dev.shape == (3, 4)
    assert get_array_module(dev) is xp and get_array_module(host, dev) is xp
    assert backend_name(get_array_module(dev)) == backend

    back = to_numpy(dev)
    assert type(back) is np.ndarray and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, host.astype(dtype))
    # and back again, computing on the device in between
    np.testing.assert_array_equal(to_numpy(to_device(back, xp) * 2), 2 * host.astype(dtype))


def test_to_numpy_is_a_no_op_for_numpy_and_converts_lists():
    a = np.arange(3.0)
    assert to_numpy(a) is a
    np.testing.assert_array_equal(to_numpy([1.0, 2.0]), [1.0, 2.0])
    assert get_array_module(a, np.ones(2)) is np


# --------------------------------------------------------------------------------------
# The seeded generator.
# --------------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed_and_stream(backend, xp, dtype):
    def draws(seed, stream=0):
        g = Generator(seed, xp, stream=stream)
        return to_numpy(g.normal((500,), dtype)), to_numpy(g.uniform((500,), dtype))

    n1, u1 = draws(7)
    n2, u2 = draws(7)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(u1, u2)
    assert n1.dtype == u1.dtype == np.dtype(dtype)
    assert u1.min() >= 0 and u1.max() < 1
    assert not np.array_equal(draws(8)[0], n1)  # another seed
    assert not np.array_equal(draws(7, stream=1)[0], n1)  # another stream of the same seed


def test_every_use_of_a_seed_has_a_stream_of_its_own():
    streams = {name: value for name, value in vars(scratchvae.rng).items() if name.startswith("STREAM_")}
    assert len(streams) == 9, sorted(streams)
    assert len(set(streams.values())) == len(streams), streams


def test_generator_ignores_and_leaves_alone_global_random_state(backend, xp):
    untouched = Generator(3, xp)
    expected = [to_numpy(untouched.normal((100,))) for _ in range(2)]

    g = Generator(3, xp)
    first = to_numpy(g.normal((100,)))
    np.random.seed(0)
    np.random.rand(10)
    xp.random.seed(0)
    xp.random.rand(10)
    second = to_numpy(g.normal((100,)))
    np.testing.assert_array_equal(first, expected[0])
    np.testing.assert_array_equal(second, expected[1])

    # drawing from the generator does not advance numpy's global stream
    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    Generator(3, xp).normal((100,))
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_generator_state_round_trip_on_the_cpu(backend, xp):
    g = Generator(11, xp)
    g.normal((5,))
    state = g.get_state()
    if xp is not np:
        assert state is None  # documented: GPU generator state is not saved
        return
    json.dumps(state)  # JSON-serialisable
    a = g.normal((5,))
    g.set_state(state)
    np.testing.assert_array_equal(g.normal((5,)), a)


def test_generator_permutation(backend, xp):
    p = to_numpy(Generator(2, xp).permutation(50))
    np.testing.assert_array_equal(np.sort(p), np.arange(50))
    np.testing.assert_array_equal(to_numpy(Generator(2, xp).permutation(50)), p)


# --------------------------------------------------------------------------------------
# Importing needs only numpy, and never imports cupy.
# --------------------------------------------------------------------------------------

OPTIONAL = ["cupy", "cupyx", "matplotlib", "tqdm", "torch", "scipy", "hypothesis", "pytest", "PIL"]

_IMPORT_SCRIPT = r"""
import importlib, json, pkgutil, sys

BLOCKED = set(json.loads(sys.argv[1]))

class Block:
    '''A meta-path finder that makes importing any blocked package fail.'''
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None

sys.meta_path.insert(0, Block())
try:
    import pytest  # installed here, so this shows the block works
    block_works = False
except ImportError:
    block_works = True

import numpy as np
import scratchvae
from scratchvae.backend import BackendError, get_xp

submodules = sorted(m.name for m in pkgutil.walk_packages(scratchvae.__path__, "scratchvae.") if m.name != "scratchvae.__main__")
for name in submodules:
    importlib.import_module(name)

# the library works: one training step on the CPU, the textbook one and each engine's
model = scratchvae.VAE(6, (4,), 2, seed=0)
opt = scratchvae.Adam(model)
x = np.full((64, 6), 0.5, dtype=np.float32)
model.loss_and_grad(x)
opt.step()
for name in ("reference", "cpu"):
    with scratchvae.make_engine(name, model, opt, threads=2 if name == "cpu" else None) as engine:
        engine.step(x)
auto_is_numpy = get_xp("auto") is np
try:
    get_xp("cupy")
    cupy_error = None
except BackendError as exc:
    cupy_error = str(exc)

print(json.dumps({
    "block_works": block_works,
    "submodules": submodules,
    "loaded": sorted({m.partition(".")[0] for m in sys.modules}),
    "auto_is_numpy": auto_is_numpy,
    "cupy_error": cupy_error,
}))
"""


def _subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop(ENV_VAR, None)
    return env


def _run_script(script, *args):
    """Run ``python -c script args`` from the checkout; return the last line it printed."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _import_in_subprocess(blocked):
    return json.loads(_run_script(_IMPORT_SCRIPT, json.dumps(blocked)))


def test_import_works_with_every_optional_package_blocked():
    out = _import_in_subprocess(OPTIONAL)
    assert out["block_works"]
    expected = {"backend", "layers", "losses", "model", "optim", "gradcheck", "evaluate", "engines.cpu", "engines.reference"}
    assert {f"scratchvae.{name}" for name in expected} <= set(out["submodules"])
    assert not set(OPTIONAL) & set(out["loaded"])
    assert out["auto_is_numpy"]
    assert "backend 'cupy' needs the cupy package" in out["cupy_error"]


_NO_CUPY_SCRIPT = r"""
import importlib, pkgutil, sys
import numpy as np
import scratchvae

for m in pkgutil.walk_packages(scratchvae.__path__, "scratchvae."):
    if m.name != "scratchvae.__main__":
        importlib.import_module(m.name)
model = scratchvae.VAE(6, (4,), 2, backend="numpy", seed=0)
model.loss_and_grad(np.full((3, 6), 0.5))
opt = scratchvae.Adam(model)
opt.step()
with scratchvae.make_engine("auto", model, opt) as engine:
    engine.step(np.full((3, 6), 0.5))
print("cupy" in sys.modules)
"""


def test_import_and_numpy_use_never_import_cupy():
    """Only asking for backend "cupy" or "auto" imports cupy (this matters where it is installed)."""
    assert _run_script(_NO_CUPY_SCRIPT) == "False"
