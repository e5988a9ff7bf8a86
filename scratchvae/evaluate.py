r"""Importance-weighted estimate of the log-likelihood :math:`\log p(x)` (the number papers report).

With :math:`K` samples :math:`z_k \sim q(z|x)`,

.. math::
    \log p(x) \;\ge\; \mathcal L_K(x) = \mathbb E\Big[\log \frac1K \sum_{k=1}^K w_k\Big],
    \qquad w_k = \frac{p(x|z_k)\,p(z_k)}{q(z_k|x)}

(Burda, Grosse & Salakhutdinov, 2015). :math:`\mathcal L_1` is the ELBO,
:math:`\mathcal L_K` rises with :math:`K` and tends to :math:`\log p(x)`. The sum
is formed in log space, a chunk of samples at a time, with a running
log-sum-exp, so :math:`K = 5000` fits in memory and never overflows.
"""

from __future__ import annotations

import math
import operator

from . import losses as L


def check_positive_int(value, name: str) -> int:
    """``value`` as an int, checked to be a positive integer (``2.5``, ``True``, ``0`` are refused)."""
    try:
        out = operator.index(value)
    except TypeError:
        out = 0
    if isinstance(value, bool) or out < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return out


def check_k(k) -> int:
    """The number of importance samples ``k``, checked by :func:`check_positive_int`."""
    return check_positive_int(k, "k")


def log_weights(model, x, eps):
    r"""Log importance weights :math:`\log w_k = \log p(x|z_k) + \log p(z_k) - \log q(z_k|x)`.

    Parameters
    ----------
    model : VAE-like
        Needs ``_encode(x) -> (mu, log_var)`` and ``log_px_given_z(z, x)``.
    x : array ``(batch, D)`` on the model's device and in its dtype
    eps : array ``(k, batch, J)``
        Standard normal noise; :math:`z_k = \mu + \sigma\epsilon_k`.

    Returns
    -------
    array ``(k, batch)``
    """
    mu, log_var = model._encode(x)
    z, _ = L.reparameterize(mu, log_var, eps)
    log_q = L.log_q_reparameterized(log_var, eps)
    return model.log_px_given_z(z, x) + L.log_standard_normal(z) - log_q


def iwae_bound(model, x, k=5000, *, rng=None, max_elements=1 << 23):
    r"""Per-example importance-weighted bound :math:`\mathcal L_K(x)` in nats, ``(batch,)``, float64.

    Parameters
    ----------
    model : VAE-like
    x : array ``(batch, D)``, float, checked like :meth:`VAE.loss_and_grad`
    k : int
        Number of importance samples :math:`K \ge 1`.
    rng : scratchvae.backend.Generator, optional
        Source of the noise (the model's own generator by default).
    max_elements : int
        Bound on the decoder outputs held at once (``chunk * batch * D``).
    """
    k = check_k(k)
    x = model.check_input(x, bounded=getattr(model, "likelihood", None) == "bernoulli")
    xp = model.xp
    rng = model.rng if rng is None else rng
    B, J, D = x.shape[0], model.latent_dim, model.input_dim
    chunk = max(1, min(k, max_elements // max(1, B * D)))
    acc = xp.full((B,), -xp.inf, dtype="float64")  # running log sum_k w_k
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        lw = log_weights(model, x, rng.normal((n, B, J), model.dtype)).astype("float64")
        top = lw.max(axis=0)
        lse = top + xp.log(xp.exp(lw - top).sum(axis=0))
        acc = xp.logaddexp(acc, lse)
    return acc - math.log(k)
