r"""Log-likelihoods, the analytic KL, the reparameterization trick, entropy.

Every function here works on batches: inputs have shape ``(batch, dim)`` and a
per-example quantity has shape ``(batch,)`` (summed over ``dim``). Each
forward function is followed by its ``*_backward(d_out, *saved)``: first the
gradient ``d_<output>`` of a scalar loss with respect to the forward's output
(for a per-example output, an array ``(batch,)`` or a scalar that applies to
every row), then what the forward saw or returned; it returns the gradients
with respect to the inputs, in the order the docstring names.

The VAE objective these pieces build (for one example ``x``):

.. math::
    \log p(x) = \mathrm{ELBO} + \mathrm{KL}(q(z|x)\,\|\,p(z|x)) \ge \mathrm{ELBO}

    \mathrm{ELBO} = \mathbb{E}_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z))

with :math:`q(z|x) = N(\mu, \sigma^2)`, ``log_var`` :math:`= \log\sigma^2`,
:math:`p(z) = N(0, I)` and

.. math:: -\mathrm{KL}(q\,\|\,p(z)) = \tfrac12 \sum_j (1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2).
"""

from __future__ import annotations

import math

from .backend import get_array_module
from .layers import sigmoid, softplus

LOG_2PI = math.log(2.0 * math.pi)


def _scalar_or_array(a):
    """A 0-d or scalar ``a`` as a Python float (weakly typed: it never promotes float32 data), else ``a``."""
    return float(a) if getattr(a, "ndim", 0) == 0 else a


def _exp(a, xp):
    """``exp(a)`` for an array or a Python scalar (a scalar stays a weakly typed Python float)."""
    return math.exp(a) if isinstance(a, (int, float)) else xp.exp(a)


def _rows(d, like):
    """Broadcast an upstream per-example gradient (scalar or ``(batch,)``) against ``(batch, dim)``."""
    xp = get_array_module(like)
    d = xp.asarray(d, dtype=like.dtype)
    return d[:, None] if d.ndim == 1 else d


# --------------------------------------------------------------------------------------
# Bernoulli likelihood, from logits.
# --------------------------------------------------------------------------------------


def bernoulli_nll(logits, x):
    r"""Negative Bernoulli log-likelihood from logits, summed over dimensions.

    .. math::
        -\log p(x|l) = \sum_d \big[\operatorname{softplus}(l_d) - x_d\, l_d\big]

    which equals the cross-entropy :math:`-x\log\sigma(l) - (1-x)\log(1-\sigma(l))`
    without ever forming :math:`\log\sigma`. Targets ``x`` may be grey levels
    in ``[0, 1]`` (then it is the cross-entropy of a continuous target).

    Shapes: ``logits, x (batch, dim)`` -> ``(batch,)``.
    """
    return (softplus(logits) - x * logits).sum(axis=-1)


def bernoulli_nll_backward(d_nll, logits, x):
    r"""Gradient of :func:`bernoulli_nll` with respect to the logits.

    .. math:: \frac{\partial L}{\partial l_d} = \frac{\partial L}{\partial \mathrm{nll}}\,(\sigma(l_d) - x_d)

    ``d_nll`` is a scalar or ``(batch,)``; returns ``d_logits (batch, dim)``.
    """
    return _rows(d_nll, logits) * (sigmoid(logits) - x)


# --------------------------------------------------------------------------------------
# Gaussian likelihood, fixed or learned variance.
# --------------------------------------------------------------------------------------


def gaussian_nll(mean, x, log_var):
    r"""Negative Gaussian log-likelihood :math:`-\log N(x; m, \sigma^2)`, summed over dimensions.

    .. math::
        -\log p(x|m, \sigma^2) = \tfrac12 \sum_d \Big[\log 2\pi + \log\sigma_d^2
            + \frac{(x_d - m_d)^2}{\sigma_d^2}\Big]

    With a fixed scalar ``log_var`` this is the autoencoder's squared error
    :math:`(x - \hat x)^2 / 2\sigma^2` plus a constant.

    Shapes: ``mean, x (batch, dim)``; ``log_var`` a scalar (fixed variance) or
    ``(batch, dim)`` (learned per-pixel log-variance) -> ``(batch,)``.
    """
    xp = get_array_module(mean, x)
    log_var = _scalar_or_array(log_var)
    diff = x - mean
    per_dim = LOG_2PI + log_var + diff * diff * _exp(-log_var, xp)
    per_dim = xp.broadcast_to(per_dim, diff.shape)
    return 0.5 * per_dim.sum(axis=-1)


