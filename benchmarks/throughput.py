r"""Training-step throughput of scratchvae against PyTorch, with the machine's matmul roofline.

One *step* is what the trainer does per minibatch: ``engine.step(x)`` of
the trainer's engine (forward, hand-written backward, gradients into the flat
buffer, then the Adam update, lr 1e-3; on the ``cpu`` engine split over
``--threads`` threads by rows of the batch, as in the trainer), for the
784-400-20 VAE (ReLU, Bernoulli likelihood from logits, float32) on a fixed
batch of real MNIST grey levels, with fresh reparameterization noise every
step. ``--engines reference,cpu`` times the textbook step beside the fast one. PyTorch runs the same model
and loss (``torch_vae.TorchVAE``) with autograd and ``torch.optim.Adam``.

How it is measured:

* every implementation runs in its own spawned worker process (two BLAS or
  OpenMP thread pools in one process disturb each other); the parent only
  sends commands;
* each (implementation, batch size) is warmed up, then timed in rounds of N
  consecutive steps (N chosen so a round lasts at least ``--min-time``);
  rounds alternate between implementations, in a rotated order each time, so
  slow drifts in machine load hit all of them alike; the table shows the
  median over ``--repeats`` rounds, and the interquartile range;
* in the same rounds each worker times the step's eleven matrix products
  alone ("GEMM ms": the floor for this batch size in that library) and a few
  float32 matmuls of representative shapes; the best of those is the
  backend's measured peak ("roofline") that "% peak" refers to;
* a step's FLOPs are counted from the layer sizes: forward
  :math:`2B\sum n_{in}n_{out}`, weight gradients the same again, input
  gradients :math:`2B\sum n_{in}n_{out}` over every layer but the first:
  3.28 MFLOP per example for 784-400-20.

``--count-kernels`` adds, for every implementation on a GPU, the kernels the
GPU runs per step, as PyTorch's profiler (CUPTI) records them: every kernel of
the worker's process, whichever library launched it (cupy's and cuBLAS's as
well as PyTorch's), counted over a few steps after the timing rounds.

``--profile B`` instead runs cProfile over numpy steps at batch size B and
prints where the time goes, function by function.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Worker,
    WorkerError,
    add_shared_arguments,
    blas_summary,
    blas_thread_env,
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
    summarize,
    text_table,
    torch_available,
    use_checkout,
    warn_if_busy,
    worker_env_changes,
)

INPUT_DIM, HIDDEN, LATENT = 784, 400, 20
LR = 1e-3
EXPECTED_FLOPS_PER_EXAMPLE = 3_280_000  # 784-400-20: 3.28 MFLOP per example and step
DEFAULT_BATCH_SIZES = (32, 128, 512, 2048)
# Idle BLAS/OpenMP threads keep spinning for a moment after their work ends; before
# handing the CPUs to another worker, wait until the previous one's threads sleep.
HANDOVER_PAUSE_S = 0.15

# (label, m, k, n, a transposed): C(m, n) = A(m, k) @ B(k, n). The first two are the
# biggest products of a step at batch 2048 (forward of the first layer and its weight gradient).
ROOFLINE_SHAPES = (
    ("x@W 2048x784x400", 2048, 784, 400, False),
    ("x.T@dY 784x2048x400", 784, 2048, 400, True),
    ("square 1024", 1024, 1024, 1024, False),
    ("square 2048", 2048, 2048, 2048, False),
)
GPU_ROOFLINE_SHAPES = (("square 4096", 4096, 4096, 4096, False),)  # a GPU needs more work to fill


# ------------------------------------------------------------------------------------------
# FLOPs of one step, from the layer sizes.
# ------------------------------------------------------------------------------------------


def step_flops_per_example(layers) -> int:
    """FLOPs per example of forward + backward through dense ``layers`` [(n_in, n_out), ...].

    Forward and the weight gradients each cost ``2 n_in n_out`` per layer; the
    input gradient too, except for the first layer, whose input is the data.
    Elementwise work (activations, loss, Adam) is not counted.
    """
    macs = [n_in * n_out for n_in, n_out in layers]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def step_gemms(batch, layers):
    """The matrix products of one step: ``(m, k, n, a_transposed, b_transposed)`` each.

    The layouts are scratchvae's: ``y = x @ W``, ``d_W = x.T @ d_y``, ``d_x = d_y @ W.T``.
    """
    gemms = [(batch, n_in, n_out, False, False) for n_in, n_out in layers]  # forward
    gemms += [(n_in, batch, n_out, True, False) for n_in, n_out in layers]  # weight gradients
    gemms += [(batch, n_out, n_in, False, True) for n_in, n_out in layers[1:]]  # input gradients
    return gemms


def _gemm_flops(gemms) -> int:
    return sum(2 * m * k * n for m, k, n, _, _ in gemms)


# ------------------------------------------------------------------------------------------
# Worker side: timing loops shared by every implementation.
# ------------------------------------------------------------------------------------------


class _Cases:
    """Timed cases of one worker: each is warmed up once, then timed in rounds of ``n`` calls."""

    def __init__(self, sync, min_time, warmup):
        self.sync, self.min_time, self.warmup = sync, min_time, warmup
        self.cases = {}

    def loop(self, fn, n):
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / n

    def time(self, key, make):
        """Seconds per call of the case ``key`` (built by ``make()`` on first use), and ``n``.

        ``n`` starts from the fastest of three short estimates (a burst of load
        during calibration must not make every round short) and grows whenever
        a round ends up shorter than ``min_time``.
        """
        if key not in self.cases:
            fn = make()
            t_end, k = time.perf_counter() + self.warmup, 0
            while k < 3 or time.perf_counter() < t_end:
                fn()
                k += 1
            self.sync()
            per_call = min(self.loop(fn, 2) for _ in range(3))
            self.cases[key] = [fn, max(3, math.ceil(self.min_time / per_call))]
        case = self.cases[key]
        fn, n = case
        fn()  # re-warm caches after another worker had the CPU
        per_call = self.loop(fn, n)
        case[1] = max(n, math.ceil(self.min_time / per_call))
        return {"seconds": per_call, "n": n}

    def best(self, fn, budget):
        """The fastest single call of ``fn`` over at least 3 calls and ``budget`` seconds."""
        fn()
        self.sync()
        best, k, t_end = math.inf, 0, time.perf_counter() + budget
        while k < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
            k += 1
        return best


def _matmul_case(matmul, m, k, n, ta, tb, empty, rand):
    """A zero-argument function computing one product into a preallocated output."""
    a = rand((k, m)).T if ta else rand((m, k))
    b = rand((n, k)).T if tb else rand((k, n))
    c = empty((m, n))
    return lambda: matmul(a, b, out=c)


def _common_handlers(cases, matmul, empty, rand, layers, roofline_time, gpu):
    def make_gemms(batch):
        products = [_matmul_case(matmul, *g, empty, rand) for g in step_gemms(batch, layers)]

        def run_all():
            for p in products:
                p()

        return run_all

    shapes = ROOFLINE_SHAPES + (GPU_ROOFLINE_SHAPES if gpu else ())
    products = {}

    def roofline():
        out = {}
        for label, m, k, n, ta in shapes:
            if label not in products:
                products[label] = _matmul_case(matmul, m, k, n, ta, False, empty, rand)
            out[label] = 2 * m * k * n / cases.best(products[label], roofline_time) / 1e9
        return out

    return {"gemm": lambda batch: cases.time(("gemm", batch), lambda: make_gemms(batch)), "roofline": roofline}



def _scratch_worker(conn, backend, min_time, warmup, roofline_time, threads=None, engine="auto"):
    """Worker for scratchvae on ``backend`` ("numpy" or "cupy") with ``engine``; ``threads``: the cpu engine's (None: its default)."""
    use_checkout()
    import numpy as np

    import scratchvae as sv
    from common import numpy_info
    from scratchvae.backend import device_name, get_xp, to_device
    from scratchvae.data import load_mnist, to_float_batch
    from scratchvae.engines import engine_name

    xp = get_xp(backend)
    sync = xp.cuda.Device().synchronize if xp is not np else (lambda: None)
    images = load_mnist().train_images
    rng = np.random.default_rng(0)

    def make_model():
        return sv.VAE(
            INPUT_DIM, hidden=(HIDDEN,), latent_dim=LATENT, likelihood="bernoulli", activation="relu",
            backend=backend, dtype="float32", seed=0,
        )  # fmt: skip

    open_engines = []  # the cpu engine holds BLAS to one thread while open: closed after each round

    def make_engine(model, opt):
        on_cpu = engine_name(engine, model) == "cpu"
        return sv.make_engine(engine, model, opt, threads=threads if on_cpu else None)  # what the trainer runs

    def make_step(batch):
        model = make_model()
        opt = sv.Adam(model, lr=LR)
        x = to_device(to_float_batch(images[:batch], "none", dtype=np.float32), xp)
        runs = make_engine(model, opt)
        open_engines.append(runs)

        def step():
            runs.step(x, check_input=False)  # fresh eps from the model's generator; the trainer checks its data once

        return step

    def close_steps():  # an engine reopens itself when next called
        for runs in open_engines:
            runs.close()

    def time_step(batch):
        try:
            return cases.time(("step", batch), lambda: make_step(batch))
        finally:
            close_steps()

    def info():
        model = make_model()
        layers = [(d.n_in, d.n_out) for d in model.encoder.dense + model.decoder.dense]
        runs = make_engine(model, sv.Adam(model, lr=LR))  # builds nothing that runs: threads start at the first step
        out = {"impl": f"scratchvae-{backend}", "backend": backend, "layers": layers, "n_params": model.n_params,
               "scratchvae": sv.__version__, "engine": runs.name, "step_threads": runs.threads, **numpy_info()}  # fmt: skip
        if xp is np:
            out["device"] = cpu_model()
        else:
            out["device"] = device_name(xp)
            out["cupy"] = xp.__version__
            out["cuda_runtime"] = xp.cuda.runtime.runtimeGetVersion()
        return out

    cases = _Cases(sync, min_time, warmup)
    layers = [(INPUT_DIM, HIDDEN), (HIDDEN, 2 * LATENT), (LATENT, HIDDEN), (HIDDEN, INPUT_DIM)]

    def rand(shape):
        return to_device(rng.random(shape, dtype=np.float32), xp)

    handlers = _common_handlers(
        cases, xp.matmul, lambda s: xp.empty(s, dtype=np.float32), rand, layers, roofline_time, xp is not np
    )
    handlers["info"] = info
    handlers["step"] = time_step

    def profile(batch, seconds, top):
        try:
            return _profile(make_step(batch), sync, seconds, top)
        finally:
            close_steps()

    handlers["profile"] = profile

    def kernels(batch):
        try:
            return _count_kernels(make_step(batch), sync)
        finally:
            close_steps()

    handlers["kernels"] = kernels
    serve(conn, handlers)


