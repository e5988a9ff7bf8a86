r"""Every equation of the derivation (docs/derivation.md), executed.

The identities that involve :math:`\log p(x)` or the true posterior are checked on
:class:`scratchvae.exact.LinearGaussianVAE`, where both have closed forms, through
the same encoder, ELBO, gradient and IWAE code that trains the neural VAE.

Two kinds of assertions:

* algebraic identities (closed form = closed form) hold to round-off, with a
  tolerance relative to the size of the terms (``assert_close``);
* Monte Carlo estimates use fixed seeds and are compared with their analytic
  value in standard errors (``assert_within_se``, ``MC_SE`` of them), so a
  failure is a bias of at least several standard errors, not bad luck.

Values are drawn by hypothesis (float64, bounded elements); each drawn example
is small, so the whole file runs in seconds.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scratchvae import Autoencoder
from scratchvae import losses as L
from scratchvae.backend import to_device, to_numpy
from scratchvae.rng import Generator
from scratchvae.evaluate import iwae_bound, log_weights
from scratchvae.exact import LinearGaussianVAE, expected_log_prior, kl_normal_full, negative_entropy

MC_SE = 5.0  # a Monte Carlo mean must lie within this many standard errors of its expectation
EXACT_RTOL = 1e-10  # closed form vs closed form, relative to the size of the terms


def assert_close(actual, expected, rtol=EXACT_RTOL, scale=None, what=""):
    """``|actual - expected| <= rtol * (1 + scale)`` elementwise.

    ``scale`` is the size of the terms the two sides are computed from; it
    defaults to ``max(|actual|, |expected|)``.
    """
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = np.maximum(np.abs(actual), np.abs(expected))
    err = np.abs(actual - expected)
    bound = rtol * (1.0 + np.asarray(scale))
    assert np.all(err <= bound), (
        f"{what}: |actual - expected| = {err} exceeds {bound}\nactual   {actual}\nexpected {expected}"
    )


def assert_within_se(samples, expected, axis=0, n_se=MC_SE, what=""):
    """The mean of ``samples`` along ``axis`` lies within ``n_se`` standard errors of ``expected``."""
    samples = np.asarray(samples, dtype=np.float64)
    n = samples.shape[axis]
    mean = samples.mean(axis=axis)
    se = samples.std(axis=axis, ddof=1) / math.sqrt(n)
    z = np.abs(mean - expected) / (se + 1e-12)
    assert np.all(z <= n_se), (
        f"{what}: Monte Carlo mean is {np.max(z):.1f} standard errors from its expectation (limit {n_se})\n"
        f"mean     {mean}\nexpected {np.asarray(expected)}\nse       {se}"
    )


# --------------------------------------------------------------------------------------
# Strategies.
# --------------------------------------------------------------------------------------


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _array(draw, shape, lo, hi):
    return draw(arrays(np.float64, shape, elements=_floats(lo, hi)))


@st.composite
def linear_gaussian_problems(draw):
    """A linear-Gaussian VAE with drawn ``W, b, s^2``, a batch ``x`` and an arbitrary diagonal ``q``."""
    J = draw(st.integers(1, 4))
    D = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    model = LinearGaussianVAE(D, latent_dim=J, gaussian_log_var=draw(_floats(-2.0, 2.0)))
    model.W[...] = _array(draw, (J, D), -2.0, 2.0)
    model.b[...] = _array(draw, (D,), -1.0, 1.0)
    x = _array(draw, (B, D), -3.0, 3.0)
    mu = _array(draw, (B, J), -3.0, 3.0)
    log_var = _array(draw, (B, J), -3.0, 2.0)
    return model, x, mu, log_var


@st.composite
def covariances(draw, J, B):
    """``(B, J, J)`` symmetric positive definite matrices ``A A^T + 0.05 I``."""
    A = _array(draw, (B, J, J), -1.5, 1.5)
    return A @ A.transpose(0, 2, 1) + 0.05 * np.eye(J)


@st.composite
def distributions(draw, n, allow_zeros):
    """A discrete distribution over ``n`` outcomes (zeros allowed in ``p`` when asked)."""
    positive = _floats(1e-3, 1.0)
    elements = st.one_of(st.just(0.0), positive) if allow_zeros else positive
    w = draw(arrays(np.float64, (n,), elements=elements).filter(lambda w: w.sum() > 0))
    return w / w.sum()


def _neural_model(seed=3):
    """A linear-Gaussian VAE with a tanh MLP encoder whose ``q`` has variances well away from 1.

    Well away from 1, so that a sampler that uses the variance as the standard
    deviation draws visibly different ``z``. All parameters are set here, so
    the test does not depend on the initialisation scheme.
    """
    model = LinearGaussianVAE(3, hidden=(4,), latent_dim=2, gaussian_log_var=math.log(0.5))
    model.params[...] = np.random.default_rng(seed).uniform(-0.8, 0.8, model.n_params)
    model.encoder.dense[-1].b[2:] = [-1.2, 0.8]  # log_var bias
    model.encoder.dense[-1].b[:2] = [0.3, -0.4]  # mu bias
    return model


def _x(B=3, D=3, seed=0):
    return np.random.default_rng(seed).normal(size=(B, D))


# --------------------------------------------------------------------------------------
# log p(x) = ELBO + KL(q || p(z|x)), and log p(x) >= ELBO.
# --------------------------------------------------------------------------------------


@given(problem=linear_gaussian_problems())
def test_bayes_rule_pointwise(problem):
    """log p(x) = log p(x, z) - log p(z|x) at every z: the integrand of log p(x) = ∫ q log p(x) dz."""
    model, x, z, _ = problem
    joint, post = model.log_joint(x, z), model.log_posterior(z, x)
    assert_close(joint - post, model.log_marginal(x), scale=np.abs(joint) + np.abs(post),
                 what="log p(x,z) - log p(z|x)")


@given(problem=linear_gaussian_problems())
def test_elbo_plus_kl_is_log_marginal(problem):
    """log p(x) = ELBO(q) + KL(q || p(z|x)) for an arbitrary diagonal Gaussian q."""
    model, x, mu, log_var = problem
    elbo = model.elbo_analytic(x, mu, log_var)
    kl = model.kl_to_posterior(x, mu, log_var)
    assert_close(elbo + kl, model.log_marginal(x), scale=np.abs(elbo) + kl, what="ELBO + KL")


@given(problem=linear_gaussian_problems(), data=st.data())
def test_elbo_plus_kl_is_log_marginal_full_covariance(problem, data):
    """The same identity for a full-covariance Gaussian q = N(m, S)."""
    model, x, mean, _ = problem
    cov = data.draw(covariances(model.latent_dim, x.shape[0]))
    elbo = model.elbo_analytic_full(x, mean, cov)
    kl = model.kl_to_posterior_full(x, mean, cov)
    assert_close(elbo + kl, model.log_marginal(x), scale=np.abs(elbo) + kl, what="ELBO + KL (full covariance)")


@given(problem=linear_gaussian_problems())
def test_elbo_below_log_marginal_with_equality_at_posterior(problem):
    """ELBO(q) <= log p(x) for any q (KL >= 0), with equality when q is the exact posterior."""
    model, x, mu, log_var = problem
    log_px = model.log_marginal(x)
    elbo = model.elbo_analytic(x, mu, log_var)
    kl = model.kl_to_posterior(x, mu, log_var)
    slack = EXACT_RTOL * (1.0 + np.abs(elbo) + kl)
    assert np.all(kl >= -slack), f"KL(q || p(z|x)) < 0: {kl}"
    assert np.all(elbo <= log_px + slack), f"ELBO {elbo} above log p(x) {log_px}"

    mean, cov = model.posterior(x)
    assert_close(model.elbo_analytic_full(x, mean, cov), log_px, what="ELBO at the posterior")
    assert_close(model.kl_to_posterior_full(x, mean, cov), 0.0, scale=np.abs(log_px), what="KL to itself")


@st.composite
def diagonal_posterior_problems(draw):
    """A model whose W has orthogonal rows (so W W^T and the posterior are diagonal), x, and noise eps."""
    J = draw(st.integers(1, 3))
    D = draw(st.integers(J, 5))
    B = draw(st.integers(1, 3))
    Q, _ = np.linalg.qr(_array(draw, (D, J), -1.0, 1.0))  # orthonormal columns
    scales = _array(draw, (J,), 0.3, 3.0)
    model = LinearGaussianVAE(D, hidden=(), latent_dim=J, gaussian_log_var=draw(_floats(-2.0, 1.0)))
    model.W[...] = scales[:, None] * Q.T
    model.b[...] = _array(draw, (D,), -1.0, 1.0)
    return model, _array(draw, (B, D), -3.0, 3.0), _array(draw, (4, B, J), -3.0, 3.0)


@given(problem=diagonal_posterior_problems())
def test_mean_field_encoder_is_exact_when_posterior_is_diagonal(problem):
    """With W W^T diagonal the encoder can output p(z|x) itself: ELBO = log p(x), and every log w_k = log p(x)."""
    model, x, eps = problem
    model.set_mean_field_encoder()
    log_px = model.log_marginal(x)
    mu, log_var = model.encode(x)
    assert_close(model.elbo_analytic(x, mu, log_var), log_px, what="ELBO at q = p(z|x)")
    assert_close(model.kl_to_posterior(x, mu, log_var), 0.0, scale=np.abs(log_px), what="KL(p(z|x) || p(z|x))")
    # log p(x, z) - log q(z|x) is then constant in z: a zero-variance importance weight.
    lw = log_weights(model, x, eps)  # (4, B)
    assert_close(lw, np.broadcast_to(log_px, lw.shape), rtol=1e-9, what="log w_k at q = p(z|x)")


def test_closed_forms_on_every_backend(backend):
    """The identities above on each backend, and the same numbers as NumPy (float64, to 1e-10)."""
    rng = np.random.default_rng(5)
    W, b, x = rng.normal(size=(2, 3)), rng.normal(size=3), rng.normal(size=(4, 3))
    mu, log_var, z = rng.normal(size=(4, 2)), rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    results = {}
    for name in dict.fromkeys(["numpy", backend]):
        model = LinearGaussianVAE(3, latent_dim=2, gaussian_log_var=-0.5, backend=name)
        model.W[...] = to_device(W, model.xp)
        model.b[...] = to_device(b, model.xp)
        mean, cov = model.posterior(x)
        model.set_mean_field_encoder()
        values = {
            "log p(x)": model.log_marginal(x),
            "ELBO": model.elbo_analytic(x, mu, log_var),
            "KL(q || p(z|x))": model.kl_to_posterior(x, mu, log_var),
            "ELBO at p(z|x)": model.elbo_analytic_full(x, mean, cov),
            "log p(x,z) - log p(z|x)": model.log_joint(x, z) - model.log_posterior(z, x),
            "mean-field KL": model.kl_to_posterior(x, *model.encode(x)),
        }
        results[name] = {k: to_numpy(v) for k, v in values.items()}
    got = results[backend]
    assert_close(got["ELBO"] + got["KL(q || p(z|x))"], got["log p(x)"], what=f"ELBO + KL on {backend}")
    assert_close(got["ELBO at p(z|x)"], got["log p(x)"], what=f"ELBO at the posterior on {backend}")
    assert_close(got["log p(x,z) - log p(z|x)"], got["log p(x)"], what=f"Bayes' rule on {backend}")
    assert np.all(got["mean-field KL"] > 0), "W W^T is not diagonal here, so the best diagonal q is not exact"
    for key, ref in results["numpy"].items():
        assert_close(got[key], ref, what=f"{key}: {backend} vs numpy")


# --------------------------------------------------------------------------------------
# The two Gaussian integrals and the analytic KL.
# --------------------------------------------------------------------------------------


@st.composite
def diagonal_gaussians(draw):
    J = draw(st.integers(1, 4))
    B = draw(st.integers(1, 3))
    return _array(draw, (B, J), -3.0, 3.0), _array(draw, (B, J), -3.0, 2.0)


@given(q=diagonal_gaussians())
def test_gaussian_integrals_match_monte_carlo(q):
    """∫ q log p(z) and ∫ q log q against sample means of log N(z; 0, I) and log N(z; mu, sigma^2), z ~ q."""
    mu, log_var = q
    eps = np.random.default_rng(0).standard_normal((4000, *mu.shape))
    z, _ = L.reparameterize(mu, log_var, eps)  # (N, B, J)
    assert_within_se(L.log_standard_normal(z), expected_log_prior(mu, log_var), what="∫ q log p(z)")
    assert_within_se(L.log_normal(z, mu, log_var), negative_entropy(mu, log_var), what="∫ q log q")


@given(q=diagonal_gaussians())
def test_gaussian_integrals_difference_is_kl(q):
    """∫ q log p(z) - ∫ q log q = -KL(q || p(z)) = 1/2 Σ (1 + log sigma^2 - mu^2 - sigma^2)."""
    mu, log_var = q
    cross, neg_h = expected_log_prior(mu, log_var), negative_entropy(mu, log_var)
    kl = L.kl_normal_std(mu, log_var)
    assert_close(cross - neg_h, -kl, rtol=1e-12, scale=np.abs(cross) + np.abs(neg_h), what="∫ q log p(z) - ∫ q log q")
    # The full-covariance KL reduces to it for a diagonal q and p(z) = N(0, I).
    J = mu.shape[1]
    cov = np.exp(log_var)[:, :, None] * np.eye(J)
    assert_close(kl_normal_full(mu, cov, np.zeros(J), np.eye(J)), kl, scale=kl + np.abs(log_var).sum(axis=-1),
                 what="kl_normal_full vs kl_normal_std")


# --------------------------------------------------------------------------------------
# The two forms of the ELBO, and the Monte Carlo ELBO the model trains on.
# --------------------------------------------------------------------------------------


@given(problem=linear_gaussian_problems())
def test_elbo_two_forms_agree(problem):
    """E_q[log p(x|z)] + ∫ q log p(z) - ∫ q log q  =  E_q[log p(x|z)] - KL(q || p(z)), in closed form."""
    model, x, mu, log_var = problem
    ell = model.expected_log_likelihood(x, mu, log_var)
    joint_form = ell + expected_log_prior(mu, log_var) - negative_entropy(mu, log_var)
    assert_close(joint_form, model.elbo_analytic(x, mu, log_var), scale=np.abs(ell) + np.abs(joint_form),
                 what="E_q[log p(x,z) - log q] vs E_q[log p(x|z)] - KL")


def test_elbo_two_forms_agree_monte_carlo():
    """The sample mean of log w = log p(x,z) - log q(z|x) (evaluate.log_weights) estimates the analytic ELBO."""
    model, x = _neural_model(), _x()
    eps = np.random.default_rng(1).standard_normal((20000, x.shape[0], model.latent_dim))
    lw = log_weights(model, x, eps)  # (N, B)
    mu, log_var = model.encode(x)
    assert_within_se(lw, model.elbo_analytic(x, mu, log_var), what="mean of log p(x,z) - log q(z|x)")


def test_reparameterized_elbo_is_unbiased():
    """VAE.elbo (one z = mu + sigma * eps per call) and loss_and_grad's loss average to the analytic ELBO."""
    model, x = _neural_model(), _x()
    B, J = x.shape[0], model.latent_dim
    mu, log_var = model.encode(x)
    elbo = model.elbo_analytic(x, mu, log_var)  # (B,)
    rng = np.random.default_rng(2)

    n = 20000  # VAE.elbo on x repeated n times: n independent one-sample estimates per example
    samples = model.elbo(np.repeat(x, n, axis=0), eps=rng.standard_normal((B * n, J))).reshape(B, n)
    assert_within_se(samples, elbo, axis=1, what="VAE.elbo")

    reps, tile = 200, 50  # loss_and_grad: each call averages -ELBO over a batch of `tile` copies of x
    losses = [
        float(model.loss_and_grad(np.tile(x, (tile, 1)), eps=rng.standard_normal((B * tile, J))).loss)
        for _ in range(reps)
    ]
    assert_within_se(losses, -elbo.mean(), what="VAE.loss_and_grad loss")


