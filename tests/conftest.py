"""Shared fixtures: every backend-parametrised test body runs once per available backend.

Hypothesis profiles: ``ci`` (derandomized, so a submission is never failed by a
fresh random draw) is chosen when ``CI`` is set or ``HYPOTHESIS_PROFILE=ci``;
``dev`` (the default) explores new examples on every run. A failure found
locally becomes an ``@example`` on the test.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from scratchvae.backend import cupy_available

# function_scoped_fixture: the backend/xp/dtype fixtures are immutable values (a name, a
# module), so sharing one across a test's hypothesis examples is exactly what is wanted.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, suppress_health_check=_SUPPRESS)
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

_CUPY_OK, _CUPY_WHY = cupy_available()

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param(
        "cupy",
        id="cupy",
        marks=pytest.mark.skipif(not _CUPY_OK, reason=f"cupy backend unavailable: {_CUPY_WHY}"),
    ),
]

_CUPY_NOT_RUN = []  # the cupy cases left out of this run (see pytest_collection_modifyitems)


def pytest_collection_modifyitems(config, items):
    """Without a usable cupy, the cupy case of every backend-parametrised test is left out, and the summary says
    so in one line (instead of one "skipped" line per test)."""
    if _CUPY_OK:
        return
    kept = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (_CUPY_NOT_RUN if params.get("backend") == "cupy" else kept).append(item)
    if _CUPY_NOT_RUN:
        config.hook.pytest_deselected(items=list(_CUPY_NOT_RUN))
        items[:] = kept


# Per-dtype tolerances for comparing a computation in that dtype with its float64 reference.
DTYPE_RTOL = {"float32": 2e-4, "float64": 1e-10}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Backend name: "numpy", and "cupy" where a GPU is present (skipped with the reason otherwise)."""
    return request.param


@pytest.fixture
def xp(backend):
    """The array module of ``backend``."""
    from scratchvae.backend import get_xp

    return get_xp(backend)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def dtype_rtol(dtype):
    """:data:`DTYPE_RTOL` of the current ``dtype``."""
    return DTYPE_RTOL[dtype]


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# --------------------------------------------------------------------------------------
# Worst gradient-check error of the run, printed in the terminal summary.
# --------------------------------------------------------------------------------------

_GRADCHECK_WORST = {}  # label -> (max relative error, GradcheckResult as text)


@pytest.fixture(scope="session")
def record_gradcheck():
    """``record(label, result)`` keeps the worst :class:`GradcheckResult` seen per label.

    Session-scoped, so hypothesis tests may use it (it holds no per-example state).
    """

    def record(label, result):
        best = _GRADCHECK_WORST.get(label)
        if best is None or result.max_rel_error > best[0]:
            _GRADCHECK_WORST[label] = (result.max_rel_error, str(result))

    return record


def pytest_terminal_summary(terminalreporter):
    if _CUPY_NOT_RUN:
        terminalreporter.write_line(f"{len(_CUPY_NOT_RUN)} cupy test cases not run (deselected): cupy backend "
                                    f"unavailable: {_CUPY_WHY}")  # fmt: skip
    if not _GRADCHECK_WORST:
        return
    terminalreporter.section("worst gradient-check relative error per check")
    for label, (err, text) in sorted(_GRADCHECK_WORST.items(), key=lambda kv: -kv[1][0]):
        terminalreporter.write_line(f"{err:.2e}  {label}")
    label, (err, text) = max(_GRADCHECK_WORST.items(), key=lambda kv: kv[1][0])
    terminalreporter.write_line(f"overall worst: {label}: {text}")
