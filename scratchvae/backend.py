"""The whole CPU/GPU switch: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports :mod:`cupy`, and it does so lazily, the
first time a caller asks for the GPU. Everything else follows two rules:

* code that *consumes* arrays derives the array module from them with
  :func:`get_array_module` (``xp = get_array_module(x)``);
* code that *creates* arrays takes an explicit ``xp=`` argument.

Host conversion (:func:`to_numpy`) happens only at the edges: logging, saving
and plotting.

The backend is chosen by name: ``"numpy"``, ``"cupy"`` or ``"auto"`` (CuPy when
it is installed and a GPU answers, else NumPy). When no name is given, the
environment variable ``SCRATCHVAE_BACKEND`` decides, and without it NumPy is
used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

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
        raise BackendError(
            f"backend 'cupy' needs an NVIDIA GPU, but CUDA reported: {exc}"
        ) from None
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
    """Return the array module (``numpy`` or ``cupy``) for a backend name.

    Parameters
    ----------
    name : {"numpy", "cupy", "auto"} or None
        ``None`` reads ``SCRATCHVAE_BACKEND`` (default ``"numpy"``).

    Raises
    ------
    BackendError
        For an unknown name, or ``"cupy"`` where cupy or a GPU is missing.
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
    ok, _ = cupy_available()
    return _import_cupy() if ok else np


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
        import platform

        return platform.processor() or platform.machine() or "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


# --------------------------------------------------------------------------------------
# The thread count of NumPy's BLAS, changed at run time.
# --------------------------------------------------------------------------------------

# (set, get) function names of BLAS libraries NumPy is built against, most likely first:
# the OpenBLAS of NumPy's own wheels (64-bit integer interface, prefixed), plain
# OpenBLAS, and MKL. Each set takes an int; each get returns one.
_BLAS_THREAD_FUNCTIONS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
)
_blas_functions = None  # [(set, get), ...] once looked up