def _central_difference_gradient(f, p0, h=1e-5):
    """Gradient of a scalar ``f(params)`` by float64 central differences, one coordinate at a time."""
    grad = np.empty_like(p0)
    for i in range(p0.size):
        e = np.zeros_like(p0)
        e[i] = h
        grad[i] = (f(p0 + e) - f(p0 - e)) / (2.0 * h)
    return grad


def test_reparameterized_gradient_is_unbiased():
    """The mean of loss_and_grad's gradient over eps ~ N(0, I) is the gradient of -ELBO in closed form.

    The analytic gradient is taken by central differences of ``-elbo_analytic``
    (a deterministic function of the parameters) in float64; the Monte Carlo one
    by averaging ``model.grads`` over injected ``eps``. Compared per coordinate
    and along random directions, in standard errors.
    """
    model, x = _neural_model(), _x()
    B, J = x.shape[0], model.latent_dim
    p0 = model.params.copy()

    def neg_elbo(p):
        model.params[...] = p
        mu, log_var = model.encode(x)
        return -float(model.elbo_analytic(x, mu, log_var).mean())

    analytic = _central_difference_gradient(neg_elbo, p0)
    model.params[...] = p0

    eps = np.random.default_rng(3).standard_normal((3000, B, J))
    grads = np.empty((eps.shape[0], p0.size))
    for n in range(eps.shape[0]):
        model.loss_and_grad(x, eps=eps[n])
        grads[n] = model.grads
    assert_within_se(grads, analytic, what="per-coordinate gradient of -ELBO")
    directions = np.random.default_rng(4).standard_normal((p0.size, 5))
    assert_within_se(grads @ directions, analytic @ directions, what="directional gradient of -ELBO")


