"""Engines: ways to run a training step, every one checked against the reference step.

An engine is built with a model and an optimiser and runs training steps::

    engine = make_engine("cpu", model, optimizer)       # objective="elbo", k=1, threads=None
    loss = engine.step(x, beta=1.0)                     # loss and gradient of the batch, then one update
    engine.close()                                      # or: with make_engine(...) as engine: ...

After a step, ``model.grads`` holds the gradient of the batch's loss and
``model.params`` the updated parameters, as after ``model.loss_and_grad(x)``
and ``optimizer.step()``. The engines:

=============  ==========================================================================
``reference``  :mod:`~scratchvae.engines.reference`: ``loss_and_grad`` then
               ``optimizer.step()``, the textbook code, on NumPy or CuPy
``cpu``        :mod:`~scratchvae.engines.cpu`: NumPy only; kept buffers, fused in-place
               passes (:mod:`~scratchvae.engines.fused`), the batch split over threads
               by rows, BLAS held to one thread per thread
               (:mod:`~scratchvae.engines.blas`)
``gpu``        :mod:`~scratchvae.engines.gpu`: CuPy only; kept buffers and fused CUDA
               kernels (:mod:`~scratchvae.engines.gpu_kernels`), counter-based noise;
               opt-in until a GPU run has checked it against the reference
``auto``       ``cpu`` on NumPy, ``reference`` on CuPy
=============  ==========================================================================

``tests/test_engines.py`` runs every engine against the reference: the same
loss, gradient and parameters after several steps, to rounding.
"""

from __future__ import annotations

import numpy as np

from .cpu import CPUEngine
from .gpu import GPUEngine
from .reference import ReferenceEngine

ENGINES = ("auto", "reference", "cpu", "gpu")


def engine_name(name, model) -> str:
    """The engine ``name`` stands for with ``model``: ``"auto"`` is ``"cpu"`` on NumPy and ``"reference"`` on CuPy."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "auto":
        return "cpu" if model.xp is np else "reference"
    return name


def make_engine(name, model, optimizer, *, objective="elbo", k=1, threads=None):
    """The engine ``name`` for ``model`` and ``optimizer`` (built on the model).

    Parameters
    ----------
    name : {"auto", "reference", "cpu", "gpu"}
    model : VAE or Autoencoder
    optimizer : Adam or SGD
    objective : {"elbo", "iwae"}
        The negative ELBO (analytic KL, weighted by each step's ``beta``;
        an autoencoder's squared error), or the IWAE bound with ``k`` samples.
    k : int
        Importance samples of ``objective="iwae"``.
    threads : int, optional
        Threads of the ``cpu`` engine (default: one per CPU, at most 8); the
        ``reference`` engine runs on one.
    """
    if engine_name(name, model) == "cpu":
        return CPUEngine(model, optimizer, objective=objective, k=k, threads=threads)
    if name == "gpu":
        return GPUEngine(model, optimizer, objective=objective, k=k, threads=threads)
    if threads not in (None, 1):
        raise ValueError(f"threads (here {threads!r}) apply to engine 'cpu'; engine 'reference' runs on one thread")
    return ReferenceEngine(model, optimizer, objective=objective, k=k)


__all__ = ["ENGINES", "engine_name", "make_engine", "CPUEngine", "GPUEngine", "ReferenceEngine"]
