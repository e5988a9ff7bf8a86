"""scratchvae: a variational autoencoder from scratch on NumPy (CPU) and CuPy (GPU).

Every forward pass has a hand-written backward pass next to it, every
gradient is checked against finite differences, and the only runtime
requirement is NumPy.

>>> import numpy as np, scratchvae as sv
>>> model = sv.VAE(784, hidden=(400,), latent_dim=20, seed=0)
>>> opt = sv.Adam(model, lr=1e-3)
>>> x = np.random.default_rng(0).random((128, 784), dtype=np.float32)
>>> out = model.loss_and_grad(x)   # negative ELBO per example; gradients in model.grads
>>> opt.step()

The same step, faster on the CPU (kept buffers, fused in-place passes, threads):

>>> with sv.make_engine("cpu", model, opt) as engine:
...     out = engine.step(x)
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Modules load on first use, so ``import scratchvae``
# (and the start of ``python -m scratchvae``) costs milliseconds; NumPy loads with the first model.
_WHERE = {
    "VAEEstimator": "estimator", "load": "estimator",
    "VAE": "model", "Autoencoder": "model", "Loss": "model",
    "LinearGaussianVAE": "exact",
    "iwae_loss_and_grad": "objectives",
    "iwae_bound": "evaluate",
    "load_mnist": "data", "DataError": "data",
    "Adam": "optim", "SGD": "optim",
    "make_engine": "engines",
    "gradcheck": "gradcheck", "gradcheck_model": "gradcheck", "GradcheckResult": "gradcheck",
    "BackendError": "backend", "get_xp": "backend", "get_array_module": "backend",
    "to_numpy": "backend", "to_device": "backend",
}  # fmt: skip

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'scratchvae' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
