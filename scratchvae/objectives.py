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

Like :meth:`VAE.loss_and_grad <scratchvae.model.VAE.loss_and_grad>`, this is
reference code: named forward steps, and the backward pass as ``d_<name>``
lines in reverse order; the engines of :mod:`scratchvae.engines` are checked
against it.
"""

from __future__ import annotations

import math

from . import losses as L
from .model import Loss
from .validate import check_eps, check_k


def iwae_loss_and_grad(model, x, k, eps=None) -> Loss:
    r"""The negative importance-weighted bound, the batch mean of its per-example values, and its gradient in ``model.grads``.

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

    The ``K`` samples of every example are stacked into ``(K * batch, ...)``
    rows, so the decoder runs once. With the noise fixed,

    .. math::
        \log q(z|x) = -\tfrac12\sum_j\big(\log 2\pi + \log\sigma_j^2 + \epsilon_j^2\big),\qquad
        \frac{\partial\log q}{\partial\mu_j} = 0,\quad
        \frac{\partial\log q}{\partial\log\sigma_j^2} = -\tfrac12

        \log p(z) = -\tfrac12\sum_j\big(\log 2\pi + z_j^2\big),\qquad
        \frac{\partial\log p(z)}{\partial z_j} = -z_j

    (:math:`z` reaches :math:`\log q` only through :math:`\epsilon`, which is fixed).
    """
    x = model.check_input(x)
    K = check_k(k)
    xp, B, J, c = model.xp, x.shape[0], model.latent_dim, model.log_var_bound
    shape = (K, B, J)
    eps = model.rng.normal(shape, model.dtype) if eps is None else check_eps(eps, shape, xp, model.dtype)
    # forward
    enc_out = model.encoder.forward(x)  # F1: (B, 2J)
    mu, h_log_var = enc_out[:, :J], enc_out[:, J:]  # F2: q(z|x) = N(mu, exp(log_var))
    log_var = L.bound_log_var(h_log_var, c)
    z, sigma = L.reparameterize(mu, log_var, eps)  # F3: z_k = mu + sigma * eps_k, (K, B, J)
    x_k = xp.tile(x, (K, 1))  # x once for each sample, (K B, D), in the order of z's rows
    dec_out = model.decoder.forward(z.reshape(K * B, J))  # F4: (K B, D or 2D)
    recon = model.reconstruction_nll(dec_out, x_k).reshape(K, B)  # F5: -log p(x|z_k)
    log_pz = L.log_standard_normal(z)  # F6: log p(z_k), (K, B)
    log_qz = L.log_q_reparameterized(log_var, eps)  # F7: log q(z_k|x), (K, B)
    log_w = -recon + log_pz - log_qz  # F8: (K, B)
    top = log_w.max(axis=0)  # F9: L_K = log (1/K) sum_k w_k, with exp never overflowing
    w = xp.exp(log_w - top)  # w_k / max_k w_k
    w_sum = w.sum(axis=0)
    bound = top + xp.log(w_sum) - math.log(K)  # (B,)
    loss = -bound.mean()  # F10
    w_norm = w / w_sum  # the self-normalised weights w~_k, summing to 1 over k
    recon_mean = (w_norm * recon).sum(axis=0).mean()
    kl_mean = (w_norm * (log_qz - log_pz)).sum(axis=0).mean()
    # backward, in reverse order
    model.grads[...] = 0
    d_bound = -1.0 / B  # B10: the same for every example
    d_log_w = d_bound * w_norm  # B9: d L_K / d log w_k = w~_k (a softmax)
    d_recon, d_log_pz, d_log_qz = -d_log_w, d_log_w, -d_log_w  # B8
    d_log_var = (d_log_qz[..., None] * xp.full_like(log_var, -0.5)).sum(axis=0)  # B7: d log q / d log_var_j = -1/2
    d_z = d_log_pz[..., None] * -z  # B6: d log p(z) / d z = -z
    d_dec_out = model.reconstruction_nll_backward(d_recon.reshape(K * B), dec_out, x_k)  # B5
    d_z += model.decoder.backward(d_dec_out).reshape(K, B, J)  # B4: z feeds the decoder and log p(z)
    d_mu_z, d_log_var_z = L.reparameterize_backward(d_z, eps, sigma)  # B3: (K, B, J) each
    d_mu = d_mu_z.sum(axis=0)  # mu and log_var are shared by the K samples
    d_log_var += d_log_var_z.sum(axis=0)
    d_h_log_var = L.bound_log_var_backward(d_log_var, log_var, c)  # B2
    d_enc_out = xp.concatenate([d_mu, d_h_log_var], axis=1)
    model.encoder.backward(d_enc_out)  # B1
    return Loss(loss, recon_mean, kl_mean)
