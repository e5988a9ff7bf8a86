"""The ``reference`` engine: the textbook training step, on any backend.

One step is the model's own loss and gradient, then the optimiser's own
update, exactly as :mod:`scratchvae.model`, :mod:`scratchvae.objectives` and
:mod:`scratchvae.optim` write them::

    loss = model.loss_and_grad(x, beta=beta)   # or iwae_loss_and_grad(model, x, k)
    optimizer.step()

Every other engine is tested against this one.
"""

from __future__ import annotations

from ..model import Autoencoder, Loss
from ..objectives import iwae_loss_and_grad
from ..validate import check_beta, check_objective


def check_engine_arguments(model, optimizer, objective, k):
    """``(objective, k, autoencoder)``: what every engine is built with, checked together."""
    if optimizer.params is not model.params:
        raise ValueError("optimizer must be built on model (its params are another buffer)")
    objective, k = check_objective(objective, k)
    autoencoder = isinstance(model, Autoencoder)
    if autoencoder and objective != "elbo":
        raise ValueError("an autoencoder trains on its squared error only: objective must be 'elbo'")
    return objective, k, autoencoder


def check_step_beta(beta, weighed: bool) -> float:
    """The KL weight of a step, checked; only the VAE's ELBO (``weighed``) takes one other than 1."""
    beta = check_beta(beta)
    if beta != 1.0 and not weighed:
        raise ValueError("beta weighs the KL term of the ELBO; this objective has none to weigh (use beta=1)")
    return beta


class ReferenceEngine:
    """Training steps of ``model`` with ``optimizer``: ``loss_and_grad``, then ``optimizer.step()``.

    ``objective`` and ``k`` as for :class:`~scratchvae.engines.cpu.CPUEngine`.
    Runs wherever the model's arrays live (NumPy or CuPy), on one thread.
    """

    name = "reference"
    threads = 1

    def __init__(self, model, optimizer, *, objective="elbo", k=1):
        self.objective, self.k, self.autoencoder = check_engine_arguments(model, optimizer, objective, k)
        self.model, self.optimizer = model, optimizer

    def step(self, x, beta=1.0, *, check_input=True) -> Loss:
        """Loss and gradient of the batch ``x``, then one optimiser update; returns the loss before the update.

        ``x`` is always checked (the checks are part of ``loss_and_grad``),
        whatever ``check_input`` says.
        """
        beta = check_step_beta(beta, weighed=not self.autoencoder and self.objective == "elbo")
        if self.autoencoder or self.objective == "iwae":
            loss = self.model.loss_and_grad(x) if self.autoencoder else iwae_loss_and_grad(self.model, x, self.k)
        else:
            loss = self.model.loss_and_grad(x, beta=beta)
        self.optimizer.step()
        return loss

    def close(self):
        """Nothing to release: the reference step keeps no threads or buffers."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
