r"""The reference PyTorch VAE the benchmarks compare scratchvae against.

The same model and loss as ``scratchvae.VAE(784, hidden=(400,), latent_dim=20)``
with its defaults (ReLU, Bernoulli likelihood from logits), written the way a
PyTorch user would write it, with autograd doing the backward pass:

.. math::
    [\mu, \log\sigma^2] = W_2\,\mathrm{relu}(W_1 x + b_1) + b_2, \qquad
    z = \mu + \exp(\tfrac12\log\sigma^2)\,\epsilon

    \text{logits} = W_4\,\mathrm{relu}(W_3 z + b_3) + b_4

    \text{loss} = \frac1B\sum_b\Big[\sum_d \mathrm{BCEWithLogits}(\text{logits}_{bd}, x_{bd})
        + \mathrm{KL}(N(\mu_b, \sigma_b^2)\,\|\,N(0, I))\Big]

``init`` names one of scratchvae's initialisation schemes (``"auto"``: He
normal for the two hidden layers, Glorot uniform for the two output layers,
zero biases; ``"he"``, ``"glorot"`` for every layer; ``"fan_in_uniform"``:
``nn.Linear``'s own default), so that losses after an epoch are comparable as
well as times. Imported only inside torch workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TorchVAE(nn.Module):
    INITS = ("auto", "he", "glorot", "fan_in_uniform")

    def __init__(self, input_dim=784, hidden=400, latent_dim=20, init="auto"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(self.INITS)}")
        self.latent_dim = latent_dim
        self.enc_hidden = nn.Linear(input_dim, hidden)
        self.enc_out = nn.Linear(hidden, 2 * latent_dim)  # [mu, log_var]
        self.dec_hidden = nn.Linear(latent_dim, hidden)
        self.dec_out = nn.Linear(hidden, input_dim)  # logits
        if init == "fan_in_uniform":  # W, b ~ U(+-1/sqrt(n_in)): what nn.Linear just drew
            return
        hidden_init, out_init = ("he", "glorot") if init == "auto" else (init, init)
        with torch.no_grad():
            for layer, scheme in ((self.enc_hidden, hidden_init), (self.enc_out, out_init),
                                  (self.dec_hidden, hidden_init), (self.dec_out, out_init)):  # fmt: skip
                if scheme == "he":
                    layer.weight.normal_(0.0, math.sqrt(2.0 / layer.in_features))
                else:
                    a = math.sqrt(6.0 / (layer.in_features + layer.out_features))
                    layer.weight.uniform_(-a, a)
                layer.bias.zero_()

    def loss_parts(self, x, generator=None):
        """Per-example ``(recon, kl)``, each ``(batch,)``, with one fresh ``eps`` from ``torch.randn``."""
        mu, log_var = self.enc_out(F.relu(self.enc_hidden(x))).chunk(2, dim=1)
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
        z = mu + torch.exp(0.5 * log_var) * eps
        logits = self.dec_out(F.relu(self.dec_hidden(z)))
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
        kl = -0.5 * (1.0 + log_var - mu * mu - log_var.exp()).sum(dim=1)
        return recon, kl

    def forward(self, x, generator=None):
        """The negative ELBO per example, averaged over the batch (a 0-d tensor)."""
        recon, kl = self.loss_parts(x, generator)
        return (recon + kl).mean()


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (inter-op left at PyTorch's default)."""
    torch.set_num_threads(int(n))


def torch_info(device: str) -> dict:
    """Version, threads, BLAS and the device name, for the results file."""
    info = {
        "torch": str(torch.__version__),  # a plain str: unpickling torch's own version class would import torch
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": device,
    }
    config = torch.__config__.show()
    info["blas"] = next((p.split("=", 1)[1] for p in config.replace(",", "\n").split() if p.startswith("BLAS_INFO=")), None)
    info["cpu_capability"] = next(
        (line.split(":", 1)[1].strip() for line in config.splitlines() if "CPU capability usage" in line), None
    )
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info
