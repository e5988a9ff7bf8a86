"""The thread count of NumPy's BLAS, read and changed at run time, and the CPUs this process may use.

The ``cpu`` engine splits a step over its own threads and holds BLAS to one
thread in each: a multi-threaded BLAS in every thread would oversubscribe the
cores (``benchmarks/NOTES.md``, items 6 and 8). NumPy has no call for this,
so the BLAS library NumPy loaded is found among the process's shared
libraries and its own functions are called through :mod:`ctypes`: OpenBLAS
(NumPy's wheels bundle it, with a prefix and a 64-bit interface) or MKL, on
Linux. Elsewhere :func:`blas_threads` answers ``None`` and nothing is
changed.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

# (set, get) function names of BLAS libraries NumPy is built against, most likely first:
# the OpenBLAS of NumPy's own wheels (64-bit integer interface, prefixed), plain
# OpenBLAS, and MKL. Each set takes an int; each get returns one.
BLAS_THREAD_FUNCTIONS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
)
_found = None  # [(set, get), ...] once looked up


def loaded_libraries():
    """Paths of the shared libraries loaded into this process (Linux: from /proc/self/maps; else ``[]``)."""
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


def thread_functions():
    """``[(set, get), ...]``: the thread-count functions of every BLAS loaded, NumPy's own first.

    Other packages may bring their own copy of OpenBLAS (SciPy's wheels do);
    limiting threads limits them all, and :func:`blas_threads` reads NumPy's.
    """
    global _found
    if _found is None:
        import ctypes  # noqa: PLC0415

        numpy_dir = os.path.dirname(np.__file__)
        numpy_dirs = (numpy_dir + os.sep, os.path.join(os.path.dirname(numpy_dir), "numpy.libs") + os.sep)
        names = [(p, os.path.basename(p).lower()) for p in loaded_libraries()]
        candidates = [p for p, name in names if name.startswith("lib") and ("blas" in name or "mkl" in name)]
        candidates.sort(key=lambda p: not p.startswith(numpy_dirs))  # NumPy's own library first
        found, seen = [], set()
        for path in candidates:
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing new runs
            except OSError:
                continue
            for set_name, get_name in BLAS_THREAD_FUNCTIONS:
                setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
                if setter is not None and getter is not None:
                    address = ctypes.cast(setter, ctypes.c_void_p).value
                    if address not in seen:  # one library reached through two paths counts once
                        seen.add(address)
                        setter.argtypes, setter.restype = [ctypes.c_int], None
                        getter.argtypes, getter.restype = [], ctypes.c_int
                        found.append((setter, getter))
                    break
        _found = found
    return _found


def blas_threads() -> int | None:
    """How many threads NumPy's BLAS uses now, or ``None`` where that cannot be read."""
    functions = thread_functions()
    return int(functions[0][1]()) if functions else None


def set_blas_threads_here(n: int) -> None:
    """Set every BLAS's thread count to ``n`` from the calling thread, without restoring it.

    For threads that exist only while a :func:`limit_blas_threads` block is
    open: an OpenMP build of OpenBLAS keeps the count per calling thread.
    """
    for setter, _ in thread_functions():
        setter(int(n))


_limit_lock = threading.Lock()
_limit_depth, _limit_saved = 0, []


@contextlib.contextmanager
def limit_blas_threads(n: int):
    """Run the ``with`` block with NumPy's BLAS on at most ``n`` threads, then restore the count.

    The count is process-wide: every thread's matrix products see it. Blocks
    may overlap (two open engines): the counts in force before the first are
    restored when the last one ends. Yields whether the limit could be
    applied (``False`` where :func:`blas_threads` is ``None``; nothing
    changes then).
    """
    global _limit_depth, _limit_saved
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    functions = thread_functions()
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
