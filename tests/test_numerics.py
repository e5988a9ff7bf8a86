"""Extreme values and edge cases: finite losses and gradients, exact stable forms, memory bounds kept."""

import numpy as np
import pytest

from scratchvae import VAE
from scratchvae.backend import to_device, to_numpy
from scratchvae.layers import softplus
from scratchvae.losses import LOG_VAR_BOUND, bound_log_var
from scratchvae.model import LIKELIHOODS


def test_bound_log_var_is_the_identity_for_ordinary_values_and_bounded_beyond():
    h = np.array([-5.0, -1.0, 0.0, 1.0, 5.0])
    np.testing.assert_allclose(bound_log_var(h), h, rtol=1e-2)
    far = bound_log_var(np.array([-1e6, -100.0, 100.0, 1e6]))
    assert np.all(np.abs(far) <= LOG_VAR_BOUND)  # tanh rounds to exactly +-1 far out
    np.testing.assert_allclose(np.abs(far), LOG_VAR_BOUND, rtol=0.02)
    assert bound_log_var(h, None) is h


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
@pytest.mark.parametrize("extreme", [-100.0, 100.0, 1e4])
def test_extreme_encoder_log_variance_gives_finite_loss_and_gradients(backend, xp, likelihood, extreme):
    """An encoder whose log-variance output is +-100 or more: float32 stays finite everywhere."""
    model = VAE(16, (8,), 3, likelihood, backend=backend, dtype="float32", seed=0)
    enc = model.encoder.dense[-1]
    enc.b[3:] = extreme  # the log-variance half of the encoder's output
    if likelihood == "gaussian_learned":
        model.decoder.dense[-1].b[16:] = -extreme  # and the decoder's per-pixel log-variance
    x = to_device(np.random.default_rng(0).random((5, 16)), xp, "float32")
    out = model.loss_and_grad(x)
    assert np.isfinite(float(out.loss)) and np.isfinite(float(out.kl))
    assert np.all(np.isfinite(to_numpy(model.grads)))


def test_without_the_bound_float32_overflows_as_documented(backend, xp):
    model = VAE(16, (8,), 3, backend=backend, dtype="float32", seed=0, log_var_bound=None)
    model.encoder.dense[-1].b[3:] = 100.0
    x = to_device(np.random.default_rng(0).random((5, 16)), xp, "float32")
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(float(model.loss_and_grad(x).kl))


@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_huge_logits_give_finite_bernoulli_loss_and_gradients(backend, xp, scale):
    model = VAE(16, (8,), 3, backend=backend, dtype="float32", seed=0)
    model.decoder.dense[-1].b[:] = to_device(scale * np.where(np.arange(16) % 2, 1.0, -1.0), xp, "float32")
    x = to_device((np.random.default_rng(0).random((5, 16)) > 0.5).astype(np.float32), xp, "float32")
    out = model.loss_and_grad(x)
    assert np.isfinite(float(out.loss))
    assert np.all(np.isfinite(to_numpy(model.grads)))


def test_gaussian_nll_with_a_numpy_scalar_log_variance_keeps_float32():
    from scratchvae.losses import gaussian_nll, gaussian_nll_backward

    mean, x = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    assert gaussian_nll(mean, x, np.float64(0.5)).dtype == np.float32
    assert all(g.dtype == np.float32 for g in gaussian_nll_backward(1.0, mean, x, np.float64(0.5)))


def test_iwae_bound_in_chunks_equals_one_chunk():
    from scratchvae.rng import Generator
    from scratchvae.evaluate import iwae_bound

    model = VAE(16, (8,), 3, dtype="float64", seed=1)
    x = np.random.default_rng(0).random((4, 16))
    one = iwae_bound(model, x, 50, rng=Generator(5, np), max_elements=1 << 30)
    many = iwae_bound(model, x, 50, rng=Generator(5, np), max_elements=4 * 16 * 7)  # chunks of 7 samples
    np.testing.assert_allclose(many, one, rtol=1e-12)


@pytest.mark.parametrize("k", [0, -2, 2.5, True, "3"])
def test_iwae_bound_refuses_a_bad_k(k):
    from scratchvae.evaluate import iwae_bound

    with pytest.raises(ValueError, match="k must be a positive integer"):
        iwae_bound(VAE(16, (8,), 3), np.zeros((2, 16)), k)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize(("batch", "latent", "decoder_hidden"), [(2, 9, (4,)), (5, 3, (40,)), (1, 30, ()), (7, 2, (3, 3))])
def test_iwae_bound_holds_no_decoder_array_beyond_max_elements(likelihood, batch, latent, decoder_hidden, monkeypatch):
    """Chunks of samples never make a decoder array (its input, any layer's output) above ``max_elements``."""
    from scratchvae.evaluate import iwae_bound

    model = VAE(6, (5,), latent, likelihood, decoder_hidden=decoder_hidden, dtype="float64", seed=0)
    widest = max(model.decoder.sizes)
    max_elements = 3 * batch * widest + 1  # three samples fit, four do not
    seen = []
    for layer in model.decoder.dense:
        forward = layer.forward

        def recorded(x, forward=forward):
            y = forward(x)
            seen.extend([x.size, y.size])
            return y

        monkeypatch.setattr(layer, "forward", recorded)
    x = np.random.default_rng(0).random((batch, 6))
    bound = iwae_bound(model, x, 10, max_elements=max_elements)
    assert np.all(np.isfinite(bound))
    assert max(seen) == 3 * batch * widest  # the widest layer of a three-sample chunk
    seen.clear()
    iwae_bound(model, x, 10, max_elements=batch * widest - 1)  # not even one sample fits: one at a time
    assert max(seen) == batch * widest


@pytest.mark.parametrize(
    "x",
    [0, 3, -3, 2.5, -700.0, 800.0, np.float32(-90.0), np.array(5), np.arange(-3, 4), np.array([-1e4, 0.0, 1e4], np.float32)],
)
def test_softplus_is_log_of_one_plus_exp_for_scalars_integers_and_extremes(x):
    expected = np.logaddexp(0.0, np.asarray(x, dtype=np.float64))
    got = np.asarray(softplus(x))
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=1e-6)
    assert np.all(got >= 0)
    if np.asarray(x).dtype == np.float32:
        assert got.dtype == np.float32


def test_each_log_density_integrates_to_one_and_the_kl_has_its_textbook_values():
    """The normalising constants, checked without the module's own log(2 pi): a density integrates to 1."""
    from scratchvae import losses as L

    grid, dz = np.linspace(-12.0, 12.0, 240_001, retstep=True)
    x = grid[:, None]  # 240001 one-dimensional examples
    mean, log_var = 0.3, 0.4
    for log_density in (
        -L.gaussian_nll(np.full_like(x, mean), x, log_var),  # N(x; 0.3, e^0.4)
        L.log_normal(x, mean, log_var),
        L.log_standard_normal(x),  # N(z; 0, 1)
        L.log_q_reparameterized(np.full_like(x, log_var), (x - mean) / np.exp(0.5 * log_var)),  # q(z) in z
    ):
        assert np.exp(log_density).sum() * dz == pytest.approx(1.0, abs=1e-9)
    # KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2
    kl = L.kl_normal_std(np.array([[1.0, 0.0, 0.5]]), np.array([[0.0, np.log(2.0), -1.0]]))
    assert kl == pytest.approx([0.5 + 0.5 * (2.0 - 1.0 - np.log(2.0)) + 0.5 * (0.25 + np.exp(-1.0) - 1.0 + 1.0)])
