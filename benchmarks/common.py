"""What the benchmark scripts share: worker processes, machine facts, tables.

Nothing here imports numpy, scratchvae or torch at module level: the parent
process of a benchmark only orchestrates, and every measurement runs in a
worker process started with the ``spawn`` method, so that each one loads its
own BLAS (or OpenMP) thread pool and no two pools share a process.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import multiprocessing
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Set on some processors of this workplace because older OpenBLAS builds misbehave
# there; they slow a current numpy, so workers run without them unless asked not to.
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def use_checkout() -> None:
    """Import ``scratchvae`` from this checkout, whatever else is installed."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


# ------------------------------------------------------------------------------------------
# Worker processes.
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(unset=(), set_=None):
    """Temporarily unset and set environment variables (a spawned child inherits them)."""
    saved = {k: os.environ.get(k) for k in (*unset, *(set_ or {}))}
    try:
        for k in unset:
            os.environ.pop(k, None)
        for k, v in (set_ or {}).items():
            os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WorkerError(RuntimeError):
    """A worker process raised; the message carries its traceback."""


class Worker:
    """A spawned process running ``target(conn, *args)``; commands go in, results come back.

    The target answers each command with ``("ok", value)`` or
    ``("error", traceback_text)`` (see :func:`serve`). The environment of the
    child is this process's, minus ``unset`` and plus ``env``.
    """

    def __init__(self, name, target, args=(), unset=(), env=None):
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        with _environment(unset, env):
            self.process = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
            self.process.start()
        child.close()

    def call(self, *command):
        try:
            self.conn.send(command)
            status, value = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join(5)
            raise WorkerError(
                f"worker {self.name} died (exit code {self.process.exitcode}) while running {command[0]!r}"
            ) from None
        if status != "ok":
            raise WorkerError(f"worker {self.name} failed on {command[0]!r}:\n{value}")
        return value

    def close(self):
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                self.conn.send(("quit",))
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def serve(conn, handlers: dict) -> None:
    """The worker side of :class:`Worker`: answer commands with ``handlers[name](*args)`` until ``quit``."""
    while True:
        try:
            command = conn.recv()
        except EOFError:
            return
        name, args = command[0], command[1:]
        if name == "quit":
            return
        try:
            value = handlers[name](*args)
        except BaseException:  # report everything, including KeyboardInterrupt, to the parent
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", value))


def blas_thread_env(threads):
    """Environment for a numpy worker whose BLAS should use ``threads`` threads (``None``: its default)."""
    if threads is None:
        return {}
    return {k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")}


def add_shared_arguments(p) -> None:
    """The flags both benchmark scripts take alike: numpy's BLAS threads, its environment, where results go."""
    p.add_argument("--blas-threads", type=int, default=None, metavar="N",
                   help="threads of numpy's BLAS in scratchvae's workers (default: the BLAS's own choice, "
                        "normally one per CPU; steps on several threads hold BLAS to one thread each)")  # fmt: skip
    p.add_argument("--keep-openblas-env", action="store_true",
                   help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the workers' environment "
                        "(by default both are removed there, since they make a current numpy slower)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results to FILE")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="folder for the results files (default: benchmarks/results)")
    p.add_argument("--tag", default=None, help="the results files' name part (default: cpu, or the GPU's name when one runs)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'machine under load')")
    p.add_argument("--no-save", action="store_true", help="write no results files (--json still written)")


def check_thread_flags(p, args, names) -> None:
    """``p.error`` for any of the thread-count flags ``names`` (attribute names) given below 1."""
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")


def worker_env_changes(keep_openblas_env: bool):
    """Which variables to unset for workers, and a note on what was found."""
    found = {k: os.environ[k] for k in OPENBLAS_VARS if k in os.environ}
    if keep_openblas_env or not found:
        return (), {"found": found, "unset_for_workers": False}
    return OPENBLAS_VARS, {"found": found, "unset_for_workers": True}