# --------------------------------------------------------------------------------------
# The importance-weighted bound.
# --------------------------------------------------------------------------------------


def _iwae_model(mean_shift, log_var_shift):
    """A linear encoder set to the best diagonal q, then moved: shifted mean, log-variance changed."""
    model = LinearGaussianVAE(3, hidden=(), latent_dim=2, gaussian_log_var=math.log(0.3))
    model.W[...] = [[0.8, -0.5, 0.3], [0.4, 0.9, -0.6]]
    model.b[...] = [0.1, -0.2, 0.3]
    model.set_mean_field_encoder()
    enc = model.encoder.dense[0]
    enc.b[:2] += mean_shift
    enc.b[2:] += log_var_shift
    return model


def test_iwae_bound_rises_with_k():
    """E[L_K] increases with K: L_1 < L_10 < L_100 < L_1000 <= log p(x), each step by many standard errors.

    A q narrower than the posterior makes the weights heavy-tailed, so that the
    bound is still climbing at K = 1000. Each replicate uses the first K of one
    stream of samples for every K (the same generator seed), so the steps are
    paired differences.
    """
    model, x = _iwae_model(0.5, -0.5), _x(B=8)
    reps = 250
    log_px = model.log_marginal(x).mean()
    bounds = {}
    for k in (1, 10, 100, 1000):
        per_row = iwae_bound(model, np.tile(x, (reps, 1)), k=k, rng=Generator(7))
        bounds[k] = per_row.reshape(reps, -1).mean(axis=1)  # averaged over the 8 examples, per replicate
    ks = sorted(bounds)
    for k_lo, k_hi in zip(ks, ks[1:]):
        step = bounds[k_hi] - bounds[k_lo]
        se = step.std(ddof=1) / math.sqrt(reps)
        assert step.mean() > MC_SE * se, f"L_{k_hi} - L_{k_lo} = {step.mean():.4g} is not > {MC_SE} SE ({se:.3g})"
    top = bounds[ks[-1]]
    assert top.mean() < log_px + MC_SE * top.std(ddof=1) / math.sqrt(reps), "L_1000 above log p(x)"


