#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU and CuPy, PyTorch, JAX, pytest and hypothesis
# (nothing is installed). Run from the checkout:
#
#     bash benchmarks/gpu_check.sh                        # results in $OUT, or ./gpu-check-out
#     STAGES="tests kernels" bash benchmarks/gpu_check.sh  # only these stages (versions always runs)
#
# Each stage has its own time limit, so one that hangs costs only its share, and the whole run a budget
# (BUDGET, 280 s): a stage gets at most what is left of it (less 10 s for the bundle), and one that would get
# under 15 s is skipped with a line saying so (rerun it with STAGES=...). So a run ends within five minutes, and
# a device call of ten holds two. The stages run in this order, the GPU's first. What comes back is two
# files: summary.txt (each stage's status and the tail of its output) and gpu-check.tar.gz (every log, JSON
# and Markdown file of the stages). Without a GPU the stages that need one say so and are skipped; the
# others run, so the script can be tried anywhere.
#
# Stages (limit in seconds):
#   versions    (20)  nvidia-smi, driver, CUDA, CuPy, PyTorch, JAX, NumPy, Python
#   tests      (100)  the cupy cases of the test suite, and tests/test_gpu.py (the gpu engine against the
#                     reference step for every likelihood, its noise against the Philox mirror, exact resume)
#   throughput (170)  ms per step at batch 32..2048: numpy (cpu engine), cupy reference and gpu engines,
#                     PyTorch CPU, CUDA eager and CUDA graph, JAX jit              [GPU]
#   epochs      (90)  10 default MNIST epochs through the trainer with the gpu engine, beside PyTorch CUDA [GPU]
#   kernels     (60)  kernels per step of the cupy engines and the PyTorch CUDA rows (PyTorch's profiler) [GPU]
#   threads     (90)  on the same host: the numpy cpu engine on 1, 4, 8 and 16 threads beside PyTorch CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
OUT="${OUT:-$PWD/gpu-check-out}"
STAGES="${STAGES:-tests throughput kernels epochs threads}"
work="$OUT/gpu-check"
mkdir -p "$work"
summary="$OUT/summary.txt"
: >"$summary"
PY="${PYTHON:-python3}"

BUDGET="${BUDGET:-280}"  # seconds for the whole run

stage() {  # stage NAME SECONDS COMMAND...: run with a limit (within the budget), log to $work/NAME.log, note the status
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - 10 - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "== $name: skipped, the run's budget of ${BUDGET} s is spent (rerun it: STAGES=$name)" >>"$summary"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
    local status=$?
    local why="ok"
    [ "$status" -eq 124 ] && why="timed out after ${limit} s"
    [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && why="exit status $status"
    {
        echo "== $name: $why ($((SECONDS - t0)) s): $*"
        tail -n 25 "$work/$name.log"
        echo
    } >>"$summary"
}

wanted() { [[ " $STAGES " == *" $1 "* ]]; }

gpu_why=$("$PY" -c "from scratchvae.backend import cupy_available; ok, why = cupy_available(); print('' if ok else why)" \
    2>&1) || gpu_why="scratchvae.backend.cupy_available() failed: $gpu_why"
gpu_stage() {  # gpu_stage NAME SECONDS COMMAND...: stage, or a line saying why it is skipped
    if ! wanted "$1"; then
        return
    fi
    if [ -n "$gpu_why" ]; then
        echo "== $1: skipped, it needs the cupy backend: $gpu_why" >>"$summary"
        return
    fi
    stage "$@"
}

stage versions 20 bash -c "nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
--format=csv; $PY -c '
import platform, numpy; print(\"python\", platform.python_version(), \"numpy\", numpy.__version__)
for name in (\"cupy\", \"torch\", \"jax\"):
    try:
        m = __import__(name); print(name, m.__version__)
    except Exception as exc:
        print(name, \"unavailable:\", exc)
try:
    import cupy; print(\"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion(), \"driver\", cupy.cuda.runtime.driverGetVersion())
    import torch; print(\"torch cuda\", torch.version.cuda, torch.cuda.is_available())
    import jax; print(\"jax devices\", jax.devices())
except Exception as exc:
    print(\"no GPU here:\", type(exc).__name__, exc)
'"

wanted tests && stage tests 100 "$PY" -m pytest -q -p no:cacheprovider tests -k "cupy or gpu"
gpu_stage throughput 170 "$PY" benchmarks/throughput.py --backends numpy,cupy --engines auto,reference,gpu \
    --batch-sizes 32,128,512,2048 --repeats 3 --min-time 0.15 --warmup 0.15 --roofline-time 0.03 \
    --out-dir "$work" --json "$work/throughput.json"
gpu_stage epochs 90 "$PY" benchmarks/epoch.py --backend cupy --engine gpu --epochs 10 --out-dir "$work" \
    --json "$work/epoch.json"
gpu_stage kernels 60 "$PY" benchmarks/throughput.py --backends cupy --engines reference,gpu --count-kernels \
    --jax off --batch-sizes 32,128,512,2048 --repeats 1 --min-time 0.05 --warmup 0.05 --roofline-time 0.01 \
    --no-save --json "$work/kernels.json"
wanted threads && stage threads 90 "$PY" benchmarks/throughput.py --backends numpy --threads 1,4,8,16 \
    --batch-sizes 128,2048 --repeats 3 --min-time 0.15 --warmup 0.15 --roofline-time 0.03 --tag cpu-threads \
    --out-dir "$work" --json "$work/threads.json"

tar -czf "$OUT/gpu-check.tar.gz" -C "$OUT" gpu-check && rm -rf "$work"
cat "$summary"
