"""The benchmark scripts: throughput.py's FLOP count and ratios to PyTorch, epoch.py's peak memory of a worker."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def import_benchmark(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def throughput():
    return import_benchmark("throughput")


def _child_peak(queue):
    queue.put(import_benchmark("epoch")._max_rss_mib())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_a_spawned_workers_peak_memory_is_its_own():
    """ru_maxrss survives exec, so a worker spawned by a big parent would report the parent's peak."""
    big = np.ones(256 * 2**20 // 8)  # 256 MiB touched here
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_peak, args=(queue,))
    child.start()
    peak = queue.get(timeout=60)
    child.join(timeout=60)
    assert import_benchmark("epoch")._max_rss_mib() > 256
    assert peak < 200, peak  # a Python with numpy and the benchmark modules, far below the parent's 256 MiB
    del big


def test_step_flops_are_counted_from_the_layer_sizes(throughput):
    layers = [(784, 400), (400, 40), (20, 400), (400, 784)]
    per_layer = [2 * i * o for i, o in layers]
    # forward and weight gradients of every layer, input gradients of all but the first
    assert throughput.step_flops_per_example(layers) == 2 * sum(per_layer) + sum(per_layer[1:]) == 3_280_000


def assembled(throughput, steps, kernels=None):
    """What ``assemble`` makes of per-round step times (seconds), ``{(impl, batch): [...]}`` (and kernel counts)."""
    impls = sorted({impl for impl, _ in steps})
    args = SimpleNamespace(note="", batch_sizes=sorted({b for _, b in steps}), repeats=len(next(iter(steps.values()))),
                           min_time=0.5, warmup=0.5, roofline_time=0.2, threads=None, blas_threads=None)  # fmt: skip
    return throughput.assemble(
        args, machine={}, infos={i: {"device": "cpu"} for i in impls}, env_note={}, notes=[], flops=3_280_000,
        steps=steps, gemms={k: [0.002] * len(v) for k, v in steps.items()},
        roof={i: {"square 1024": [200.0]} for i in impls}, n_steps={k: 100 for k in steps}, threads=2, kernels=kernels,
    )  # fmt: skip


def results_of(throughput, ours_s, torch_s):
    """:func:`assembled` for one scratchvae worker and PyTorch at batch 128."""
    return assembled(throughput, {("scratchvae-numpy", 128): ours_s, ("torch-cpu", 128): torch_s})


def test_same_round_ratio_pairs_the_rounds_and_the_plain_ratio_compares_medians(throughput):
    # slow spells in rounds 2 and 5 hit both, in round 3 PyTorch alone: PyTorch's median is a slow round, ours not
    ours = [0.0040, 0.0060, 0.0040, 0.0040, 0.0060]
    torch = [0.0044, 0.0066, 0.0066, 0.0044, 0.0066]
    rows = {r["impl"]: r for r in results_of(throughput, ours, torch)["rows"]}
    row = rows["scratchvae-numpy"]
    assert row["speed_vs_torch"] == pytest.approx(0.0066 / 0.0040)
    same = row["speed_vs_torch_same_round"]
    assert same["median"] == pytest.approx(1.1) and same["n"] == 5
    assert (same["min"], same["max"]) == (pytest.approx(1.1), pytest.approx(0.0066 / 0.0040))
    assert rows["torch-cpu"]["speed_vs_torch_same_round"]["median"] == 1.0
    table = dict(zip(throughput.HEADERS, throughput._table_rows({"rows": [row]})[0]))
    assert table["speed vs torch"] == "1.65x" and table["same-round ratio (IQR)"] == "1.10x (1.10-1.10)"


def test_same_round_ratio_keeps_the_rounds_in_order(throughput):
    # one slow round each, in different rounds: paired, 0.55x and 2.2x; the times sorted first would give 1.1x throughout
    ours, torch = [0.004, 0.008, 0.004, 0.004, 0.004], [0.0088, 0.0044, 0.0044, 0.0044, 0.0044]
    same = results_of(throughput, ours, torch)["rows"][0]["speed_vs_torch_same_round"]
    assert (same["min"], same["median"], same["max"]) == (pytest.approx(0.55), pytest.approx(1.1), pytest.approx(2.2))


