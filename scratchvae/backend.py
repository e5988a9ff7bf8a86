"""The whole CPU/GPU switch: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports :mod:`cupy`, and it does so lazily, the
first time a caller asks for the GPU. Everything else follows two rules:

* code that *consumes* arrays derives the array module from them with
  :func:`get_array_module` (``xp = get_array_module(x)``);
* code that *creates* arrays takes an explicit ``xp=`` argument.

Host conversion (:func:`to_numpy`) happens only at the edges: logging, saving
and plotting. A backend is chosen by name (:func:`get_xp`).
"""

from __future__ import annotations

import os
import sys

import numpy as np

BACKENDS = ("numpy", "cupy", "auto")
ENV_VAR = "SCRATCHVAE_BACKEND"


class BackendError(ValueError):
    """The requested backend cannot be used here (one clear sentence why)."""


def _import_cupy():
    """Import cupy and check that a GPU answers; raise :class:`BackendError` if not."""
    try:
        import cupy  # noqa: PLC0415  (the one place cupy is imported)
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        raise BackendError(
            "backend 'cupy' needs the cupy package, which could not be imported "
            f"({type(exc).__name__}: {exc}); install it with: pip install 'scratchvae[gpu]'"
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(f"backend 'cupy' needs an NVIDIA GPU, but CUDA reported: {exc}") from None
    if n < 1:
        raise BackendError("backend 'cupy' needs an NVIDIA GPU, but none was found")
    return cupy


def cupy_available() -> tuple[bool, str]:
    """Whether the cupy backend can be used here, and if not, why (for test skips)."""
    try:
        _import_cupy()
    except BackendError as exc:
        return False, str(exc)
    return True, ""


def get_xp(name: str | None = None):
    """The array module for a backend name: ``"numpy"``, ``"cupy"``, or ``"auto"`` (cupy where a GPU answers).

    ``None`` reads ``SCRATCHVAE_BACKEND`` (default ``"numpy"``). Raises
    :class:`BackendError` for an unknown name, or ``"cupy"`` where cupy or a
    GPU is missing.
    """
    if name is None:
        name = os.environ.get(ENV_VAR, "numpy") or "numpy"
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    name = name.lower()
    if name == "numpy":
        return np
    if name == "cupy":
        return _import_cupy()
    return _import_cupy() if cupy_available()[0] else np


def get_array_module(*arrays):
    """The array module the given arrays live in (``numpy`` unless one is a cupy array).

    Mirrors ``cupy.get_array_module`` without importing cupy when nobody has:
    if cupy was never imported, no argument can be a cupy array.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return np


def backend_name(xp) -> str:
    """``"numpy"`` or ``"cupy"`` for an array module."""
    return "numpy" if xp is np else "cupy"


def to_numpy(a):
    """Copy an array to the host as a NumPy array (a no-op for NumPy input)."""
    if isinstance(a, np.ndarray):
        return a
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, xp, dtype=None):
    """Put an array into the module ``xp`` (host-to-device copy for cupy), optionally casting."""
    if xp is np:
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


def device_name(xp) -> str:
    """A human-readable name of the device arrays of ``xp`` live on."""
    if xp is np:
        import platform  # noqa: PLC0415

        return platform.processor() or platform.machine() or "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
