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

from .backend import BackendError, get_array_module, get_xp, to_device, to_numpy
from .data import DataError, load_mnist
from .engines import make_engine
from .evaluate import iwae_bound
from .exact import LinearGaussianVAE
from .gradcheck import GradcheckResult, gradcheck, gradcheck_model
from .model import VAE, Autoencoder, Loss
from .objectives import iwae_loss_and_grad
from .optim import SGD, Adam

__version__ = "0.1.0"

__all__ = [
    "VAE",
    "Autoencoder",
    "Loss",
    "LinearGaussianVAE",
    "iwae_loss_and_grad",
    "iwae_bound",
    "load_mnist",
    "DataError",
    "Adam",
    "SGD",
    "make_engine",
    "gradcheck",
    "gradcheck_model",
    "GradcheckResult",
    "BackendError",
    "get_xp",
    "get_array_module",
    "to_numpy",
    "to_device",
]