def _torch_worker(conn, device, threads, min_time, warmup, roofline_time):
    """Worker for the PyTorch reference model on ``device``: "cpu", "cuda" (eager) or "cuda-graph".

    "cuda-graph" captures the whole step (forward, backward, Adam with
    ``capturable=True``) as one CUDA graph after a warm-up on a side stream,
    and replays it: PyTorch's fastest way to run a small model's step.
    """
    use_checkout()
    import numpy as np
    import torch

    from scratchvae.data import load_mnist, to_float_batch
    from torch_vae import TorchVAE, set_threads, torch_info

    graph = device == "cuda-graph"
    label, device = device, ("cuda" if graph else device)
    if device == "cuda" and not torch.cuda.is_available():
        serve(conn, {"info": lambda: {"unavailable": "this torch build sees no CUDA device"}})
        return
    set_threads(threads)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    images = load_mnist().train_images
    gen = torch.Generator().manual_seed(0)

    def make_step(batch):
        model = TorchVAE(INPUT_DIM, HIDDEN, LATENT).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=LR, capturable=graph)
        x = torch.from_numpy(to_float_batch(images[:batch], "none", dtype=np.float32)).to(device)

        def step():
            opt.zero_grad(set_to_none=not graph)  # a graph replays into the same gradient buffers
            loss = model(x)
            loss.backward()
            opt.step()

        if not graph:
            return step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: autograd and Adam allocate their state
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        return captured.replay

    def info():
        out = {"impl": f"torch-{label}", "backend": "torch", **torch_info(device)}
        out["device"] = out.get("device_name") or cpu_model()
        return out

    def rand(shape):
        return torch.rand(shape, generator=gen, dtype=torch.float32).to(device)

    def empty(shape):
        return torch.empty(shape, dtype=torch.float32, device=device)

    layers = [(INPUT_DIM, HIDDEN), (HIDDEN, 2 * LATENT), (LATENT, HIDDEN), (HIDDEN, INPUT_DIM)]
    cases = _Cases(sync, min_time, warmup)
    handlers = _common_handlers(cases, torch.mm, empty, rand, layers, roofline_time, device == "cuda")
    handlers["info"] = info
    handlers["step"] = lambda batch: cases.time(("step", batch), lambda: make_step(batch))
    handlers["kernels"] = lambda batch: _count_kernels(make_step(batch), sync)
    serve(conn, handlers)