# ------------------------------------------------------------------------------------------
# Facts about the machine and the code.
# ------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, with family/model numbers when the name is vague."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "Hardware", "Processor") and key not in fields:
                fields[key] = value.strip()
    name = fields.get("model name") or fields.get("Hardware") or fields.get("Processor")
    name = name or platform.processor() or platform.machine() or "cpu"
    if "cpu family" in fields and len(name.split()) <= 3:  # e.g. a bare "AMD EPYC" under a hypervisor
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def warn_if_busy(machine: dict) -> None:
    """Say on stderr when other work keeps the CPUs busy: timings will then be noisy.

    Multithreaded libraries suffer unevenly from sharing their cores (PyTorch's
    OpenMP threads most of all), so ratios measured on a busy machine mislead too.
    """
    load = machine.get("load_average_start")
    if load and load[0] >= 0.5:
        print(
            f"warning: load average {load[0]:.2f} on {machine['cpus']} CPUs before starting: "
            "other processes are running, so these timings will be noisy and the ratios unreliable",
            file=sys.stderr,
            flush=True,
        )


def git_info() -> dict:
    """Commit of the checkout and whether the package's files differ from it (read-only git calls)."""
    def git(*args):
        r = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
        return r.stdout.rstrip() if r.returncode == 0 else None

    try:
        commit = (git("rev-parse", "HEAD") or "").strip() or None
        changed = git("status", "--porcelain", "--", "scratchvae")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "scratchvae_modified": None}
    return {"commit": commit, "scratchvae_modified": sorted(line[3:] for line in changed.splitlines()) if changed else []}


def machine_info() -> dict:
    """Facts about this machine that do not need numpy or torch (the workers add those)."""
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpus": cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def numpy_info() -> dict:
    """numpy's version and BLAS: the build's BLAS and, via threadpoolctl, the kernel and threads in use.

    Call inside a worker, after its numpy work started (threadpoolctl inspects loaded libraries).
    """
    import numpy as np

    info = {"numpy": np.__version__, "blas_build": None, "blas_runtime": None}
    with contextlib.suppress(Exception):
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas_build"] = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        info["blas_runtime"] = "threadpoolctl not installed (pip install threadpoolctl to record the kernel)"
    else:
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        info["blas_runtime"] = [
            {k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")}
            for p in pools
        ]
    return info


def blas_threads(info: dict) -> int:
    """The thread count numpy's BLAS uses, from :func:`numpy_info` (else what OpenBLAS would pick)."""
    runtime = info.get("blas_runtime")
    if isinstance(runtime, list) and runtime and runtime[0].get("num_threads"):
        return int(runtime[0]["num_threads"])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        with contextlib.suppress(KeyError, ValueError):
            return max(1, int(os.environ[var]))
    return cpu_count()


def step_summary(info: dict) -> str:
    """``step on 2 threads (BLAS on 1 each)`` or ``step on 1 thread``, from a scratchvae worker's info."""
    t = info.get("step_threads") or 1
    return f"step on {t} threads (BLAS on 1 each)" if t > 1 else "step on 1 thread"


def cpus_used(info: dict) -> int:
    """CPUs a scratchvae worker's steps use: their threads, or numpy's BLAS threads when they run on one."""
    t = info.get("step_threads") or 1
    return t if t > 1 else blas_threads(info)


def blas_summary(info: dict) -> str:
    """One line: ``numpy 2.x, OpenBLAS 0.3.x (SkylakeX kernel, 2 threads)``."""
    runtime = info.get("blas_runtime")
    if isinstance(runtime, list) and runtime:
        p = runtime[0]
        return (
            f"numpy {info['numpy']}, {p.get('internal_api')} {p.get('version')} "
            f"({p.get('architecture') or '?'} kernel, {p.get('num_threads')} threads)"
        )
    build = info.get("blas_build") or {}
    return f"numpy {info['numpy']}, {build.get('name', 'BLAS ?')} {build.get('version', '')}".strip()


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


# ------------------------------------------------------------------------------------------
# Statistics and tables.
# ------------------------------------------------------------------------------------------


def summarize(samples) -> dict:
    """Median, quartiles, min and max of a list of numbers."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs)}


def fmt(x, digits=3) -> str:
    """A number with ``digits`` significant digits, without exponent for everyday sizes."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:,.{decimals}f}"


def text_table(headers, rows) -> str:
    """A fixed-width table: text columns left-aligned, numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def numeric(s):
        return bool(re.fullmatch(r"[-+]?[\d,.]+[x%]?|-", s))

    def line(r):
        return "  ".join(c.rjust(w) if numeric(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def markdown_table(headers, rows) -> str:
    def esc(c):
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
