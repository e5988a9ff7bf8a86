r"""The importance-weighted training objective (IWAE) and its hand-written gradient.

Burda, Grosse & Salakhutdinov (2015) train on the bound that
:mod:`scratchvae.evaluate` reports. For one example ``x`` and ``K`` samples:

.. math::
    z_k = \mu + \sigma\,\epsilon_k,\qquad \epsilon_k \sim N(0, I),\qquad k = 1, \dots, K

    \log w_k = \log p(x|z_k) + \log p(z_k) - \log q(z_k|x)

    \mathcal L_K(x) = \log \frac1K \sum_{k=1}^K w_k

With the noise fixed, :math:`\partial\mathcal L_K / \partial\log w_k = \tilde w_k`
(the derivative of a log-sum-exp is a softmax), so the gradient is the
self-normalised-weight average of the per-sample gradients:

.. math::
    \nabla_\theta\,\mathcal L_K = \sum_k \tilde w_k\,\nabla_\theta \log w_k,
    \qquad \tilde w_k = \frac{w_k}{\sum_{k'} w_{k'}}

With :math:`K = 1`, :math:`\tilde w_1 = 1` and :math:`\mathcal L_1 = \log w_1` is
the single-sample ELBO estimate with a Monte Carlo KL,
:math:`\log p(x|z) - (\log q(z|x) - \log p(z))`. Its expectation over
:math:`\epsilon` is the ELBO that :meth:`VAE.loss_and_grad
<scratchvae.model.VAE.loss_and_grad>` estimates with the analytic KL; the two
agree in expectation (value and gradient), not draw by draw.
"""

from __future__ import annotations

import math

from . import losses as L
from .backend import to_device
from .evaluate import check_k
from .model import Loss


def iwae_loss_and_grad(model, x, k, eps=None) -> Loss:
    r"""Negative importance-weighted bound per example and its gradient in ``model.grads``.

    .. math::
        \text{loss} = -\frac1B\sum_b \mathcal L_K(x_b)
                    = -\frac1B\sum_b \log\frac1K\sum_k w_{kb},
        \qquad \log w_{kb} = \log p(x_b|z_{kb}) + \log p(z_{kb}) - \log q(z_{kb}|x_b)

    Parameters
    ----------
    model : VAE
        Any likelihood; its log-variance bound (``log_var_bound``) applies
        as in :meth:`VAE.loss_and_grad <scratchvae.model.VAE.loss_and_grad>`.
    x : array ``(batch, input_dim)``, float, finite (in ``[0, 1]`` for Bernoulli)
    k : int
        Number of importance samples :math:`K \ge 1` per example.
    eps : array ``(k, batch, latent_dim)``, optional
        Reparameterization noise, :math:`z_{kb} = \mu_b + \sigma_b\epsilon_{kb}`;
        drawn from ``model.rng`` when omitted. Pass it to make the call
        deterministic.

    Returns
    -------
    Loss
        ``loss`` as above. ``recon`` and ``kl`` are the self-normalised-weighted
        means of the two parts of :math:`-\log w`:
        ``recon`` :math:`= \frac1B\sum_b\sum_k \tilde w_{kb}\,(-\log p(x_b|z_{kb}))`,
        ``kl`` :math:`= \frac1B\sum_b\sum_k \tilde w_{kb}\,(\log q(z_{kb}|x_b) - \log p(z_{kb}))`.
        With :math:`K = 1` they are the one-sample reconstruction term and
        Monte Carlo KL and ``recon + kl == loss``; for :math:`K > 1`,
        ``recon + kl = loss - (log K - H(w~))`` :math:`\le` ``loss``, where
        :math:`H(\tilde w)` is the entropy of the normalised weights. All are
        0-d arrays on the model's device. ``model.grads`` holds
        :math:`\partial\,\text{loss}/\partial\,\text{params}` on return.
    """
    x = model.check_input(x, bounded=model.likelihood == "bernoulli")
    k = check_k(k)
    if eps is not None:
        eps = to_device(eps, model.xp, dtype=model.dtype)
        shape = (k, x.shape[0], model.latent_dim)
        if eps.shape != shape:
            raise ValueError(f"eps must have shape {shape}, got {tuple(eps.shape)}")
    return _iwae_loss_and_grad(model, x, k, eps)