def _jax_worker(conn, device, min_time, warmup, roofline_time):
    """Worker for the same step in JAX on ``device`` ("cpu" or "gpu"): forward, ``jax.grad`` and Adam in one ``jit``.

    The model, loss and Adam are scratchvae's defaults (784-400-20, ReLU, Bernoulli from logits, analytic KL,
    ``nn.Linear``'s initialisation, Adam 1e-3); matmuls at precision "highest", so float32 throughout (no TF32).
    """
    use_checkout()
    import numpy as np

    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        why = f"jax is not importable ({exc})"  # (exc is gone once the except block ends)
        serve(conn, {"info": lambda: {"unavailable": why}})
        return
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        dev = jax.devices(device)[0]
    except RuntimeError as exc:
        why = f"jax sees no {device} device ({exc})"
        serve(conn, {"info": lambda: {"unavailable": why}})
        return
    from scratchvae.data import load_mnist, to_float_batch

    images = load_mnist().train_images
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    sizes = [(INPUT_DIM, HIDDEN), (HIDDEN, 2 * LATENT), (LATENT, HIDDEN), (HIDDEN, INPUT_DIM)]
    last = [None]  # the newest result: waiting for it waits for every step before it

    def sync():
        if last[0] is not None:
            jax.block_until_ready(last[0])

    def loss_fn(params, x, key):
        (w1, c1), (w2, c2), (w3, c3), (w4, c4) = params
        enc = jax.nn.relu(x @ w1 + c1) @ w2 + c2
        mu, log_var = enc[:, :LATENT], enc[:, LATENT:]
        z = mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape, mu.dtype)
        logits = jax.nn.relu(z @ w3 + c3) @ w4 + c4
        recon = (jnp.maximum(logits, 0) - x * logits + jnp.log1p(jnp.exp(-jnp.abs(logits)))).sum(axis=1)
        kl = -0.5 * (1.0 + log_var - mu * mu - jnp.exp(log_var)).sum(axis=1)
        return (recon + kl).mean()

    def train_step(params, m, v, t, x, key):
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, sub)
        t = t + 1
        m = jax.tree_util.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        params = jax.tree_util.tree_map(lambda p_, m_, v_: p_ - LR * (m_ / bc1) / (jnp.sqrt(v_ / bc2) + adam_eps),
                                        params, m, v)  # fmt: skip
        return params, m, v, t, key, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1, 2))
    rng = np.random.default_rng(0)

    def make_step(batch):
        params = []
        for n_in, n_out in sizes:  # W, b ~ U(+-1/sqrt(n_in)), nn.Linear's default
            a = 1 / np.sqrt(n_in)
            params.append(tuple(rng.uniform(-a, a, shape).astype(np.float32) for shape in ((n_in, n_out), (n_out,))))
        params = jax.device_put(params, dev)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        state = [params, zeros, jax.tree_util.tree_map(jnp.zeros_like, params), jnp.float32(0)]
        key = jax.device_put(jax.random.PRNGKey(0), dev)
        x = jax.device_put(to_float_batch(images[:batch], "none", dtype=np.float32), dev)
        holder = [key]

        def step():
            *state[:4], holder[0], loss = jitted(*state[:4], x, holder[0])
            last[0] = loss

        return step

    def info():
        return {"impl": f"jax-{device}", "backend": "jax", "jax": jax.__version__, "device": str(dev.device_kind),
                "platform": dev.platform}  # fmt: skip

    def rand(shape):
        return jax.device_put(rng.random(shape, dtype=np.float32), dev)

    def matmul(a, b, out=None):  # JAX writes no output buffers: the result is kept for sync()
        last[0] = jnp.matmul(a, b)

    cases = _Cases(sync, min_time, warmup)
    handlers = _common_handlers(cases, matmul, lambda shape: None, rand, sizes, roofline_time, device == "gpu")
    handlers["info"] = info
    handlers["step"] = lambda batch: cases.time(("step", batch), lambda: make_step(batch))
    serve(conn, handlers)


