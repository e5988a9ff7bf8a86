r"""Evaluating a trained VAE: the test ELBO, and the importance-weighted estimate of :math:`\log p(x)`.

With :math:`K` samples :math:`z_k \sim q(z|x)`,

.. math::
    \log p(x) \;\ge\; \mathcal L_K(x) = \mathbb E\Big[\log \frac1K \sum_{k=1}^K w_k\Big],
    \qquad w_k = \frac{p(x|z_k)\,p(z_k)}{q(z_k|x)}

(Burda, Grosse & Salakhutdinov, 2015). :math:`\mathcal L_1` is the ELBO,
:math:`\mathcal L_K` rises with :math:`K` and tends to :math:`\log p(x)`: the
number papers report, as a negative log-likelihood in nats. The sum is formed
in log space, a chunk of samples at a time, with a running log-sum-exp, so
:math:`K = 5000` fits in memory and never overflows.

:func:`evaluate_elbo` and :func:`evaluate_nll` run these over a whole data set
(``uint8`` grey levels or floats), a batch at a time, with noise and binarization drawn from
generator streams of their own, so that the same model gives the same numbers
whenever it is evaluated.
"""

from __future__ import annotations

import math

import numpy as np

from . import losses as L
from .backend import to_numpy
from .data import float_batches
from .rng import STREAM_EVAL_DATA, STREAM_EVAL_ELBO, STREAM_EVAL_IWAE, Generator
from .validate import check_k, check_positive_int


def log_weights(model, x, eps, posterior=None):
    r"""Log importance weights :math:`\log w_k = \log p(x|z_k) + \log p(z_k) - \log q(z_k|x)`.

    Parameters
    ----------
    model : VAE
    x : array ``(batch, D)``
    eps : array ``(k, batch, J)``
        Standard normal noise; :math:`z_k = \mu + \sigma\epsilon_k`.
    posterior : ``(mu, log_var)``, optional
        ``model.encode(x)``, when the caller has it already (one chunk of
        samples after another encodes ``x`` once).

    Returns
    -------
    array ``(k, batch)``
    """
    mu, log_var = model.encode(x) if posterior is None else posterior
    z, _ = L.reparameterize(mu, log_var, eps)
    log_q = L.log_q_reparameterized(log_var, eps)
    return model.log_px_given_z(z, x) + L.log_standard_normal(z) - log_q


def iwae_bound(model, x, k=5000, *, rng=None, max_elements=1 << 23):
    r"""Per-example importance-weighted bound :math:`\mathcal L_K(x)` in nats, ``(batch,)``, float64.

    Parameters
    ----------
    model : VAE
    x : array ``(batch, D)``, float, checked like :meth:`VAE.loss_and_grad`
    k : int
        Number of importance samples :math:`K \ge 1`.
    rng : scratchvae.rng.Generator, optional
        Source of the noise (the model's own generator by default).
    max_elements : int
        Bound on the elements of the largest array a chunk of samples makes,
        ``chunk * batch * width`` with ``width`` the widest layer of the
        decoder (its input, hidden or output size). With
        ``batch * width > max_elements`` a chunk is one sample, which is
        more than ``max_elements``.
    """
    k = check_k(k)
    max_elements = check_positive_int(max_elements, "max_elements")
    x = model.check_input(x)
    xp = model.xp
    rng = model.rng if rng is None else rng
    B, J = x.shape[0], model.latent_dim
    chunk = max(1, min(k, max_elements // (B * max(model.decoder.sizes))))
    posterior = model.encode(x)  # the same q(z|x) for every chunk of samples
    acc = xp.full((B,), -xp.inf, dtype="float64")  # running log sum_k w_k
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        lw = log_weights(model, x, rng.normal((n, B, J), model.dtype), posterior).astype("float64")
        top = lw.max(axis=0)
        lse = top + xp.log(xp.exp(lw - top).sum(axis=0))
        acc = xp.logaddexp(acc, lse)
    return acc - math.log(k)


def evaluate_elbo(model, images, binarize, seed, batch_size=1000):
    """Per-example means of the negative ELBO and its parts over a data set (one noise sample each).

    Parameters
    ----------
    model : VAE
    images : array ``(N, input_dim)``
        ``uint8`` grey levels or floats, converted a batch at a time (:func:`scratchvae.data.rows_to_float`).
    binarize : {"none", "dynamic", "static"}
    seed : int
        Seeds the dynamic binarization and the noise, from two streams of
        their own, so the number is the same whenever it is computed and
        every evaluation binarizes the same way.

    Returns
    -------
    dict
        ``{"loss", "recon", "kl"}`` in nats per example (``loss = recon + kl``).
    """
    rng_data = Generator(seed, np, stream=STREAM_EVAL_DATA)
    rng_eps = Generator(seed, model.xp, stream=STREAM_EVAL_ELBO)
    n, loss_sum, recon_sum, kl_sum = 0, 0.0, 0.0, 0.0
    for xb in float_batches(images, binarize, rng_data, batch_size, model.dtype, model.xp):
        recon, kl = model.loss_parts(xb, rng_eps.normal((xb.shape[0], model.latent_dim), model.dtype))
        b, r, k = xb.shape[0], float(recon.mean()), float(kl.mean())
        n, loss_sum, recon_sum, kl_sum = n + b, loss_sum + b * (r + k), recon_sum + b * r, kl_sum + b * k
    return {"loss": loss_sum / n, "recon": recon_sum / n, "kl": kl_sum / n}


def evaluate_nll(model, images, binarize, seed, k=5000, batch_size=100, progress=None):
    r"""Test negative log-likelihood in nats, :math:`-\frac1N\sum_n \mathcal L_K(x_n)` (the IWAE bound).

    ``progress(done, total)`` is called after each batch when given. The
    binarization and noise come from streams of their own (see
    :func:`evaluate_elbo`). Returns ``(mean, standard_error)`` over the
    examples.
    """
    rng_data = Generator(seed, np, stream=STREAM_EVAL_DATA)
    rng_eps = Generator(seed, model.xp, stream=STREAM_EVAL_IWAE)
    values = []
    n = len(images)
    for i, xb in enumerate(float_batches(images, binarize, rng_data, batch_size, model.dtype, model.xp)):
        values.append(to_numpy(iwae_bound(model, xb, k, rng=rng_eps)))
        if progress:
            progress(min((i + 1) * batch_size, n), n)
    v = -np.concatenate(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