def _iwae_loss_and_grad(model, x, k, eps=None, n_total=None) -> Loss:
    r""":func:`iwae_loss_and_grad` without input checks (``x`` on the model's device, in its dtype).

    ``n_total`` is the batch size the sums over examples are divided by, as
    in :meth:`VAE._loss_and_grad <scratchvae.model.VAE._loss_and_grad>`.

    The ``K`` samples of every example are stacked into ``(K * batch, ...)``
    rows, so the decoder runs once per step. With the noise fixed,

    .. math::
        \log q(z|x) = -\tfrac12\sum_j\big(\log 2\pi + \log\sigma_j^2 + \epsilon_j^2\big),\qquad
        \frac{\partial\log q}{\partial\mu_j} = 0,\quad
        \frac{\partial\log q}{\partial\log\sigma_j^2} = -\tfrac12

        \log p(z) = -\tfrac12\sum_j\big(\log 2\pi + z_j^2\big),\qquad
        \frac{\partial\log p(z)}{\partial z_j} = -z_j

    (:math:`z` reaches :math:`\log q` only through :math:`\epsilon`, which is fixed).
    """
    xp, work, c = model.xp, model._work, model.log_var_bound
    K, (B, D), J = k, x.shape, model.latent_dim
    n = B if n_total is None else n_total
    # forward
    mu, log_var = model._encode(x, work=work)  # (B, J) each; log_var = c tanh(h / c)
    if eps is None:
        eps = model.rng.normal((K, B, J), model.dtype)
    z, sigma = L.reparameterize(mu, log_var, eps)  # (K, B, J); sigma (B, J)
    dec_out = model.decoder.forward(z.reshape(K * B, J), work=work)  # (K B, D or 2D)
    x_k = work.get("x_k", (K * B, D), x.dtype)  # x repeated for each of the K samples
    x_k.reshape(K, B, D)[...] = x
    recon, d_dec_out = model._recon_nll_and_grad(dec_out, x_k, work)  # -log p(x|z_k), d recon / d dec_out
    recon = recon.reshape(K, B)
    log_pz = L.log_standard_normal(z)  # (K, B)
    log_qz = L.log_q_reparameterized(log_var, eps)  # (K, B)
    log_w = -recon + log_pz - log_qz  # (K, B)
    top = log_w.max(axis=0)  # (B,), so that exp never overflows
    w_shift = xp.exp(log_w - top)  # w_k / max_k w_k
    w_sum = w_shift.sum(axis=0)  # (B,)
    w_norm = w_shift / w_sum  # (K, B), the self-normalised weights w~_k, summing to 1 over k
    bound = top + xp.log(w_sum) - math.log(K)  # (B,), L_K(x_b)
    loss = -bound.sum() / n
    recon_mean = (w_norm * recon).sum(axis=0).sum() / n
    kl_mean = (w_norm * (log_qz - log_pz)).sum(axis=0).sum() / n
    # backward (reverse order); d loss / d L_K(x_b) = -1/n and d L_K / d log w_k = w~_k
    d_log_w = w_norm * (-1.0 / n)  # (K, B)
    d_log_qz = -d_log_w
    d_log_pz = d_log_w
    d_recon = -d_log_w
    d_dec_out *= d_recon.reshape(K * B, 1)
    d_z = model.decoder.backward(d_dec_out, work=work).reshape(K, B, J)
    d_z += d_log_pz[..., None] * (-z)  # z feeds the decoder and log p(z): gradients add
    d_mu, d_log_var = L.reparameterize_backward(d_z, eps, sigma)  # (K, B, J) each
    d_log_var += d_log_qz[..., None] * (-0.5)  # log_var feeds z and log q(z|x)
    d_enc_out = work.get("d_enc_out", (B, 2 * J), mu.dtype)
    d_enc_out[:, :J] = d_mu.sum(axis=0)  # mu and sigma are shared by the K samples: sum over k
    d_enc_out[:, J:] = L.bound_log_var_backward(d_log_var.sum(axis=0), log_var, c)
    model.encoder.backward(d_enc_out, need_input_grad=False, work=work)
    return Loss(loss, recon_mean, kl_mean)
