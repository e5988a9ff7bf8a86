r"""Statistical checks that gradient checks cannot replace.

A gradient check compares a backward pass with its *own* forward pass, so a
sampler that draws :math:`z = \mu + \sigma^2\epsilon` (the variance used as the
standard deviation) together with the matching backward passes every gradient
check, while disagreeing with the KL term it is trained with. These tests
compare samples with the distribution they are meant to follow:

* the sample mean and variance of :math:`z = \mu + \sigma\epsilon` per latent
  dimension against :math:`\mu` and :math:`\sigma^2 = \exp(\log\sigma^2)`;
* the analytic :math:`\mathrm{KL}(q\,\|\,N(0, I))` against a Monte Carlo
  estimate :math:`\mathbb E_q[\log q(z) - \log p(z)]`;
* the importance weights of :mod:`scratchvae.evaluate` against the ELBO.

Every bound is in standard errors of the estimate (5 SE: a false alarm has
probability below 1e-6 per comparison), the seeds are fixed, so each run is
deterministic. Each test also shows that the same statistic rejects the wrong
sampler ``exp(log_var) * eps``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from scratchvae import VAE, losses
from scratchvae.backend import get_array_module, to_device, to_numpy
from scratchvae.rng import Generator
from scratchvae.evaluate import log_weights

N_SAMPLES = 200_000
MAX_SE = 5.0

# Posterior parameters per latent dimension; no log_var is 0, where sigma and
# sigma^2 coincide and the wrong sampler would be right.
MU = np.array([-2.0, -0.5, 0.0, 0.3, 1.0, 2.5])
LOG_VAR = np.array([-3.0, -1.0, 0.5, 1.0, 2.0, -0.2])


def wrong_reparameterize(mu, log_var, eps):
    """The bug two well-known NumPy VAEs have: the variance used as the standard deviation."""
    return mu + get_array_module(log_var).exp(log_var) * eps


def draw(sampler, xp, dtype, n=N_SAMPLES, seed=0):
    """``n`` samples of ``z`` for MU, LOG_VAR, as float64 on the host, shape ``(n, J)``."""
    mu = to_device(MU, xp, dtype)
    log_var = to_device(LOG_VAR, xp, dtype)
    eps = Generator(seed, xp).normal((n, MU.size), dtype)
    z = sampler(mu, log_var, eps)
    assert z.dtype == np.dtype(dtype)
    return to_numpy(z).astype(np.float64)


def moment_z_scores(z, mu, log_var):
    r"""How many standard errors the sample mean and variance of ``z`` lie from :math:`\mu, \sigma^2`.

    For :math:`n` normal draws the sample mean has standard error
    :math:`\sigma/\sqrt n` and the sample variance :math:`\sigma^2\sqrt{2/(n-1)}`.
    """
    n = z.shape[0]
    var = np.exp(log_var)
    mean_z = (z.mean(axis=0) - mu) / np.sqrt(var / n)
    var_z = (z.var(axis=0, ddof=1) - var) / (var * math.sqrt(2.0 / (n - 1)))
    return mean_z, var_z


def reparameterize_z(mu, log_var, eps):
    return losses.reparameterize(mu, log_var, eps)[0]


def test_reparameterized_samples_have_mean_mu_and_variance_exp_log_var(backend, xp, dtype):
    mean_z, var_z = moment_z_scores(draw(reparameterize_z, xp, dtype), MU, LOG_VAR)
    assert np.abs(mean_z).max() < MAX_SE, f"sample means off by {mean_z} standard errors"
    assert np.abs(var_z).max() < MAX_SE, f"sample variances off by {var_z} standard errors"

    # The same statistic rejects the sampler that uses exp(log_var) as the std.
    _, wrong_var_z = moment_z_scores(draw(wrong_reparameterize, xp, dtype), MU, LOG_VAR)
    assert np.abs(wrong_var_z).min() > 10 * MAX_SE  # in every dimension


def test_reparameterize_returns_sigma_exp_half_log_var(backend, xp, dtype, dtype_rtol):
    mu, log_var = to_device(MU, xp, dtype), to_device(LOG_VAR, xp, dtype)
    eps = to_device(np.ones(MU.size), xp, dtype)
    z, sigma = losses.reparameterize(mu, log_var, eps)
    np.testing.assert_allclose(to_numpy(sigma), np.exp(0.5 * LOG_VAR), rtol=dtype_rtol)
    np.testing.assert_allclose(to_numpy(z), MU + np.exp(0.5 * LOG_VAR), rtol=dtype_rtol)


def kl_monte_carlo(z, mu, log_var):
    """Mean and standard error of :math:`\\log q(z) - \\log p(z)` over the rows of ``z`` (float64)."""
    log_ratio = losses.log_normal(z, mu, log_var) - losses.log_standard_normal(z)
    return log_ratio.mean(), log_ratio.std(ddof=1) / math.sqrt(z.shape[0])


def test_analytic_kl_matches_monte_carlo_estimate(backend, xp, dtype):
    mu, log_var = to_device(MU[None], xp, dtype), to_device(LOG_VAR[None], xp, dtype)
    analytic = float(to_numpy(losses.kl_normal_std(mu, log_var))[0])
    estimate, se = kl_monte_carlo(draw(reparameterize_z, xp, dtype), MU, LOG_VAR)
    assert se > 0
    assert abs(estimate - analytic) < MAX_SE * se, f"KL {analytic} vs Monte Carlo {estimate} +- {se}"

    # Samples from the wrong sampler disagree with the density the KL is computed for.
    wrong_estimate, wrong_se = kl_monte_carlo(draw(wrong_reparameterize, xp, dtype), MU, LOG_VAR)
    assert abs(wrong_estimate - analytic) > 20 * MAX_SE * wrong_se


@pytest.mark.parametrize("mu, log_var", [(0.0, 0.0), (0.1, -0.1), (3.0, -4.0), (-1.0, 3.0)])
def test_analytic_kl_matches_monte_carlo_per_dimension(backend, xp, mu, log_var):
    """One latent dimension at a time, from the prior itself (KL = 0) to far from it."""
    mu_a, log_var_a = to_device([[mu]], xp), to_device([[log_var]], xp)
    analytic = float(to_numpy(losses.kl_normal_std(mu_a, log_var_a))[0])
    eps = Generator(1, xp).normal((N_SAMPLES, 1))
    z = to_numpy(losses.reparameterize(mu_a, log_var_a, eps)[0])
    estimate, se = kl_monte_carlo(z, np.array([mu]), np.array([log_var]))
    assert analytic >= 0
    # at the prior every log-ratio is exactly 0, and so is the standard error
    assert abs(estimate - analytic) <= MAX_SE * se + 1e-12, f"KL {analytic} vs Monte Carlo {estimate} +- {se}"


def test_importance_weights_average_to_the_elbo(backend, xp):
    r""":math:`\mathbb E_\epsilon[\log w] = \mathrm{ELBO}`: the sampled log-density ratio of
    :func:`~scratchvae.evaluate.log_weights` agrees with the analytic KL of ``elbo``.
    """
    model = VAE(6, (5,), 3, "gaussian_learned", "tanh", backend=backend, dtype="float64", seed=2)
    model.params += to_device(np.random.default_rng(2).standard_normal(model.n_params) * 0.3, xp)
    x = to_device(np.random.default_rng(3).random((4, 6)), xp)
    n = 20_000
    eps = Generator(4, xp).normal((n, 4, 3))
    log_w = to_numpy(log_weights(model, x, eps))  # (n, batch)
    # ELBO with the same noise, sample by sample: log p(x|z) - analytic KL
    mu, log_var = model.encode(x)
    z, _ = losses.reparameterize(mu, log_var, eps)
    elbo_samples = to_numpy(model.log_px_given_z(z, x) - losses.kl_normal_std(mu, log_var))
    diff = log_w - elbo_samples  # = log p(z) - log q(z|x) + KL, mean 0
    se = diff.std(axis=0, ddof=1) / math.sqrt(n)
    assert np.all(np.abs(diff.mean(axis=0)) < MAX_SE * se), (diff.mean(axis=0), se)
    # the per-sample ELBO above is what VAE.elbo reports for the same noise
    np.testing.assert_allclose(to_numpy(model.elbo(x, eps[0])), elbo_samples[0], rtol=1e-12)