def test_without_pytorch_there_is_no_ratio(throughput):
    out = assembled(throughput, {("scratchvae-numpy", 32): [0.002, 0.003]})
    row = out["rows"][0]
    assert row["speed_vs_torch"] is None and row["speed_vs_torch_same_round"] is None
    assert throughput._table_rows(out)[0][-2:] == ["-", "-"]


def test_kernels_are_counted_per_step_from_the_profilers_kernel_events(throughput):
    trace = {"traceEvents": [
        *[{"cat": "kernel", "name": "bias_activation"}] * 8, *[{"cat": "kernel", "name": "sgemm_128x64"}] * 22,
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD"}, {"cat": "gpu_memset", "name": "Memset"},
        {"cat": "cuda_driver", "name": "cuLaunchKernel"}, {"cat": "cpu_op", "name": "aten::mm"}, {"ph": "M"},
    ]}  # fmt: skip
    counted = throughput.kernels_in_trace(trace, steps=2)
    assert counted["kernels_per_step"] == 15 and counted["copies_per_step"] == 1
    assert counted["top_kernels"] == [{"name": "sgemm_128x64", "per_step": 11},
                                      {"name": "bias_activation", "per_step": 4}]  # fmt: skip


def test_the_kernels_column_appears_only_where_kernels_were_counted(throughput):
    steps = {("scratchvae-cupy", 128): [0.001], ("torch-cuda", 128): [0.002]}
    out = assembled(throughput, steps)
    assert throughput._headers(out) == throughput.HEADERS
    assert len(throughput._table_rows(out)[0]) == len(throughput.HEADERS)
    counted = {("scratchvae-cupy", 128): {"kernels_per_step": 32.0, "copies_per_step": 0.0, "top_kernels": []}}
    out = assembled(throughput, steps, kernels=counted)
    rows = [dict(zip(throughput._headers(out), row)) for row in throughput._table_rows(out)]
    assert [r["kernels/step"] for r in rows] == ["32", "-"]


def test_kernels_are_asked_of_the_gpu_workers_only_and_a_failure_is_a_note(throughput):
    class Fake:
        def __init__(self, answer):
            self.answer, self.asked = answer, []

        def call(self, command, batch):
            self.asked.append((command, batch))
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

    counted = {"kernels_per_step": 32.0}
    died = throughput.WorkerError("worker torch-cuda-graph failed on 'kernels':\nboom")
    workers = {"scratchvae-numpy": Fake(counted), "scratchvae-cupy-gpu": Fake(counted), "jax-gpu": Fake(counted),
               "torch-cuda": Fake({"unavailable": "no"}), "torch-cuda-graph": Fake(died)}  # fmt: skip
    notes = []
    out = throughput.count_kernels(workers, SimpleNamespace(batch_sizes=[32, 128]), notes)
    assert out == {("scratchvae-cupy-gpu", 32): counted, ("scratchvae-cupy-gpu", 128): counted}
    assert workers["scratchvae-numpy"].asked == workers["jax-gpu"].asked == []
    assert workers["torch-cuda"].asked == [("kernels", 32)]  # one refusal is enough for that worker
    assert notes == ["jax-gpu: kernels not counted (JAX's own profiler is not wired in)",
                     "torch-cuda: kernels not counted: no", "torch-cuda-graph: kernels not counted: boom"]  # fmt: skip


def test_without_a_cuda_device_kernels_are_not_counted_and_say_why(throughput):
    pytest.importorskip("torch", reason="the count uses PyTorch's profiler")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the count runs in benchmarks/gpu_check.sh")
    counted = throughput._count_kernels(lambda: None, lambda: None)
    assert counted == {"unavailable": "this torch build sees no CUDA device"}


def test_the_gpu_check_script_is_valid_bash_and_its_benchmark_flags_parse():
    """GPU time is scarce: a typo in the device script's flags must fail here, not there."""
    import re
    import shlex
    import subprocess

    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    calls = re.findall(r'"\$PY" benchmarks/(throughput|epoch)\.py ([^\n]*)', text)
    assert {name for name, _ in calls} == {"throughput", "epoch"} and len(calls) == 4
    for name, flags in calls:
        argv = [a.replace("$work", "/tmp/w") for a in shlex.split(flags)]
        import_benchmark(name).parse_args(argv)  # exits (SystemExit) on an unknown flag or a bad value