KERNEL_STEPS = 20  # steps profiled for --count-kernels


def kernels_in_trace(trace: dict, steps: int) -> dict:
    """Kernels and memory copies/sets per step in a Chrome trace of PyTorch's profiler (Kineto's categories)."""
    names = {}
    copies = 0
    for event in trace.get("traceEvents", []):
        if event.get("cat") == "kernel":
            names[event["name"]] = names.get(event["name"], 0) + 1
        elif event.get("cat") in ("gpu_memcpy", "gpu_memset"):
            copies += 1
    top = sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return {"kernels_per_step": sum(names.values()) / steps, "copies_per_step": copies / steps,
            "top_kernels": [{"name": name[:80], "per_step": n / steps} for name, n in top]}  # fmt: skip


def _count_kernels(step, sync, steps=KERNEL_STEPS):
    """The GPU kernels per call of ``step``, from PyTorch's profiler over ``steps`` calls; or why not."""
    import tempfile

    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return {"unavailable": f"counting needs PyTorch's profiler ({exc})"}
    if not torch.cuda.is_available():
        return {"unavailable": "this torch build sees no CUDA device"}
    step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return {**kernels_in_trace(trace, steps), "steps": steps, "counted_by": f"torch {torch.__version__} profiler"}


def _profile(step, sync, seconds, top):
    """cProfile consecutive steps for ``seconds``; the costliest functions by own time, per step."""
    import cProfile
    import pstats

    for _ in range(3):
        step()
    sync()
    prof = cProfile.Profile()
    n, t_end = 0, time.perf_counter() + seconds
    t0 = time.perf_counter()
    prof.enable()
    while n < 3 or time.perf_counter() < t_end:
        step()
        n += 1
    sync()
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, ncalls, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())

    def where(key):
        file, line, name = key
        if file == "~":
            return name
        p = Path(file)
        short = f"{p.parent.name}/{p.name}" if p.parent.name in ("scratchvae", "benchmarks") else p.name
        return f"{short}:{line}({name})"

    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "steps": n,
        "wall_ms_per_step": 1e3 * wall / n,
        "profiled_ms_per_step": 1e3 * total / n,
        "rows": [
            {"function": where(k), "calls_per_step": v[1] / n, "own_ms_per_step": 1e3 * v[2] / n,
             "cum_ms_per_step": 1e3 * v[3] / n, "own_percent": 100 * v[2] / total}  # fmt: skip
            for k, v in rows
        ],
    }


# ------------------------------------------------------------------------------------------
# Parent side.
# ------------------------------------------------------------------------------------------


def _positive_ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _engines(text):
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ("auto", "reference", "cpu", "gpu")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"engines are auto, reference, cpu or gpu, got {text!r}")
    return list(dict.fromkeys(names))


def _backends(text):
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ("numpy", "cupy", "auto")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"backends are numpy, cupy or auto, got {text!r}")
    return names


_HELP = """\
Time one full training step (forward, hand-written backward, Adam step) of the
784-400-20 MNIST VAE in scratchvae, and the same step of an equivalent PyTorch
model, at several batch sizes (float32, real MNIST grey levels).

Each implementation runs in its own worker process; rounds alternate between
them; the table shows the median over rounds, with the interquartile range.
In the same run each worker also times the step's matrix products alone
(GEMM ms) and the best float32 matmul of a few shapes: the backend's peak,
which "% peak" refers to."""

