"""Wall time and peak memory of full MNIST training epochs: scratchvae's trainer against a PyTorch loop.

scratchvae runs exactly what ``scratchvae train`` runs:
``scratchvae.train.train(TrainConfig(epochs=E, out=<temporary folder>))``
with the default settings (784-400-20 VAE, ReLU, Bernoulli likelihood on grey
levels, batch 128, Adam lr 1e-3, float32, seed 0), including what the trainer
does besides training: loading MNIST, the test-set ELBO after each epoch, a
checkpoint and the pictures after each epoch, and the pictures once more at
the end. Those phases are timed separately by wrapping the trainer's own
functions inside the worker.

PyTorch runs the same model, loss and initialisation scheme
(``torch_vae.TorchVAE`` with the trainer's ``init``) in the loop a
PyTorch user would write with the same settings: MNIST loaded by the same
loader, a fresh data order per epoch, each ``uint8`` batch converted to
floats on its own, ``loss.item()`` every step, and the same test evaluation
after each epoch (batches of 1000, one noise sample per example). It writes
no checkpoints and no pictures.

Each run happens in a fresh spawned worker process; its peak resident memory
is that process's high-water mark (``VmHWM`` in ``/proc/self/status``, where
there is one, else ``ru_maxrss``), reported next to the value right after the
imports. With ``--repeats`` the runs alternate between the
two implementations and the table shows medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Worker,
    WorkerError,
    add_shared_arguments,
    blas_summary,
    blas_thread_env,
    blas_threads,
    check_thread_flags,
    cpu_model,
    cpus_used,
    fmt,
    git_info,
    load_average,
    machine_info,
    markdown_table,
    serve,
    slug,
    step_summary,
    text_table,
    torch_available,
    use_checkout,
    warn_if_busy,
    worker_env_changes,
)

PHASES = ("data", "train", "eval", "checkpoint", "pictures")


def _max_rss_mib() -> float:
    """This process's peak resident memory in MiB: Linux's ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` survives ``exec``: a spawned worker starts with the peak of
    the process it was forked from (the parent's, after a PyTorch result has
    made the parent import torch: about 220 MiB), so where ``/proc`` has the
    process's own high-water mark, that is the number.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def _scratch_worker(conn, backend, epochs, threads=None, engine="auto"):
    """Run scratchvae's trainer for ``epochs`` in a temporary folder (one command: ``run``); ``threads``: its steps'."""
    use_checkout()
    import tempfile

    import numpy as np

    import scratchvae
    import scratchvae.train as T
    from common import numpy_info
    from scratchvae.backend import device_name, get_xp

    xp = get_xp(backend)
    rss_imports = _max_rss_mib()
    seconds = dict.fromkeys(PHASES, 0.0)

    untimed = []

    def timed(owner, name, phase):
        original = getattr(owner, name, None)
        if original is None:  # the trainer changed: that phase stays in "other"
            untimed.append(f"{owner.__name__}.{name}")
            return

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(T, "load_data", "data")
    timed(T, "evaluate_elbo", "eval")
    timed(T, "write_pictures", "pictures")
    timed(T.Run, "save", "checkpoint")

    tiny = scratchvae.VAE(2, (2,), 1, backend=backend)
    step_threads = scratchvae.make_engine("auto", tiny, scratchvae.Adam(tiny), threads=threads).threads

    def run():
        logs = []
        with tempfile.TemporaryDirectory(prefix="scratchvae-bench-") as tmp:
            cfg = T.TrainConfig(epochs=epochs, out=tmp, backend=backend, threads=threads, engine=engine)
            t0 = time.perf_counter()
            history = T.train(cfg, log=logs.append)
            if xp is not np:
                xp.cuda.Device().synchronize()
            wall = time.perf_counter() - t0
        seconds["train"] = sum(row["seconds"] for row in history)
        out = {
            "impl": f"scratchvae-{backend}" + (f"-{engine}" if engine != "auto" else ""), "wall_s": wall, "seconds": dict(seconds), "history": history,
            "log": logs, "config": cfg.to_json(), "scratchvae": scratchvae.__version__, "untimed": untimed,
            "rss_after_imports_mib": rss_imports, "peak_rss_mib": _max_rss_mib(), **numpy_info(),
            "step_threads": step_threads,
        }  # fmt: skip
        if xp is np:
            out["device"] = cpu_model()
        else:
            out["device"] = device_name(xp)
            out["device_memory_pool_mib"] = xp.get_default_memory_pool().total_bytes() / 2**20
        return out

    serve(conn, {"run": run})


def _torch_worker(conn, device, threads, epochs):
    """Train the PyTorch reference VAE for ``epochs`` with the trainer's default settings."""
    use_checkout()
    import numpy as np
    import torch

    from scratchvae.backend import Generator
    from scratchvae.data import load_mnist
    from scratchvae.train import STREAM_DATA, TrainConfig
    from torch_vae import TorchVAE, set_threads, torch_info

    if device == "cuda" and not torch.cuda.is_available():
        serve(conn, {"run": lambda: {"unavailable": "this torch build sees no CUDA device"}})
        return
    set_threads(threads)
    # Test batches are read-only views of the loaded file; they are only read here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rss_imports = _max_rss_mib()
    cfg = TrainConfig()  # the same defaults as scratchvae's run
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def batch(images_u8):
        """A float batch from a uint8 one, converted on its own (on the device when there is one)."""
        return torch.from_numpy(images_u8).to(device).float().div_(255)

    def evaluate(model, test_x, batch_size=1000):
        gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the same noise at every evaluation
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(test_x), batch_size):
                recon, kl = model.loss_parts(batch(test_x[start : start + batch_size]), generator=gen)
                total += float((recon + kl).sum())
        return total / len(test_x)

    def run():
        seconds = dict.fromkeys(PHASES, 0.0)
        torch.manual_seed(cfg.seed)
        t_wall = time.perf_counter()
        mnist = load_mnist(cfg.data_dir)
        train_x, test_x = mnist.train_images, mnist.test_images
        seconds["data"] = time.perf_counter() - t_wall
        model = TorchVAE(784, cfg.hidden[0], cfg.latent, init=getattr(cfg, "init", "auto")).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        data_rng = Generator(cfg.seed, np, stream=STREAM_DATA)
        n, bs = len(train_x), cfg.batch_size
        history = []
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            perm = data_rng.permutation(n)
            loss_sum = 0.0
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                opt.zero_grad(set_to_none=True)
                loss = model(batch(train_x[idx]))
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)  # one host sync per step, like scratchvae on the CPU
            sync()
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            test_loss = evaluate(model, test_x)
            seconds["eval"] += time.perf_counter() - t0
            seconds["train"] += train_s
            history.append({"epoch": epoch, "train_loss": loss_sum / n, "seconds": train_s,
                            "examples_per_s": n / train_s, "test_loss": test_loss})  # fmt: skip
        wall = time.perf_counter() - t_wall
        info = torch_info(device)
        out = {
            "impl": f"torch-{device}", "wall_s": wall, "seconds": seconds, "history": history,
            "device": info.get("device_name") or cpu_model(), "torch_info": info,
            "rss_after_imports_mib": rss_imports, "peak_rss_mib": _max_rss_mib(),
        }  # fmt: skip
        if device == "cuda":
            out["device_memory_pool_mib"] = torch.cuda.max_memory_reserved() / 2**20
        return out

    serve(conn, {"run": run})


# ------------------------------------------------------------------------------------------
# Parent side.
# ------------------------------------------------------------------------------------------


_HELP = """\
Wall time and peak resident memory of full MNIST training epochs:
scratchvae's trainer (scratchvae.train.train with its default settings: batch
128, Adam 1e-3, float32, test ELBO, checkpoint and pictures after each epoch)
against an equivalent PyTorch training loop (same model, data order and test
evaluation; no checkpoints or pictures). Each run is a fresh worker process;
the table puts the two side by side, with the ratio, and splits the wall time
into loading, training, evaluation, checkpoints and pictures."""

_EPILOG = """\
outputs:
  a table on stdout; unless --no-save, benchmarks/results/epoch-TAG.json and
  .md (TAG: cpu, or the GPU's name with --backend cupy); --json FILE too.

examples:
  python benchmarks/epoch.py --epochs 10               # the recorded run
  python benchmarks/epoch.py --epochs 1 --no-save      # a quick check
  python benchmarks/epoch.py --backend cupy --epochs 10   # on a GPU machine"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python benchmarks/epoch.py",
        description=_HELP,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=1, help="training epochs per run (default: %(default)s)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="scratchvae backend (default: %(default)s); PyTorch runs on the CPU for numpy and on CUDA for cupy")  # fmt: skip
    p.add_argument("--engine", choices=("auto", "reference", "cpu", "gpu"), default="auto",
                   help="the trainer's --engine (default: %(default)s: cpu on numpy, reference on cupy)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per implementation, alternating between them; the table shows medians (default: %(default)s)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads of scratchvae's training steps (the trainer's --threads; default: its own choice, "
                        "one per CPU, at most 8, on numpy)")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="PyTorch intra-op threads (default: as many CPUs as scratchvae's steps use: their "
                        "threads, or numpy's BLAS threads when they run on one)")  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="run scratchvae only, even when PyTorch is importable")
    add_shared_arguments(p)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        p.error("--epochs and --repeats must be at least 1")
    check_thread_flags(p, args, ("threads", "blas_threads", "torch_threads"))
    return args


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _run_once(name, target, args, unset, env=None):
    w = Worker(name, target, args, unset, env)
    try:
        return w.call("run")
    finally:
        w.close()


def main(argv=None):
    args = parse_args(argv)
    unset, env_note = worker_env_changes(args.keep_openblas_env)
    if env_note["found"]:
        what = "removed in the workers" if env_note["unset_for_workers"] else "kept (--keep-openblas-env)"
        _log(f"note: {', '.join(f'{k}={v}' for k, v in env_note['found'].items())} set here; {what}")
    if args.backend == "cupy":
        use_checkout()
        from scratchvae.backend import cupy_available

        ok, why = cupy_available()
        if not ok:
            sys.exit(f"epoch.py: --backend cupy: {why}")
    notes = []
    use_torch = not args.no_torch and torch_available()
    if not args.no_torch and not use_torch:
        notes.append("PyTorch not importable: scratchvae only (pip install torch to compare)")
    machine = machine_info()
    machine["git"] = git_info()
    warn_if_busy(machine)

    scratch = f"scratchvae-{args.backend}" + (f"-{args.engine}" if args.engine != "auto" else "")
    torch_name = "torch-cuda" if args.backend == "cupy" else "torch-cpu"
    impls = [scratch] + ([torch_name] if use_torch else [])
    runs = {i: [] for i in impls}
    threads = args.torch_threads
    t_start = time.perf_counter()
    for r in range(args.repeats):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            _log(f"run {r + 1}/{args.repeats}: {impl}, {args.epochs} epoch(s) ...")
            if impl == scratch:
                res = _run_once(impl, _scratch_worker, (args.backend, args.epochs, args.threads, args.engine), unset,
                                blas_thread_env(args.blas_threads))  # fmt: skip
                threads = threads or cpus_used(res)
            else:
                device = "cuda" if impl == "torch-cuda" else "cpu"
                res = _run_once(impl, _torch_worker, (device, threads or blas_threads({}), args.epochs), unset)
                if "unavailable" in res:
                    notes.append(f"{impl} not run: {res['unavailable']}")
                    impls.remove(impl)
                    runs.pop(impl)
                    continue
            runs[impl].append(res)
            _log(f"  {impl}: {res['wall_s']:.1f} s wall, peak RSS {res['peak_rss_mib']:.0f} MiB "
                 f"({time.perf_counter() - t_start:.0f} s so far)")  # fmt: skip
    machine["load_average_end"] = load_average()
    results = assemble(args, machine, env_note, notes, runs, threads)
    text = text_table(*table(results))
    print()
    for line in _header_lines(results):
        print(line)
    if results["note"]:
        print(f"note: {results['note']}")
    print()
    print(text)
    for note in results["notes"]:
        print(f"note: {note}")
    write_outputs(args, results)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_runs(runs, epochs):
    """Medians over an implementation's runs of the numbers the table shows."""
    def med(f):
        return _median([f(r) for r in runs])

    phases = {p: med(lambda r, p=p: r["seconds"][p]) for p in PHASES}
    wall = med(lambda r: r["wall_s"])
    return {
        "wall_s": wall,
        "phases_s": phases,
        "other_s": med(lambda r: r["wall_s"] - sum(r["seconds"].values())),
        "train_s_per_epoch": phases["train"] / epochs,
        "eval_s_per_epoch": phases["eval"] / epochs,
        "train_examples_per_s": med(lambda r: 60000 * epochs / r["seconds"]["train"]),
        "final_train_loss": med(lambda r: r["history"][-1]["train_loss"]),
        "final_test_loss": med(lambda r: r["history"][-1]["test_loss"]),
        "peak_rss_mib": med(lambda r: r["peak_rss_mib"]),
        "rss_after_imports_mib": med(lambda r: r["rss_after_imports_mib"]),
        "device_memory_pool_mib": med(lambda r: r.get("device_memory_pool_mib")),
        "runs": len(runs),
    }


def assemble(args, machine, env_note, notes, runs, threads):
    summary = {impl: summarize_runs(rs, args.epochs) for impl, rs in runs.items() if rs}
    infos = {}
    for impl, rs in runs.items():
        first = rs[0]
        if impl.startswith("scratchvae"):
            infos[impl] = {k: first.get(k) for k in ("device", "scratchvae", "numpy", "blas_build", "blas_runtime",
                                                     "config", "step_threads")}  # fmt: skip
        else:
            infos[impl] = {**first["torch_info"], "device": first["device"]}
    return {
        "benchmark": "epoch",
        "what": "full MNIST training epochs with the trainer's default settings (batch 128, Adam 1e-3, float32)",
        "note": args.note,
        "settings": {"epochs": args.epochs, "repeats": args.repeats, "backend": args.backend,
                     "step_threads": args.threads, "blas_threads": args.blas_threads,
                     "torch_threads": threads},  # fmt: skip
        "machine": machine,
        "openblas_env": env_note,
        "implementations": infos,
        "summary": summary,
        "runs": runs,
        "notes": notes,
    }


def table(results):
    """Headers and rows of the side-by-side table (one column per implementation, then the ratio)."""
    summary = results["summary"]
    impls = list(summary)
    ratio = len(impls) == 2
    headers = ["", *impls] + ([f"{impls[0]} / {impls[1]}"] if ratio else [])
    e = results["settings"]["epochs"]
    rows_spec = [
        (f"total wall, {e} epoch(s) (s)", lambda s: s["wall_s"], True),
        ("  loading MNIST (s)", lambda s: s["phases_s"]["data"], False),
        ("  training (s per epoch)", lambda s: s["train_s_per_epoch"], True),
        ("  test evaluation (s per epoch)", lambda s: s["eval_s_per_epoch"], True),
        ("  checkpoints (s)", lambda s: s["phases_s"]["checkpoint"], False),
        ("  pictures (s)", lambda s: s["phases_s"]["pictures"], False),
        ("  other (s)", lambda s: s["other_s"], False),
        ("training examples/s", lambda s: s["train_examples_per_s"], True),
        ("final train loss (nats)", lambda s: s["final_train_loss"], False),
        ("final test loss (nats)", lambda s: s["final_test_loss"], False),
        ("peak RSS (MiB)", lambda s: s["peak_rss_mib"], True),
        ("RSS after imports (MiB)", lambda s: s["rss_after_imports_mib"], True),
    ]
    if any(s["device_memory_pool_mib"] is not None for s in summary.values()):
        rows_spec.append(("GPU memory pool (MiB)", lambda s: s["device_memory_pool_mib"], True))
    rows = []
    for label, get, with_ratio in rows_spec:
        values = [get(summary[i]) for i in impls]
        row = [label, *(fmt(v) for v in values)]
        if ratio:
            row.append(f"{values[0] / values[1]:.2f}x" if with_ratio and values[0] and values[1] else "")
        rows.append(row)
    return headers, rows


def _header_lines(results):
    m, s = results["machine"], results["settings"]
    lines = [f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']}"]
    for impl, info in results["implementations"].items():
        if impl.startswith("scratchvae"):
            lines.append(f"{impl}: scratchvae {info['scratchvae']}, {step_summary(info)}, {blas_summary(info)} "
                         f"on {info['device']}")  # fmt: skip
        else:
            lines.append(f"{impl}: torch {info['torch']} ({info.get('blas')}, {info['threads']} threads) on {info['device']}")
    env = results["openblas_env"]
    if env["found"]:
        lines.append(f"OpenBLAS environment {env['found']} {'removed in workers' if env['unset_for_workers'] else 'kept'}")
    git = m.get("git") or {}
    if git.get("commit"):
        dirty = f", uncommitted changes in {', '.join(git['scratchvae_modified'])}" if git.get("scratchvae_modified") else ""
        lines.append(f"scratchvae at {git['commit'][:10]}{dirty}")
    lines.append(f"{s['epochs']} epoch(s) per run, {s['repeats']} run(s) each, medians; "
                 f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end")  # fmt: skip
    return lines


def write_outputs(args, results):
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        _log(f"wrote {args.json}")
    if args.no_save:
        return
    gpu = next((i.get("device") for name, i in results["implementations"].items()
                if name.startswith("scratchvae-cupy")), None)  # fmt: skip
    tag = args.tag or (slug(gpu) if gpu else "cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"epoch-{tag}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    headers, rows = table(results)
    lines = [f"# Training epochs: scratchvae vs PyTorch ({results['machine']['date']})", ""]
    if results["note"]:
        lines += [f"**Note:** {results['note']}", ""]
    lines += [f"- {line}" for line in _header_lines(results)]
    indented = [[r[0].replace("  ", "&emsp;", 1) if r[0].startswith("  ") else r[0], *r[1:]] for r in rows]
    lines += ["", markdown_table(headers, indented), ""]
    lines += [
        "Training and evaluation seconds are measured inside each worker; scratchvae's phases come "
        "from wrapping its trainer's functions (`load_data`, `evaluate_elbo`, `Run.save`, "
        "`write_pictures`). PyTorch's loop writes no checkpoints or pictures. Peak RSS is the "
        "worker process's high-water mark (`VmHWM`; `ru_maxrss` where there is no /proc).",
    ]
    lines += [f"\nNote: {n}" for n in results["notes"]]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _log(f"wrote {base.with_suffix('.json')}, {base.with_suffix('.md')}")


if __name__ == "__main__":
    try:
        main()
    except WorkerError as exc:
        sys.exit(f"epoch.py: {exc}")