def gaussian_nll_backward(d_nll, mean, x, log_var):
    r"""Gradients of :func:`gaussian_nll` with respect to ``mean`` and ``log_var``.

    .. math::
        \frac{\partial\,\mathrm{nll}}{\partial m_d} = \frac{m_d - x_d}{\sigma_d^2}, \qquad
        \frac{\partial\,\mathrm{nll}}{\partial \log\sigma_d^2} = \tfrac12\Big(1 - \frac{(x_d - m_d)^2}{\sigma_d^2}\Big)

    Returns ``(d_mean, d_log_var)``, both ``(batch, dim)`` (``d_log_var`` is
    meaningful when ``log_var`` is learned; a fixed scalar simply ignores it).
    """
    xp = get_array_module(mean, x)
    log_var = _scalar_or_array(log_var)
    d = _rows(d_nll, mean)
    inv_var = _exp(-log_var, xp)
    diff = mean - x
    d_mean = d * diff * inv_var
    d_log_var = d * 0.5 * (1.0 - diff * diff * inv_var)
    return d_mean, d_log_var


def log_normal(x, mean, log_var):
    r"""Diagonal Gaussian log-density :math:`\log N(x; \mu, \mathrm{diag}\,\sigma^2)`, summed over the last axis.

    .. math:: \log N(x;\mu,\sigma^2) = -\tfrac12\sum_j\Big[\log 2\pi + \log\sigma_j^2 + \frac{(x_j-\mu_j)^2}{\sigma_j^2}\Big]

    Broadcasts like its arguments; reduces the last axis.
    """
    return -gaussian_nll(mean, x, log_var)


def log_standard_normal(z):
    r""":math:`\log N(z; 0, I) = -\tfrac12\sum_j (\log 2\pi + z_j^2)`, over the last axis."""
    return -0.5 * (LOG_2PI + z * z).sum(axis=-1)


def log_q_reparameterized(log_var, eps):
    r""":math:`\log q(z|x) = \log N(z; \mu, \sigma^2)` at a reparameterized sample :math:`z = \mu + \sigma\epsilon`.

    .. math:: \log q(z|x) = -\tfrac12\sum_j\big(\log 2\pi + \log\sigma_j^2 + \epsilon_j^2\big)

    Written with :math:`\epsilon = (z - \mu)/\sigma` it needs no division and
    does not depend on :math:`\mu`; with :math:`\epsilon` fixed its derivative
    is 0 with respect to :math:`\mu` and :math:`-\tfrac12` per dimension with
    respect to :math:`\log\sigma^2`. Shapes: ``log_var (batch, J)``,
    ``eps (..., batch, J)`` -> ``(..., batch)``.
    """
    return -0.5 * (LOG_2PI + log_var + eps * eps).sum(axis=-1)


# --------------------------------------------------------------------------------------
# KL(N(mu, sigma^2) || N(0, I)) in closed form.
# --------------------------------------------------------------------------------------


def kl_normal_std(mu, log_var):
    r"""Analytic :math:`\mathrm{KL}(N(\mu, \sigma^2)\,\|\,N(0, I))` per example.

    From :math:`\int q\log p(z) = -\tfrac J2\log 2\pi - \tfrac12\sum_j(\mu_j^2+\sigma_j^2)`
    and :math:`\int q\log q = -\tfrac J2\log 2\pi - \tfrac12\sum_j(1+\log\sigma_j^2)`:

    .. math::
        -\mathrm{KL} = \tfrac12\sum_j \big(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2\big)

    Shapes: ``mu, log_var (batch, latent_dim)`` -> ``(batch,)``.
    """
    xp = get_array_module(mu, log_var)
    neg_kl = 0.5 * (1.0 + log_var - mu * mu - xp.exp(log_var)).sum(axis=-1)
    return -neg_kl


def kl_normal_std_backward(d_kl, mu, log_var):
    r"""Gradients of :func:`kl_normal_std`.

    .. math::
        \frac{\partial\,\mathrm{KL}}{\partial \mu_j} = \mu_j, \qquad
        \frac{\partial\,\mathrm{KL}}{\partial \log\sigma_j^2} = \tfrac12(\sigma_j^2 - 1)

    Returns ``(d_mu, d_log_var)``, each ``(batch, latent_dim)``.
    """
    xp = get_array_module(mu, log_var)
    d = _rows(d_kl, mu)
    return d * mu, d * 0.5 * (xp.exp(log_var) - 1.0)


