"""CUDA kernels run on the CPU: the gpu engine's kernel source compiled as C++ with a C++ compiler.

Each kernel of ``gpu_kernels.SOURCE`` is one thread's work and uses no shared
memory and no barriers, so running its threads one after another computes
what the GPU computes, up to rounding (the GPU contracts ``a * b + c`` into
fused multiply-adds; its ``tanh``, ``exp``, ... are CUDA's, not the C
library's). A small header stands in for CUDA's built-ins (``blockIdx``,
``threadIdx``, ``blockDim``, ``__umulhi``), and for every kernel a C function
``launch_<name>(grid, block, <its parameters>)`` loops over the grid's threads.
The result, :func:`cpu_kernels`, is called as CuPy calls a kernel:
``kernel((grid,), (block,), args)``. So the tests check the kernels' own
source (their indexing, their formulas, the Philox generator) against the
reference step without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from scratchvae.engines.gpu_kernels import ELEMENT_TYPES, SOURCE

CUDA_BUILTINS = r"""
#include <math.h>
#define __global__
#define __device__
struct Dim3 { unsigned int x, y, z; };
static Dim3 blockIdx, blockDim, threadIdx;
static inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}
"""

SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def kernel_signatures(source=SOURCE) -> dict:
    """``{name: [(type, parameter name), ...]}`` of every kernel in ``source``."""
    out = {}
    for name, params in SIGNATURE.findall(source):
        out[name] = [tuple(p.strip().rsplit(" ", 1)) for p in params.split(",")]
    return out


def launchers(source=SOURCE) -> str:
    """A C function per kernel that runs its ``grid * block`` threads one after another."""
    lines = []
    for name, params in kernel_signatures(source).items():
        args = ", ".join(f"{t} {p}" for t, p in params)
        names = ", ".join(p for _, p in params)
        lines += [
            f'extern "C" void launch_{name}(unsigned int grid, unsigned int block, {args}) {{',
            "    blockDim.x = block;",
            "    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x)",
            f"        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x) {name}({names});",
            "}",
        ]
    return "\n".join(lines)


def compiler():
    """The C++ compiler, or None."""
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@functools.cache
def _library(dtype: str):
    real = ELEMENT_TYPES[dtype]
    folder = Path(tempfile.mkdtemp(prefix="scratchvae-cuda-on-cpu-"))
    (folder / "kernels.cpp").write_text(CUDA_BUILTINS + SOURCE + "\n" + launchers())
    library = folder / "kernels.so"
    proc = subprocess.run([compiler(), "-O1", "-shared", "-fPIC", f"-DSCRATCHVAE_REAL={real}", "-o", str(library),
                           str(folder / "kernels.cpp")], capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"the kernels do not compile as C++:\n{proc.stderr}")
    return ctypes.CDLL(str(library)), ctypes.c_float if real == "float" else ctypes.c_double


def _c_argument(ctype_of_real, type_name, value):
    """``value`` as the C parameter ``type_name``; a pointer to an array's data (NumPy's scalars, such as a sum,
    stand for 0-d arrays, as CuPy's sums are: read-only, so ``const`` parameters only)."""
    if type_name.endswith("*"):
        if isinstance(value, np.generic) and type_name.startswith("const "):
            value = np.array(value)
        assert isinstance(value, np.ndarray) and value.flags.c_contiguous, type_name
        return ctypes.c_void_p(value.ctypes.data), value
    return {"int": ctypes.c_int, "long long": ctypes.c_longlong, "unsigned int": ctypes.c_uint,
            "real": ctype_of_real}[type_name](value), value  # fmt: skip


def cpu_kernels(dtype) -> dict:
    """Every kernel of the source, compiled for the CPU in ``dtype``, as ``{name: kernel(grid, block, args)}``."""
    library, real = _library(np.dtype(dtype).name)

    def kernel(name, params):
        launch, types = getattr(library, f"launch_{name}"), [t for t, _ in params]

        def run(grid, block, args):
            assert len(args) == len(types), (name, len(args), types)
            converted = [_c_argument(real, t, a) for t, a in zip(types, args)]  # (keeps the arrays alive for the call)
            launch(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *(c for c, _ in converted))

        return run

    return {name: kernel(name, params) for name, params in kernel_signatures().items()}