def test_iwae_bound_approaches_log_marginal():
    """L_5000 is within 0.02 nats of log p(x), and much closer than L_1 (the ELBO)."""
    model, x = _iwae_model(0.5, 1.5), _x(B=4)
    reps = 50
    log_px = model.log_marginal(x)
    l1 = iwae_bound(model, np.tile(x, (reps, 1)), k=1, rng=Generator(3)).reshape(reps, -1)
    l5000 = iwae_bound(model, np.tile(x, (reps, 1)), k=5000, rng=Generator(3)).reshape(reps, -1)
    gap_1, gap_5000 = log_px - l1.mean(axis=0), log_px - l5000.mean(axis=0)
    assert np.all(np.abs(gap_5000) < 0.02), f"log p(x) - L_5000 = {gap_5000}"
    assert np.all(np.abs(gap_5000) < 0.05 * gap_1), f"L_5000 gap {gap_5000} not far below the ELBO gap {gap_1}"
    mu, log_var = model.encode(x)
    assert_within_se(l1, model.elbo_analytic(x, mu, log_var), what="L_1 is the ELBO")


# --------------------------------------------------------------------------------------
# Discrete entropy and KL.
# --------------------------------------------------------------------------------------


@given(data=st.data(), n=st.integers(1, 6))
def test_kl_discrete_is_nonnegative_and_zero_at_equality(data, n):
    """Gibbs: KL(p || q) >= 0, KL(p || p) = 0, and 0 <= H(p) <= log n."""
    p = data.draw(distributions(n, allow_zeros=True))
    q = data.draw(distributions(n, allow_zeros=False))
    assert L.kl_discrete(p, q) >= -1e-12
    assert L.kl_discrete(p, p) == 0.0
    assert -1e-12 <= L.entropy(p) <= math.log(n) + 1e-12