# --------------------------------------------------------------------------------------
# The reparameterization trick.
# --------------------------------------------------------------------------------------


def reparameterize(mu, log_var, eps):
    r"""Draw :math:`z \sim N(\mu, \sigma^2)` as a differentiable function of ``mu`` and ``log_var``.

    .. math:: \sigma = \exp(\tfrac12 \log\sigma^2), \qquad z = \mu + \sigma\,\epsilon,\quad \epsilon \sim N(0, I)

    The noise ``eps`` is passed in, so that a fixed ``eps`` makes the model
    deterministic (which gradient checks need).

    Shapes: ``mu, log_var, eps (..., latent_dim)``.

    Returns
    -------
    z : array like ``mu``
    sigma : array like ``mu``, cached for :func:`reparameterize_backward`
    """
    xp = get_array_module(mu, log_var)
    sigma = xp.exp(0.5 * log_var)
    z = mu + sigma * eps
    return z, sigma


def reparameterize_backward(d_z, eps, sigma):
    r"""Gradients of :func:`reparameterize`.

    .. math::
        \frac{\partial L}{\partial \mu} = \frac{\partial L}{\partial z}, \qquad
        \frac{\partial L}{\partial \log\sigma^2} = \frac{\partial L}{\partial z}\,\epsilon\,\tfrac12\sigma

    (since :math:`\partial\sigma/\partial\log\sigma^2 = \tfrac12\sigma`).
    Returns ``(d_mu, d_log_var)``.
    """
    return d_z, d_z * eps * (0.5 * sigma)


# --------------------------------------------------------------------------------------
# A soft bound on log-variances, so that exp(log_var) cannot overflow.
# --------------------------------------------------------------------------------------

LOG_VAR_BOUND = 30.0


def bound_log_var(h, bound=LOG_VAR_BOUND):
    r"""Map a network output ``h`` to a log-variance in ``(-bound, bound)``, smoothly.

    .. math:: \log\sigma^2 = c \tanh(h / c)

    For :math:`|h| \ll c` this is :math:`h` (at :math:`|h| = 5`, :math:`c = 30`
    it differs by under 1 %), so trained models are unaffected; for extreme
    ``h`` (an exploding encoder) :math:`\sigma^2 = e^{\log\sigma^2}` stays
    within :math:`e^{\pm 30}` and every loss and gradient stays finite in
    float32. The gradient is exact (see :func:`bound_log_var_backward`), not
    clipped. ``bound=None`` returns ``h`` unchanged.
    """
    if bound is None:
        return h
    xp = get_array_module(h)
    return bound * xp.tanh(h / bound)


def bound_log_var_backward(d_log_var, log_var, bound=LOG_VAR_BOUND):
    r"""Gradient of :func:`bound_log_var`: :math:`\partial L/\partial h = \partial L/\partial\log\sigma^2\,(1 - (\log\sigma^2/c)^2)`."""
    if bound is None:
        return d_log_var
    t = log_var / bound
    return d_log_var * (1.0 - t * t)


# --------------------------------------------------------------------------------------
# Discrete entropy and KL (the derivation's starting point).
# --------------------------------------------------------------------------------------


def entropy(p):
    r"""Entropy of discrete distributions in nats, :math:`H(p) = -\sum_i p_i\log p_i` (with :math:`0\log 0 = 0`).

    Shape: ``p (..., n)`` -> ``(...)``; each row must sum to one.
    """
    xp = get_array_module(p)
    p = xp.asarray(p)
    safe = xp.where(p > 0, p, 1.0)
    return -(p * xp.log(safe)).sum(axis=-1)


def kl_discrete(p, q):
    r"""Discrete KL divergence :math:`\mathrm{KL}(p\|q) = \sum_i p_i \log(p_i/q_i)` in nats.

    Equals the cross-entropy minus the entropy,
    :math:`-\sum_i p_i\log q_i - H(p)`; it is :math:`\ge 0` (Gibbs) and zero
    only at :math:`p = q`. Terms with :math:`p_i = 0` contribute 0.
    Shape: ``p, q (..., n)`` -> ``(...)``.
    """
    xp = get_array_module(p, q)
    p, q = xp.asarray(p), xp.asarray(q)
    pos = p > 0
    ratio = xp.where(pos, p, 1.0) / xp.where(pos, q, 1.0)
    return (p * xp.log(ratio)).sum(axis=-1)