_EPILOG = """\
outputs:
  a table on stdout; unless --no-save, benchmarks/results/throughput-TAG.json,
  .md and .png (TAG: cpu, or the GPU's name when cupy runs); --json FILE too.

examples:
  python benchmarks/throughput.py                         # the recorded run
  python benchmarks/throughput.py --batch-sizes 32,128 --repeats 3 --no-save
  python benchmarks/throughput.py --engines reference,cpu  # the textbook step beside the fast one
  python benchmarks/throughput.py --backends numpy,cupy   # on a GPU machine
  python benchmarks/throughput.py --backends cupy --engines reference,gpu --count-kernels  # kernels per step
  python benchmarks/throughput.py --profile 128           # where a step's time goes"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python benchmarks/throughput.py",
        description=_HELP,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch-sizes", type=_positive_ints, default=list(DEFAULT_BATCH_SIZES), metavar="B,B,...",
                   help="comma-separated batch sizes (default: 32,128,512,2048)")  # fmt: skip
    p.add_argument("--backends", type=_backends, default=["auto"], metavar="NAME,...",
                   help="comma-separated scratchvae backends: numpy, cupy, or auto = numpy plus cupy when a GPU answers "
                        "(default: auto); PyTorch runs on the CPU next to numpy and on CUDA next to cupy")  # fmt: skip
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per (implementation, batch size) (default: %(default)s)")
    p.add_argument("--min-time", type=float, default=0.5, metavar="S",
                   help="each round runs enough consecutive steps to last at least S seconds (default: %(default)s)")  # fmt: skip
    p.add_argument("--warmup", type=float, default=0.5, metavar="S",
                   help="untimed steps for at least S seconds before the first round (default: %(default)s)")  # fmt: skip
    p.add_argument("--roofline-time", type=float, default=0.2, metavar="S",
                   help="seconds per matmul shape and round when measuring the peak rate (default: %(default)s)")  # fmt: skip
    p.add_argument("--engines", type=_engines, default=["auto"], metavar="NAME,...",
                   help="scratchvae engines to time, each in a worker of its own: auto (the trainer's: cpu on numpy, "
                        "reference on cupy), reference (the textbook step), cpu (numpy) or gpu (cupy) (default: "
                        "auto); with several, workers are named scratchvae-BACKEND-ENGINE")  # fmt: skip
    p.add_argument("--threads", type=_positive_ints, default=None, metavar="N,N,...",
                   help="threads of the cpu engine's training step (default: its own choice, one per CPU, at most 8); "
                        "several values time one worker each, named ...-tN")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="PyTorch intra-op threads (default: as many CPUs as the first scratchvae-numpy worker's "
                        "step uses: its step threads, or its BLAS threads when the step runs on one)")  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even when it is importable")
    p.add_argument("--jax", choices=["auto", "cpu", "gpu", "off"], default="auto",
                   help="time the same step as one JAX jit function (float32, matmul precision 'highest') on this "
                        "device; auto: on the GPU when cupy is timed, else off (default: auto)")  # fmt: skip
    add_shared_arguments(p)
    p.add_argument("--count-kernels", action="store_true",
                   help="after the timing rounds, count the kernels per step of every implementation on a GPU with "
                        "PyTorch's profiler (CUPTI; cupy's kernels included); a column of the table")  # fmt: skip
    p.add_argument("--profile", type=int, default=None, metavar="B",
                   help="instead of the benchmark: cProfile numpy steps at batch size B and print the top costs")  # fmt: skip
    p.add_argument("--profile-time", type=float, default=3.0, metavar="S", help="seconds of steps to profile (default: %(default)s)")
    p.add_argument("--profile-top", type=int, default=25, metavar="N", help="functions to list in the profile (default: %(default)s)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    for name in ("min_time", "warmup", "roofline_time", "profile_time"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    check_thread_flags(p, args, ("blas_threads", "torch_threads"))
    return args


def _resolve_backends(names):
    use_checkout()
    from scratchvae.backend import cupy_available

    out, notes = [], []
    for name in names:
        if name == "auto":
            out.append("numpy")
            ok, why = cupy_available()
            if ok:
                out.append("cupy")
            else:
                notes.append(f"cupy not timed: {why}")
        elif name == "cupy":
            ok, why = cupy_available()
            if not ok:
                sys.exit(f"throughput.py: --backends cupy: {why}")
            out.append(name)
        else:
            out.append(name)
    return list(dict.fromkeys(out)), notes


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_profile(args, unset):
    threads = args.threads[0] if args.threads else None
    w = Worker("scratchvae-numpy", _scratch_worker,
               ("numpy", args.min_time, args.warmup, args.roofline_time, threads, args.engines[0]),
               unset, blas_thread_env(args.blas_threads))  # fmt: skip
    try:
        info = w.call("info")
        _log(f"profiling {args.profile_time:g} s of numpy steps at batch {args.profile} ({blas_summary(info)})")
        prof = w.call("profile", args.profile, args.profile_time, args.profile_top)
        gemm = w.call("gemm", args.profile)
        step = w.call("step", args.profile)
    finally:
        w.close()
    lines = [
        f"scratchvae-numpy, batch {args.profile}, {info['device']}, {step_summary(info)}, {blas_summary(info)}",
        "(with a step on several threads, cProfile sees the calling thread's share)",
        f"load average {load_average()}",
        f"unprofiled step {1e3 * step['seconds']:.2f} ms; the step's 11 matmuls alone {1e3 * gemm['seconds']:.2f} ms "
        f"({100 * gemm['seconds'] / step['seconds']:.0f}% of the step), everything else "
        f"{1e3 * (step['seconds'] - gemm['seconds']):.2f} ms",
        f"under cProfile: {prof['wall_ms_per_step']:.2f} ms per step over {prof['steps']} steps "
        "(the profiler adds a little to every Python-level call)",
        "",
        text_table(
            ["function (own time: numpy ufuncs and @ count in their caller)", "calls/step", "own ms", "cum ms", "own %"],
            [[r["function"], fmt(r["calls_per_step"]), fmt(r["own_ms_per_step"]), fmt(r["cum_ms_per_step"]),
              f"{r['own_percent']:.1f}%"] for r in prof["rows"]],  # fmt: skip
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        threads = f"-t{args.blas_threads}" if args.blas_threads else ""
        path = args.out_dir / f"profile-numpy-b{args.profile}{threads}.txt"
        path.write_text(text + "\n")
        _log(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    unset, env_note = worker_env_changes(args.keep_openblas_env)
    if env_note["found"]:
        what = "removed in the workers" if env_note["unset_for_workers"] else "kept (--keep-openblas-env)"
        _log(f"note: {', '.join(f'{k}={v}' for k, v in env_note['found'].items())} set here; {what}")
    if args.profile is not None:
        return run_profile(args, unset)

    backends, notes = _resolve_backends(args.backends)
    use_torch = not args.no_torch and torch_available()
    if not args.no_torch and not use_torch:
        notes.append("PyTorch not importable: no torch rows (pip install torch to compare)")
    machine = machine_info()
    machine["git"] = git_info()
    warn_if_busy(machine)

    timing = (args.min_time, args.warmup, args.roofline_time)
    workers, infos = {}, {}
    try:
        for backend in backends:
            engines = list(dict.fromkeys(e if e != "auto" else ("cpu" if backend == "numpy" else "reference")
                                         for e in args.engines
                                         if (backend == "numpy" or e != "cpu") and (backend == "cupy" or e != "gpu")))  # fmt: skip
            for engine in engines:
                step_threads = (args.threads or [None]) if engine == "cpu" else [None]
                for t in step_threads:
                    name = (f"scratchvae-{backend}" + (f"-{engine}" if len(engines) > 1 else "")
                            + (f"-t{t}" if len(step_threads) > 1 else ""))  # fmt: skip
                    w = Worker(name, _scratch_worker, (backend, *timing, t, engine), unset,
                               blas_thread_env(args.blas_threads))  # fmt: skip
                    workers[w.name] = w
                    infos[w.name] = w.call("info")
                    infos[w.name]["impl"] = name
        first = infos[next(iter(infos))]
        flops = step_flops_per_example(first["layers"])
        assert flops == EXPECTED_FLOPS_PER_EXAMPLE, f"counted {flops} FLOPs per example, expected 3.28e6"
        assert _gemm_flops(step_gemms(1, first["layers"])) == flops
        threads = args.torch_threads or cpus_used(first)
        if use_torch:
            devices = ["cpu"] if "numpy" in backends else []
            devices += ["cuda", "cuda-graph"] if "cupy" in backends else []
            for device in devices:
                w = Worker(f"torch-{device}", _torch_worker, (device, threads, *timing), unset)
                info = w.call("info")
                if "unavailable" in info:
                    notes.append(f"torch-{device} not timed: {info['unavailable']}")
                    w.close()
                    continue
                workers[w.name] = w
                infos[w.name] = info
        jax_device = {"auto": "gpu" if "cupy" in backends else None, "off": None}.get(args.jax, args.jax)
        if jax_device is not None:
            # JAX takes 75% of the GPU's memory at start unless told not to; the other workers share the GPU
            w = Worker(f"jax-{jax_device}", _jax_worker, (jax_device, *timing), unset,
                       {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})  # fmt: skip
            info = w.call("info")
            if "unavailable" in info:
                notes.append(f"jax-{jax_device} not timed: {info['unavailable']}")
                w.close()
            else:
                workers[w.name] = w
                infos[w.name] = info
        for name, info in infos.items():
            blas = blas_summary(info) if "numpy" in info and info["backend"] not in ("torch", "jax") else (
                f"jax {info.get('jax')} ({info.get('platform')})" if info["backend"] == "jax" else
                f"torch {info.get('torch')} ({info.get('blas')}, {info.get('threads')} threads)")  # fmt: skip
            _log(f"{name}: {info['device']}; {blas}")

        impls = list(workers)
        steps = {(i, b): [] for i in impls for b in args.batch_sizes}
        gemms = {(i, b): [] for i in impls for b in args.batch_sizes}
        roof = {i: {} for i in impls}
        n_steps = {}
        t_start = time.perf_counter()
        for r in range(args.repeats):
            order = impls[r % len(impls):] + impls[: r % len(impls)]
            for b in args.batch_sizes:
                for i in order:
                    time.sleep(HANDOVER_PAUSE_S)
                    res = workers[i].call("step", b)
                    steps[i, b].append(res["seconds"])
                    n_steps[i, b] = res["n"]
                    gemms[i, b].append(workers[i].call("gemm", b)["seconds"])
            for i in order:
                time.sleep(HANDOVER_PAUSE_S)
                for label, gflops in workers[i].call("roofline").items():
                    roof[i].setdefault(label, []).append(gflops)
            _log(f"round {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)")
        kernels = count_kernels(workers, args, notes) if args.count_kernels else {}
    finally:
        for w in workers.values():
            w.close()

    machine["load_average_end"] = load_average()
    results = assemble(args, machine, infos, env_note, notes, flops, steps, gemms, roof, n_steps, threads, kernels)
    table = print_table(results)
    write_outputs(args, results, table)


def count_kernels(workers, args, notes) -> dict:
    """``{(impl, batch): counts}`` for each implementation on a GPU (see ``_count_kernels``); a failure is a note."""
    out = {}
    for impl, w in workers.items():
        if impl.startswith("jax-gpu"):
            notes.append(f"{impl}: kernels not counted (JAX's own profiler is not wired in)")
        if not impl.startswith(("scratchvae-cupy", "torch-cuda")):
            continue
        for b in args.batch_sizes:
            try:
                counted = w.call("kernels", b)
            except WorkerError as exc:
                notes.append(f"{impl}: kernels not counted: {str(exc).splitlines()[-1]}")
                break
            if "unavailable" in counted:
                notes.append(f"{impl}: kernels not counted: {counted['unavailable']}")
                break
            out[impl, b] = counted
        _log(f"{impl}: kernels counted" if (impl, args.batch_sizes[0]) in out else f"{impl}: kernels not counted")
    return out


def _peer(impl):
    """The PyTorch implementation on the same device as ``impl`` (eager: the baseline every ratio is against)."""
    on_gpu = impl.startswith(("scratchvae-cupy", "torch-cuda", "jax-gpu"))
    return "torch-cuda" if on_gpu else "torch-cpu"


def assemble(args, machine, infos, env_note, notes, flops, steps, gemms, roof, n_steps, threads, kernels=None):
    roofline = {}
    for impl, shapes in roof.items():
        per_shape = {label: summarize(v) for label, v in shapes.items()}
        best_label = max(per_shape, key=lambda k: per_shape[k]["max"])
        roofline[impl] = {"peak_gflops": per_shape[best_label]["max"], "peak_shape": best_label,
                          "shapes_gflops": per_shape}  # fmt: skip
    rows = []
    for (impl, b), samples in steps.items():
        s = summarize(samples)
        g = summarize(gemms[impl, b])
        sec = s["median"]
        gflops = flops * b / sec / 1e9
        rows.append({
            "impl": impl, "device": infos[impl]["device"], "batch": b,
            "ms_per_step": 1e3 * sec, "ms_q1": 1e3 * s["q1"], "ms_q3": 1e3 * s["q3"],
            "ms_min": 1e3 * s["min"], "ms_max": 1e3 * s["max"],
            "steps_per_round": n_steps[impl, b], "rounds": s["n"],
            "examples_per_s": b / sec, "gflop_per_step": flops * b / 1e9, "gflops": gflops,
            "fraction_of_peak": gflops / roofline[impl]["peak_gflops"],
            "gemm_ms": 1e3 * g["median"], "gemm_fraction": g["median"] / sec,
            "samples_ms": [1e3 * x for x in samples],
            "kernels": (kernels or {}).get((impl, b)),
        })  # fmt: skip
    by_key = {(r["impl"], r["batch"]): r for r in rows}
    for r in rows:
        peer = by_key.get((_peer(r["impl"]), r["batch"]))
        r["speed_vs_torch"] = peer["ms_per_step"] / r["ms_per_step"] if peer else None
        # both timed in the same round, one after the other: a slow spell of the machine slows both sides
        r["speed_vs_torch_same_round"] = (
            summarize([p / own for p, own in zip(peer["samples_ms"], r["samples_ms"])]) if peer else None
        )
    return {
        "benchmark": "throughput",
        "what": "one training step (forward, backward, Adam) of the 784-400-20 Bernoulli VAE, float32, MNIST grey levels",
        "note": args.note,
        "settings": {"batch_sizes": args.batch_sizes, "repeats": args.repeats, "min_time_s": args.min_time,
                     "warmup_s": args.warmup, "roofline_time_s": args.roofline_time,
                     "step_threads": args.threads, "blas_threads": args.blas_threads,
                     "torch_threads": threads},  # fmt: skip
        "flops_per_example": flops,
        "machine": machine,
        "openblas_env": env_note,
        "implementations": infos,
        "roofline": roofline,
        "rows": rows,
        "notes": notes,
    }


HEADERS = ["impl", "batch", "ms/step", "IQR ms", "examples/s", "GFLOP/s", "% peak", "GEMM ms", "GEMM %", "speed vs torch",
           "same-round ratio (IQR)"]  # fmt: skip


KERNELS_HEADER = "kernels/step"


def _counted(results) -> bool:
    return any(r.get("kernels") for r in results["rows"])


def _headers(results):
    """:data:`HEADERS`, and the kernels per step where they were counted (``--count-kernels`` on a GPU)."""
    return HEADERS + [KERNELS_HEADER] if _counted(results) else HEADERS


def _table_rows(results):
    out = []
    for r in results["rows"]:
        out.append([
            r["impl"], r["batch"], fmt(r["ms_per_step"]), f"{fmt(r['ms_q1'])}-{fmt(r['ms_q3'])}",
            fmt(round(r["examples_per_s"])), fmt(r["gflops"]), f"{100 * r['fraction_of_peak']:.0f}%",
            fmt(r["gemm_ms"]), f"{100 * r['gemm_fraction']:.0f}%",
            f"{r['speed_vs_torch']:.2f}x" if r["speed_vs_torch"] else "-",
            _ratio_range(r["speed_vs_torch_same_round"]),
        ])  # fmt: skip
        if _counted(results):
            out[-1].append(f"{r['kernels']['kernels_per_step']:g}" if r.get("kernels") else "-")
    return out


def _ratio_range(s):
    return f"{s['median']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f})" if s else "-"


def _roofline_lines(results):
    lines = []
    for impl, roof in results["roofline"].items():
        shapes = ", ".join(f"{k} {fmt(v['max'])}" for k, v in roof["shapes_gflops"].items())
        lines.append(f"{impl}: peak {fmt(roof['peak_gflops'])} GFLOP/s ({shapes})")
    return lines


def _header_lines(results):
    m, impls = results["machine"], results["implementations"]
    lines = [f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']}"]
    for name, info in impls.items():
        if info["backend"] == "torch":
            extra = f", {info['device_name']}" if info.get("device_name") else ""
            lines.append(f"{name}: torch {info['torch']} ({info.get('blas')}, {info['threads']} threads, "
                         f"CPU capability {info.get('cpu_capability')}){extra}")  # fmt: skip
        elif info["backend"] == "jax":
            lines.append(f"{name}: jax {info['jax']} on {info['device']} ({info['platform']}), one jit step, "
                         "matmul precision highest")  # fmt: skip
        else:
            extra = f", {info['device']}, cupy {info.get('cupy')}" if info["backend"] == "cupy" else ""
            lines.append(f"{name}: scratchvae {info['scratchvae']}, {step_summary(info)}, {blas_summary(info)}{extra}")
    env = results["openblas_env"]
    if env["found"]:
        lines.append(f"OpenBLAS environment {env['found']} {'removed in workers' if env['unset_for_workers'] else 'kept'}")
    git = m.get("git") or {}
    if git.get("commit"):
        dirty = f", uncommitted changes in {', '.join(git['scratchvae_modified'])}" if git.get("scratchvae_modified") else ""
        lines.append(f"scratchvae at {git['commit'][:10]}{dirty}")
    s = results["settings"]
    lines.append(f"{s['repeats']} rounds, each >= {s['min_time_s']} s of consecutive steps; medians; "
                 f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end")  # fmt: skip
    lines.append(f"FLOPs per example and step: {results['flops_per_example'] / 1e6:.2f} M")
    return lines


def print_table(results):
    table = text_table(_headers(results), _table_rows(results))
    print()
    for line in _header_lines(results):
        print(line)
    if results["note"]:
        print(f"note: {results['note']}")
    print()
    print(table)
    print()
    print("roofline (best float32 matmul, GFLOP/s):")
    for line in _roofline_lines(results):
        print("  " + line)
    for note in results["notes"]:
        print(f"note: {note}")
    return table


def write_markdown(path, results):
    lines = [f"# Training-step throughput ({results['machine']['date']})", ""]
    if results["note"]:
        lines += [f"**Note:** {results['note']}", ""]
    lines += [f"- {line}" for line in _header_lines(results)]
    lines += ["", markdown_table(_headers(results), _table_rows(results)), ""]
    lines += ["Roofline (best float32 matmul in the same run, GFLOP/s):", ""]
    lines += [f"- {line}" for line in _roofline_lines(results)]
    lines += [
        "",
        "`ms/step`: median over rounds of one full step (forward, backward, Adam); `IQR`: its "
        "interquartile range; `% peak`: the step's matmul FLOPs per second over the backend's best "
        "matmul rate; `GEMM ms`: the step's eleven matrix products alone, in the same library; "
        "`speed vs torch`: PyTorch's time over this row's time on the same device (above 1: faster than PyTorch); "
        "`same-round ratio`: the median (and interquartile range) over rounds of the same ratio taken within "
        "each round, where the two were timed one after the other, so that a slow spell of the machine "
        "weighs on both sides of each ratio."
        + (" `kernels/step`: the kernels the GPU ran per step (every library's), from PyTorch's profiler "
           "(CUPTI) over a few steps after the timing rounds." if _counted(results) else ""),
    ]
    lines += [f"\nNote: {n}" for n in results["notes"]]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path, results):
    """Examples/s against batch size, one line per implementation; returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    impls = list(dict.fromkeys(r["impl"] for r in results["rows"]))
    flops = results["flops_per_example"]
    for k, impl in enumerate(impls):
        rows = sorted((r for r in results["rows"] if r["impl"] == impl), key=lambda r: r["batch"])
        color = f"C{k}"
        ax.plot([r["batch"] for r in rows], [r["examples_per_s"] for r in rows], "o-", color=color, label=impl)
        bound = results["roofline"][impl]["peak_gflops"] * 1e9 / flops
        ax.axhline(bound, color=color, ls=":", lw=1, label=f"{impl} matmul roofline")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch"] for r in results["rows"]})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("training examples / s")
    title = "784-400-20 VAE training step, float32"
    ax.set_title(title + (f"\n({results['note']})" if results["note"] else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(args, results, table):
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        _log(f"wrote {args.json}")
    if args.no_save:
        return
    gpu = next((i["device"] for i in results["implementations"].values() if i.get("backend") == "cupy"), None)
    tag = args.tag or (slug(gpu) if gpu else "cpu")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = args.out_dir / f"throughput-{tag}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(base.with_suffix(".md"), results)
    written = [base.with_suffix(".json"), base.with_suffix(".md")]
    skipped = write_plot(base.with_suffix(".png"), results)
    if skipped:
        _log(f"note: {skipped}")
    else:
        written.append(base.with_suffix(".png"))
    _log("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    try:
        main()
    except WorkerError as exc:
        sys.exit(f"throughput.py: {exc}")