@given(data=st.data(), n=st.integers(1, 6))
def test_kl_is_cross_entropy_minus_entropy(data, n):
    """KL(p || q) = -Σ p log q - H(p)."""
    p = data.draw(distributions(n, allow_zeros=True))
    q = data.draw(distributions(n, allow_zeros=False))
    cross_entropy = -(p * np.log(q)).sum()
    assert_close(L.kl_discrete(p, q), cross_entropy - L.entropy(p), rtol=1e-12,
                 scale=cross_entropy, what="KL vs cross-entropy - entropy")


def test_kl_discrete_is_asymmetric():
    """KL(p || q) = log(5/3) and KL(q || p) = 0.9 log 1.8 + 0.1 log 0.2 for p = (1/2, 1/2), q = (0.9, 0.1)."""
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert L.kl_discrete(p, q) == pytest.approx(math.log(5 / 3), rel=1e-12)
    assert L.kl_discrete(q, p) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-12)
    assert abs(L.kl_discrete(p, q) - L.kl_discrete(q, p)) > 0.1


# --------------------------------------------------------------------------------------
# The likelihood terms -log p(x|z).
# --------------------------------------------------------------------------------------


@st.composite
def batch_pairs(draw, lo, hi, x_lo, x_hi):
    """Two ``(batch, 4)`` arrays: decoder outputs in ``[lo, hi]`` and data in ``[x_lo, x_hi]``."""
    B = draw(st.integers(1, 3))
    return _array(draw, (B, 4), lo, hi), _array(draw, (B, 4), x_lo, x_hi)


