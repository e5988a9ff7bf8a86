#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU and CuPy, PyTorch, JAX, pytest and hypothesis
# (nothing is installed). Run from the checkout:
#
#     bash benchmarks/gpu_check.sh            # results in $OUT, or ./gpu-check-out
#
# Each stage has its own time limit, so one that hangs costs only its share: even if every stage ran to its
# limit, the run would end within nine minutes (one device call). What comes
# back is two files: summary.txt (each stage's status and the tail of its output) and gpu-check.tar.gz
# (every log, JSON and Markdown file of the stages).
#
# Stages:
#   versions    driver, CUDA, CuPy, PyTorch, JAX, NumPy
#   tests       the cupy cases of the test suite, and tests/test_gpu.py (the gpu engine against the
#               reference step, its noise against the Philox mirror, exact resume)
#   throughput  ms per step at batch 32..2048: numpy (cpu engine), cupy reference and gpu engines,
#               PyTorch CUDA eager and CUDA graph, JAX jit
#   epochs      10 default MNIST epochs through the trainer with the gpu engine, beside PyTorch CUDA
#   threads     on the same host: the numpy cpu engine on 1, 4, 8 and 16 threads beside PyTorch CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
OUT="${OUT:-$PWD/gpu-check-out}"
work="$OUT/gpu-check"
mkdir -p "$work"
summary="$OUT/summary.txt"
: >"$summary"
PY="${PYTHON:-python3}"

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $work/NAME.log, note the status
    local name=$1 limit=$2
    shift 2
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

have_gpu() {
    "$PY" -c "from scratchvae.backend import cupy_available; ok, why = cupy_available(); print(why); raise SystemExit(0 if ok else 1)"
}

stage versions 30 bash -c "nvidia-smi; $PY -c '
import platform, numpy; print(\"python\", platform.python_version(), \"numpy\", numpy.__version__)
for name in (\"cupy\", \"torch\", \"jax\"):
    try:
        m = __import__(name); print(name, m.__version__)
    except Exception as exc:
        print(name, \"unavailable:\", exc)
import cupy; print(\"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion(), \"driver\", cupy.cuda.runtime.driverGetVersion())
'"

if ! why=$(have_gpu); then
    echo "== no GPU stages: the cupy backend is unavailable here: $why" >>"$summary"
    echo "   (trying the CPU stages only, as on a machine without a GPU)" >>"$summary"
    stage throughput-cpu 240 "$PY" benchmarks/throughput.py --backends numpy --batch-sizes 32,128 --repeats 2 \
        --min-time 0.1 --warmup 0.1 --roofline-time 0.05 --no-save --json "$work/throughput-cpu.json"
else
    stage tests 120 "$PY" -m pytest -q -p no:cacheprovider tests -k "cupy or gpu"
    stage throughput 150 "$PY" benchmarks/throughput.py --backends numpy,cupy --engines auto,reference,gpu \
        --batch-sizes 32,128,512,2048 --repeats 5 --min-time 0.2 --warmup 0.2 --roofline-time 0.05 \
        --out-dir "$work" --json "$work/throughput.json"
    stage epochs 90 "$PY" benchmarks/epoch.py --backend cupy --engine gpu --epochs 10 --out-dir "$work" \
        --json "$work/epoch.json"
    stage threads 120 "$PY" benchmarks/throughput.py --backends numpy --threads 1,4,8,16 --batch-sizes 128,2048 \
        --repeats 3 --min-time 0.2 --warmup 0.2 --roofline-time 0.05 --tag cpu-threads --out-dir "$work" \
        --json "$work/threads.json"
fi

tar -czf "$OUT/gpu-check.tar.gz" -C "$OUT" gpu-check && rm -rf "$work"
cat "$summary"