def _loaded_libraries():
    """Paths of the shared libraries loaded into this process (Linux: from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:  # no /proc (macOS, Windows): not supported, callers fall back
        return []
    paths = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode path (which may hold spaces)
        if len(fields) == 6 and ".so" in fields[5]:
            paths.append(fields[5].removesuffix(" (deleted)"))
    return list(dict.fromkeys(paths))


def _blas_thread_functions():
    """``[(set, get), ...]``: the thread-count functions of every BLAS loaded, NumPy's own first.

    Other packages may bring their own copy of OpenBLAS (SciPy's wheels do);
    limiting threads limits them all, and :func:`blas_threads` reads NumPy's.
    """
    global _blas_functions
    if _blas_functions is None:
        import ctypes  # noqa: PLC0415

        numpy_dir = os.path.dirname(np.__file__)
        numpy_dirs = (numpy_dir + os.sep, os.path.join(os.path.dirname(numpy_dir), "numpy.libs") + os.sep)
        names = [(p, os.path.basename(p).lower()) for p in _loaded_libraries()]
        candidates = [p for p, name in names if name.startswith("lib") and ("blas" in name or "mkl" in name)]
        candidates.sort(key=lambda p: not p.startswith(numpy_dirs))  # NumPy's own library first
        found, seen = [], set()
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing new runs
            except OSError:
                continue
            for set_name, get_name in _BLAS_THREAD_FUNCTIONS:
                setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
                if setter is not None and getter is not None:
                    address = ctypes.cast(setter, ctypes.c_void_p).value
                    if address not in seen:  # one library reached through two paths counts once
                        seen.add(address)
                        setter.argtypes, setter.restype = [ctypes.c_int], None
                        getter.argtypes, getter.restype = [], ctypes.c_int
                        found.append((setter, getter))
                    break
        _blas_functions = found
    return _blas_functions


def blas_threads() -> int | None:
    """How many threads NumPy's BLAS uses now, or ``None`` where that cannot be read.

    Readable (and settable) for the OpenBLAS of NumPy's wheels, other
    OpenBLAS builds and MKL, on Linux; ``None`` elsewhere.
    """
    functions = _blas_thread_functions()
    return int(functions[0][1]()) if functions else None


def set_blas_threads_here(n: int) -> None:
    """Set every BLAS's thread count to ``n`` from the calling thread, without restoring it.

    For threads that exist only while a :func:`limit_blas_threads` block is
    open: an OpenMP build of OpenBLAS keeps the count per calling thread.
    """
    for setter, _ in _blas_thread_functions():
        setter(int(n))


_limit_lock = threading.Lock()
_limit_depth, _limit_saved = 0, []


@contextlib.contextmanager
def limit_blas_threads(n: int):
    """Run the ``with`` block with NumPy's BLAS on at most ``n`` threads, then restore the count.

    The count is process-wide: every thread's matrix products see it. Blocks
    may overlap (two open steps): the counts in force before the first are
    restored when the last one ends. Yields whether the limit could be
    applied (``False`` where :func:`blas_threads` is ``None``; nothing
    changes then).
    """
    global _limit_depth, _limit_saved
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    functions = _blas_thread_functions()
    if not functions:
        yield False
        return
    with _limit_lock:
        if _limit_depth == 0:
            _limit_saved = [int(get()) for _, get in functions]
        _limit_depth += 1
        for setter, getter in functions:
            if int(getter()) > n:
                setter(n)
    try:
        yield True
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0:
                for (setter, getter), before in zip(functions, _limit_saved):
                    if int(getter()) != before:
                        setter(before)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# The generator streams of one seed. Every random thing in a run draws from a stream of
# its own: on NumPy two generators with the same seed and stream give the same bits, so
# two uses sharing a stream would draw numbers that depend on each other.
STREAM_INIT = 0  # initial parameters (the model)
STREAM_NOISE = 1  # reparameterization noise of the training steps (the model)
STREAM_DATA = 2  # data order and dynamic binarization while training
STREAM_EVAL_DATA = 3  # dynamic binarization of evaluated images: every evaluation sees the same ones
STREAM_EVAL_IWAE = 4  # noise of the importance-weighted bound (evaluate_nll)
STREAM_PICTURES = 5  # the samples in a run's pictures
STREAM_EVAL_ELBO = 6  # noise of the one-sample ELBO on held-out images (evaluate_elbo)
STREAM_SAMPLE = 7  # ``scratchvae sample``


class Generator:
    """A seeded random generator living next to a model's arrays.

    Wraps :class:`numpy.random.Generator` (PCG64) on the CPU and
    ``cupy.random.RandomState`` on the GPU so that every caller can draw
    ``normal``/``uniform`` arrays directly in the model's dtype and device,
    without touching global random state.

    Parameters
    ----------
    seed : int
    xp : module
        ``numpy`` or ``cupy``.
    stream : int
        Independent streams from one seed: each use has its own, listed in
        the ``STREAM_*`` constants of this module.
    """

    def __init__(self, seed: int, xp=np, stream: int = 0):
        self.xp = xp
        self.seed, self.stream = int(seed), int(stream)
        if xp is np:
            self._g = np.random.Generator(np.random.PCG64([self.stream, self.seed]))
        else:
            self._g = xp.random.RandomState(self.seed * 7919 + self.stream)

    def normal(self, shape, dtype=np.float64):
        """Standard normal draws ``eps ~ N(0, I)`` of the given shape and dtype."""
        return self._g.standard_normal(shape, dtype=dtype)

    def uniform(self, shape, dtype=np.float64):
        """Uniform draws on ``[0, 1)``."""
        if self.xp is np:
            return self._g.random(shape, dtype=dtype)
        return self._g.random_sample(shape, dtype=dtype)

    def permutation(self, n: int):
        """A random permutation of ``range(n)`` (int64)."""
        return self._g.permutation(int(n))

    # State, for checkpoints: JSON-serialisable on the CPU.
    def get_state(self):
        """The generator state as a JSON-serialisable object (CPU only)."""
        if self.xp is np:
            return self._g.bit_generator.state
        return None

    def set_state(self, state) -> None:
        """Restore a state from :meth:`get_state` (ignored on the GPU, where it is ``None``)."""
        if self.xp is np and state is not None:
            self._g.bit_generator.state = state