@given(pair=batch_pairs(-10.0, 10.0, 0.0, 1.0))
def test_bernoulli_nll_is_cross_entropy(pair):
    """softplus(l) - x l = -x log sigmoid(l) - (1 - x) log(1 - sigmoid(l)), summed over dimensions."""
    logits, x = pair
    p = 1.0 / (1.0 + np.exp(-logits))
    cross_entropy = -(x * np.log(p) + (1.0 - x) * np.log1p(-p)).sum(axis=-1)
    assert_close(L.bernoulli_nll(logits, x), cross_entropy, rtol=1e-9, what="Bernoulli NLL")


@given(pair=batch_pairs(-3.0, 3.0, -3.0, 3.0), log_var=_floats(-3.0, 3.0))
def test_gaussian_nll_is_scaled_squared_error(pair, log_var):
    """-log N(x; x_hat, s^2 I) = |x - x_hat|^2 / 2 s^2 + D/2 (log 2 pi + log s^2): the autoencoder's loss, rescaled."""
    x_hat, x = pair
    D = x.shape[1]
    by_hand = ((x - x_hat) ** 2).sum(axis=-1) / (2.0 * math.exp(log_var)) + 0.5 * D * (L.LOG_2PI + log_var)
    assert_close(L.gaussian_nll(x_hat, x, log_var), by_hand, rtol=1e-12, what="Gaussian NLL")


# --------------------------------------------------------------------------------------
# The plain autoencoder.
# --------------------------------------------------------------------------------------


@given(x=arrays(np.float64, st.tuples(st.integers(1, 4), st.just(5)), elements=_floats(0.0, 1.0)),
       output=st.sampled_from(["sigmoid", "identity"]))
def test_autoencoder_loss_is_squared_error(x, output):
    """Autoencoder loss = (1/B) Σ_b Σ_d (x - d(e(x)))^2, computed by hand from encode and decode."""
    model = Autoencoder(5, hidden=(4,), latent_dim=2, activation="tanh", output=output, dtype="float64", seed=1)
    x_hat = model.decode(model.encode(x))
    by_hand = ((x - x_hat) ** 2).sum() / x.shape[0]
    out = model.loss_and_grad(x)
    assert_close(out.loss, by_hand, rtol=1e-12, what="autoencoder loss")
    assert float(out.kl) == 0.0
