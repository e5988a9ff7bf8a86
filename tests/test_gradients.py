r"""Every hand-written backward pass against float64 central differences.

Each test draws shapes and values with hypothesis and runs
:func:`scratchvae.gradcheck`: a random upstream gradient ``g``, random unit
directions and a few single coordinates, and central differences of
:math:`s = \langle g, f(x)\rangle` with step ``H``. The relative error must stay
below ``RTOL = 1e-6``; a real bug (a dropped 1/2, a wrong sign, a gradient that
does not reach both places a value feeds) gives errors of order 0.1 to 1 in the
function it is in, and still 1e-3 or more in a whole-model check, where the
wrong term is one of many.

Values are drawn on a dyadic grid (multiples of 1/64 or 1/16): bounded, exact
in float32 and float64, and never tiny like 1e-9 (where a finite difference
cannot resolve a derivative at all).

The floor. Rounding leaves an absolute error of about ``eps64 * S / H``
(roughly ``1e-10 * S``) in a central difference, ``S`` being the size of the
terms the checked scalar ``s`` is summed from. So a single coordinate whose
derivative is tiny next to ``S`` cannot be checked to ``RTOL`` in relative
terms, nor can an exactly zero gradient (the KL at ``mu = 0, log_var = 0``,
where the numeric derivative is rounding noise of about 1e-11). gradcheck's
``floor`` is the smallest denominator of its relative error; here it is
``FLOOR_FRAC * max(|grad|, S, 1)`` (``|grad|`` the norm of the whole analytic
gradient, 1 the scale of the drawn values), so such coordinates are compared
in absolute terms, to ``RTOL * FLOOR_FRAC * max(|grad|, S, 1)``: about 1e-9
times the scale of the problem. A derivative of the size the random
directions see, ``|grad| / sqrt(n)``, keeps the full relative test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scratchvae import VAE, Autoencoder, gradcheck, gradcheck_model
from scratchvae import losses
from scratchvae.backend import get_array_module, to_device, to_numpy
from scratchvae.layers import ACTIVATIONS, Dense, ReLU, bind_flat, make_activation
from scratchvae.model import LIKELIHOODS

RTOL = 1e-6  # largest relative error accepted
H = 1e-6  # central-difference step
FLOOR_FRAC = 1e-3  # relative-error denominator >= FLOOR_FRAC * max(|grad|, S, 1); see above

BATCH = st.integers(1, 6)
DIM = st.integers(1, 8)
HIDDEN_ACTIVATIONS = ("relu", "tanh", "softplus", "sigmoid")


# --------------------------------------------------------------------------------------
# Strategies and helpers.
# --------------------------------------------------------------------------------------


def grid(lo, hi, step=1 / 64):
    """Floats ``k * step`` in ``[lo, hi]``."""
    n = round(1 / step)
    return st.integers(math.ceil(lo * n), math.floor(hi * n)).map(lambda k: k / n)


def arrays(shape, lo, hi, step=1 / 64, elements=None):
    """float64 arrays of ``shape`` with elements on the grid (or from ``elements``)."""
    return hnp.arrays(np.float64, shape, elements=grid(lo, hi, step) if elements is None else elements)


def run_gradcheck(forward, backward, inputs, names, seed=0):
    """gradcheck with ``RTOL``, ``H`` and the floor described in the module docstring."""
    xp = get_array_module(*inputs)
    y0 = to_numpy(forward(*inputs))
    d_out = np.random.default_rng(seed).standard_normal(np.shape(y0))
    grads = backward(xp.asarray(d_out))
    norm = math.sqrt(sum(float(np.sum(to_numpy(g) ** 2)) for g in grads if g is not None))
    size = float(np.sum(np.abs(d_out * y0)))
    return gradcheck(
        forward,
        backward,
        inputs,
        names=names,
        d_out=d_out,
        h=H,
        rtol=RTOL,
        floor=FLOOR_FRAC * max(norm, size, 1.0),
        seed=seed,
    )


def assert_gradients(record, label, forward, backward, inputs, names, seed=0):
    result = run_gradcheck(forward, backward, inputs, names, seed)
    record(label, result)
    assert result.ok, str(result)


def run_gradcheck_model(model, *args, seed=0):
    """gradcheck_model with a random scalar upstream gradient and the same floor rule."""
    d_out = float(np.random.default_rng(seed).standard_normal())
    loss, recon, _ = (float(v) for v in model.loss_and_grad(*args))
    norm = abs(d_out) * float(np.linalg.norm(to_numpy(model.grads)))
    size = abs(d_out) * (abs(recon) + abs(loss - recon))
    return gradcheck_model(
        model, *args, d_out=d_out, h=H, rtol=RTOL, floor=FLOOR_FRAC * max(norm, size, 1.0), seed=seed
    )


def check_model(record, label, model, *args, seed=0):
    result = run_gradcheck_model(model, *args, seed=seed)
    record(label, result)
    assert result.ok, str(result)


def perturb(model, seed, scale=0.2):
    """Add N(0, scale^2) noise to every parameter.

    Zero biases and zero inputs would put pre-activations exactly on ReLU's
    kink; after this no bias is zero and no pre-activation sits on the kink.
    """
    noise = np.random.default_rng(seed).standard_normal(model.n_params) * scale
    model.params += to_device(noise, model.xp, model.dtype)
    return model


def _pre_activations(mlp):
    """``(dense, pre-activation)`` of every dense layer in the MLP's last forward pass."""
    return [(dense, dense.x @ dense.W + dense.b) for dense in mlp.dense]


def assume_regular(model, *args):
    """Discard the rare draws where a central difference of the loss says nothing.

    * A pre-activation within 1e-4 of ReLU's kink: a step of ``H`` along a unit
      direction moves it by well under that, but one closer would be straddled.
    * A network output (``mu``, ``log_var``, logits, decoder log-variance) beyond
      +-20: random weights on inputs up to 3 occasionally give ``log_var`` ~ 20
      and then ``exp`` of a decoder output overflows; that is no regime a model
      trains in, and the check would compare infinities.
    """
    model.loss_and_grad(*args)
    for mlp in (model.encoder, model.decoder):
        pre = _pre_activations(mlp)
        assume(float(np.abs(to_numpy(pre[-1][1])).max()) <= 20)
        for (_, y), act in zip(pre, mlp.layers[1::2]):
            if isinstance(act, ReLU):
                assume(float(np.abs(to_numpy(y)).min()) > 1e-4)


# --------------------------------------------------------------------------------------
# Dense layer.
# --------------------------------------------------------------------------------------


@st.composite
def dense_cases(draw):
    batch, n_in, n_out = draw(BATCH), draw(DIM), draw(DIM)
    x = draw(arrays((batch, n_in), -3, 3))
    W = draw(arrays((n_in, n_out), -3, 3))
    b = draw(arrays((n_out,), -3, 3))
    return x, W, b


@given(case=dense_cases(), seed=st.integers(0, 2**16))
def test_dense_gradients_wrt_input_weights_and_bias(backend, xp, record_gradcheck, case, seed):
    x, W, b = (xp.asarray(a) for a in case)
    layer = Dense(*W.shape)
    _, grads = bind_flat([layer], xp, np.float64)  # W, b, d_W, d_b become views

    def forward(x_, W_, b_):
        layer.W[...] = W_
        layer.b[...] = b_
        return layer.forward(x_)

    def backward(d_y):
        forward(x, W, b)  # cache the unperturbed input
        grads[...] = 0  # Dense.backward accumulates into d_W, d_b
        d_x = layer.backward(d_y)
        return d_x, layer.d_W.copy(), layer.d_b.copy()

    assert_gradients(record_gradcheck, "Dense", forward, backward, [x, W, b], ["x", "W", "b"], seed)


def test_dense_backward_accumulates_into_flat_gradient(backend, xp):
    r = np.random.default_rng(0)
    layer = Dense(3, 2)
    params, grads = bind_flat([layer], xp, np.float64)
    params[...] = xp.asarray(r.standard_normal(params.size))
    x, d_y = xp.asarray(r.standard_normal((4, 3))), xp.asarray(r.standard_normal((4, 2)))
    layer.forward(x)
    layer.backward(d_y)
    once = to_numpy(grads).copy()
    layer.backward(d_y)
    np.testing.assert_allclose(to_numpy(grads), 2 * once, rtol=1e-15)
    np.testing.assert_allclose(once[:6].reshape(3, 2), to_numpy(x.T @ d_y), rtol=1e-15)
    np.testing.assert_allclose(once[6:], to_numpy(d_y.sum(axis=0)), rtol=1e-15)


# --------------------------------------------------------------------------------------
# Activations.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_activation_gradient(backend, xp, record_gradcheck, name, data, seed):
    shape = (data.draw(BATCH), data.draw(DIM))
    elements = grid(-3, 3)
    if name == "relu":
        # ReLU has a kink at 0: a central difference across it is meaningless, so keep
        # every element well away from it (the step moves an element by at most H).
        elements = elements.filter(lambda v: abs(v) > 1e-3)
    x = xp.asarray(data.draw(arrays(shape, -3, 3, elements=elements)))
    act = make_activation(name)

    def backward(d_y):
        act.forward(x)  # cache at the unperturbed point
        return act.backward(d_y)

    assert_gradients(record_gradcheck, f"activation {name}", act.forward, backward, [x], ["x"], seed)


# --------------------------------------------------------------------------------------
# Likelihoods, KL, reparameterization.
# --------------------------------------------------------------------------------------


@st.composite
def two_arrays(draw, lo_a, hi_a, lo_b, hi_b, step_b=1 / 64):
    shape = (draw(BATCH), draw(DIM))
    return draw(arrays(shape, lo_a, hi_a)), draw(arrays(shape, lo_b, hi_b, step_b))


@given(case=two_arrays(-6, 6, 0, 1, step_b=1 / 16), seed=st.integers(0, 2**16))
def test_bernoulli_nll_gradient_wrt_logits(backend, xp, record_gradcheck, case, seed):
    logits, x = (xp.asarray(a) for a in case)  # targets x in [0, 1], grey levels included

    assert_gradients(
        record_gradcheck,
        "bernoulli_nll",
        lambda l_: losses.bernoulli_nll(l_, x),
        lambda d: (losses.bernoulli_nll_backward(d, logits, x),),
        [logits],
        ["logits"],
        seed,
    )


@given(case=two_arrays(-3, 3, -3, 3), log_var=grid(-2, 2), seed=st.integers(0, 2**16))
def test_gaussian_nll_gradient_wrt_mean_fixed_scalar_log_var(backend, xp, record_gradcheck, case, log_var, seed):
    mean, x = (xp.asarray(a) for a in case)

    assert_gradients(
        record_gradcheck,
        "gaussian_nll, fixed scalar log_var",
        lambda m: losses.gaussian_nll(m, x, log_var),
        lambda d: (losses.gaussian_nll_backward(d, mean, x, log_var)[0],),
        [mean],
        ["mean"],
        seed,
    )


@given(data=st.data(), seed=st.integers(0, 2**16))
def test_gaussian_nll_gradient_wrt_mean_and_per_element_log_var(backend, xp, record_gradcheck, data, seed):
    mean, log_var = (xp.asarray(a) for a in data.draw(two_arrays(-3, 3, -4, 4)))
    x = xp.asarray(data.draw(arrays(mean.shape, -3, 3)))

    assert_gradients(
        record_gradcheck,
        "gaussian_nll, per-element log_var",
        lambda m, lv: losses.gaussian_nll(m, x, lv),
        lambda d: losses.gaussian_nll_backward(d, mean, x, log_var),
        [mean, log_var],
        ["mean", "log_var"],
        seed,
    )


@given(case=two_arrays(-3, 3, -4, 4), seed=st.integers(0, 2**16))
def test_kl_normal_std_gradient_wrt_mu_and_log_var(backend, xp, record_gradcheck, case, seed):
    mu, log_var = (xp.asarray(a) for a in case)

    assert_gradients(
        record_gradcheck,
        "kl_normal_std",
        losses.kl_normal_std,
        lambda d: losses.kl_normal_std_backward(d, mu, log_var),
        [mu, log_var],
        ["mu", "log_var"],
        seed,
    )


@given(data=st.data(), seed=st.integers(0, 2**16))
def test_reparameterize_gradient_wrt_mu_and_log_var(backend, xp, record_gradcheck, data, seed):
    mu, log_var = (xp.asarray(a) for a in data.draw(two_arrays(-3, 3, -4, 4)))
    eps = xp.asarray(data.draw(arrays(mu.shape, -3, 3)))  # fixed noise

    def backward(d_z):
        _, sigma = losses.reparameterize(mu, log_var, eps)
        return losses.reparameterize_backward(d_z, eps, sigma)

    assert_gradients(
        record_gradcheck,
        "reparameterize",
        lambda m, lv: losses.reparameterize(m, lv, eps)[0],
        backward,
        [mu, log_var],
        ["mu", "log_var"],
        seed,
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bernoulli_nll_is_finite_and_exact_at_extreme_logits(backend, xp, dtype):
    logits = xp.asarray([[1000.0, -1000.0, 1000.0, -1000.0, 0.0]], dtype=dtype)
    x = xp.asarray([[1.0, 0.0, 0.0, 1.0, 0.5]], dtype=dtype)
    nll = to_numpy(losses.bernoulli_nll(logits, x))
    d_logits = to_numpy(losses.bernoulli_nll_backward(1.0, logits, x))
    # terms: 0, 0, 1000, 1000, log 2
    np.testing.assert_allclose(nll, [2000.0 + math.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(d_logits, [[0.0, 0.0, 1.0, -1.0, 0.0]], atol=1e-7)


# --------------------------------------------------------------------------------------
# Whole models: the gradient of the loss with respect to the flat parameter buffer.
# --------------------------------------------------------------------------------------


@st.composite
def vae_cases(draw, likelihood):
    D, J, B = draw(DIM), draw(st.integers(1, 4)), draw(BATCH)
    hidden = tuple(draw(st.lists(DIM, max_size=2)))
    decoder_hidden = draw(st.none() | st.lists(DIM, max_size=2).map(tuple))
    lo, hi = (0, 1) if likelihood == "bernoulli" else (-3, 3)
    return {
        "config": dict(
            input_dim=D,
            hidden=hidden,
            latent_dim=J,
            likelihood=likelihood,
            decoder_hidden=decoder_hidden,
            gaussian_log_var=draw(grid(-2, 2, 1 / 8)),
            log_var_bound=draw(st.sampled_from([losses.LOG_VAR_BOUND, 3.0, None])),  # every branch of the bound
            seed=draw(st.integers(0, 2**16)),
        ),
        "x": draw(arrays((B, D), lo, hi, step=1 / 16)),
        "eps": draw(arrays((B, J), -3, 3)),
        "perturb_seed": draw(st.integers(0, 2**16)),
    }


def build_vae(case, activation, backend, dtype="float64"):
    model = VAE(**case["config"], activation=activation, backend=backend, dtype=dtype)
    perturb(model, case["perturb_seed"])
    return model, to_device(case["x"], model.xp, model.dtype), to_device(case["eps"], model.xp, model.dtype)


@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@settings(max_examples=15)
@given(data=st.data())
def test_vae_loss_gradient_wrt_all_parameters(backend, record_gradcheck, likelihood, activation, data):
    case = data.draw(vae_cases(likelihood))
    model, x, eps = build_vae(case, activation, backend)
    assume_regular(model, x, eps)
    check_model(record_gradcheck, f"VAE {likelihood}/{activation}", model, x, eps, seed=case["perturb_seed"])


@pytest.mark.parametrize("bound", [None, 2.0])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_vae_gradient_with_and_without_the_log_var_bound(backend, record_gradcheck, likelihood, bound):
    """Both branches of the log-variance bound in a whole model: none, and a tight one that bends ordinary outputs."""
    model = VAE(7, (6,), 3, likelihood, "tanh", log_var_bound=bound, backend=backend, dtype="float64", seed=5)
    perturb(model, 5, scale=0.5)
    r = np.random.default_rng(5)
    x = to_device(r.random((4, 7)) if likelihood == "bernoulli" else r.standard_normal((4, 7)), model.xp)
    eps = to_device(r.standard_normal((4, 3)), model.xp)
    check_model(record_gradcheck, f"VAE {likelihood}, log_var_bound={bound}", model, x, eps, seed=5)


@given(data=st.data(), beta=grid(0, 4, 1 / 8), activation=st.sampled_from(HIDDEN_ACTIVATIONS))
def test_vae_beta_weights_the_kl_term_in_loss_and_gradient(backend, record_gradcheck, data, beta, activation):
    likelihood = data.draw(st.sampled_from(LIKELIHOODS))
    case = data.draw(vae_cases(likelihood))
    model, x, eps = build_vae(case, activation, backend)
    assume_regular(model, x, eps)

    model.loss_and_grad(x, eps, 0.0)
    g_recon = to_numpy(model.grads).copy()
    model.loss_and_grad(x, eps, 1.0)
    g_elbo = to_numpy(model.grads).copy()
    out = model.loss_and_grad(x, eps, beta)
    loss, recon, kl = (float(v) for v in out)
    # loss = recon + beta * kl, and the gradient is linear in beta the same way
    assert loss == pytest.approx(recon + beta * kl, rel=1e-12, abs=1e-12)
    expected = g_recon + beta * (g_elbo - g_recon)
    scale = np.linalg.norm(g_recon) + beta * np.linalg.norm(g_elbo - g_recon)
    assert np.linalg.norm(to_numpy(model.grads) - expected) <= 1e-12 * scale + 1e-300
    check_model(record_gradcheck, "VAE with beta", model, x, eps, beta, seed=case["perturb_seed"])


@pytest.mark.parametrize("output", ["sigmoid", "identity"])
@pytest.mark.parametrize("activation", HIDDEN_ACTIVATIONS)
@settings(max_examples=15)
@given(data=st.data())
def test_autoencoder_loss_gradient_wrt_all_parameters(backend, record_gradcheck, activation, output, data):
    D, J, B = data.draw(DIM), data.draw(st.integers(1, 4)), data.draw(BATCH)
    hidden = tuple(data.draw(st.lists(DIM, max_size=2)))
    seed = data.draw(st.integers(0, 2**16))
    model = Autoencoder(
        D, hidden, J, activation, output=output, backend=backend, dtype="float64", seed=seed
    )
    perturb(model, seed + 1)
    x = to_device(data.draw(arrays((B, D), 0, 1, step=1 / 16)), model.xp)
    assume_regular(model, x)
    check_model(record_gradcheck, f"Autoencoder {activation}/{output}", model, x, seed=seed)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@settings(max_examples=10)
@given(data=st.data(), activation=st.sampled_from(HIDDEN_ACTIVATIONS))
def test_vae_gradient_in_each_dtype_matches_float64_reference(
    backend, xp, dtype, dtype_rtol, likelihood, data, activation
):
    """The same parameters, data and noise give the float64 CPU gradient to ``DTYPE_RTOL[dtype]``."""
    case = data.draw(vae_cases(likelihood))
    reference, x_ref, eps_ref = build_vae(case, activation, "numpy", "float64")
    assume_regular(reference, x_ref, eps_ref)
    model = VAE(**case["config"], activation=activation, backend=backend, dtype=dtype)
    model.params[...] = to_device(reference.params, xp, model.dtype)
    reference.params[...] = to_numpy(model.params)  # both now hold the dtype-rounded values
    x, eps = (to_device(a, xp, model.dtype) for a in (case["x"], case["eps"]))

    ref_out = reference.loss_and_grad(to_numpy(x).astype(np.float64), to_numpy(eps).astype(np.float64))
    out = model.loss_and_grad(x, eps)

    assert model.grads.dtype == np.dtype(dtype)
    g_ref, g = reference.grads, to_numpy(model.grads).astype(np.float64)
    rel = np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-300)
    assert rel <= dtype_rtol, f"{dtype} gradient differs from float64 by {rel:.2e} of its norm"
    # The loss is a sum of terms of both signs and can sit near zero: compare on the
    # scale of its parts.
    scale = abs(float(ref_out.recon)) + abs(float(ref_out.kl)) + 1.0
    assert abs(float(out.loss) - float(ref_out.loss)) <= dtype_rtol * scale


# --------------------------------------------------------------------------------------
# The checker itself: it must fail, and say where, on a wrong backward.
# --------------------------------------------------------------------------------------


def _mu_log_var_eps(xp):
    r = np.random.default_rng(7)
    return tuple(xp.asarray(r.uniform(-2, 2, (4, 3))) for _ in range(3))


def test_gradcheck_fails_on_reparameterize_backward_using_sigma_for_half_sigma(backend, xp):
    mu, log_var, eps = _mu_log_var_eps(xp)

    def forward(m, lv):
        return losses.reparameterize(m, lv, eps)[0]

    def wrong_backward(d_z):
        sigma = xp.exp(0.5 * log_var)
        return d_z, d_z * eps * sigma  # should be 0.5 * sigma

    def right_backward(d_z):
        _, sigma = losses.reparameterize(mu, log_var, eps)
        return losses.reparameterize_backward(d_z, eps, sigma)

    assert run_gradcheck(forward, right_backward, [mu, log_var], ["mu", "log_var"]).ok
    result = run_gradcheck(forward, wrong_backward, [mu, log_var], ["mu", "log_var"])
    assert not result.ok
    assert "(log_var)" in result.where and str(result).startswith("gradcheck FAILED")
    assert result.max_rel_error > 0.3  # |2a - a| / (|2a| + |a|) = 1/3
    assert all(err <= RTOL for where, _, _, err in result.checks if "(mu)" in where)


def test_gradcheck_fails_on_kl_backward_without_the_half(backend, xp):
    mu, log_var, _ = _mu_log_var_eps(xp)

    def wrong_backward(d_kl):
        d = d_kl[:, None]
        return d * mu, d * (xp.exp(log_var) - 1.0)  # should be 0.5 * (exp(log_var) - 1)

    result = run_gradcheck(losses.kl_normal_std, wrong_backward, [mu, log_var], ["mu", "log_var"])
    assert not result.ok
    assert "(log_var)" in result.where
    assert result.max_rel_error > 0.3
    assert all(err <= RTOL for where, _, _, err in result.checks if "(mu)" in where)


def test_gradcheck_model_fails_on_vae_with_wrong_reparameterize_backward(backend, monkeypatch):
    model = perturb(VAE(5, (4,), 2, activation="tanh", backend=backend, dtype="float64", seed=3), 3)
    r = np.random.default_rng(3)
    x = to_device(r.random((3, 5)), model.xp)
    eps = to_device(r.standard_normal((3, 2)), model.xp)
    assert run_gradcheck_model(model, x, eps).ok

    monkeypatch.setattr(losses, "reparameterize_backward", lambda d_z, eps, sigma: (d_z, d_z * eps * sigma))
    result = run_gradcheck_model(model, x, eps)
    assert not result.ok, str(result)
    assert "(params)" in result.where
    assert result.max_rel_error > 1e-3


@given(h=arrays(st.integers(1, 12), -200, 200, step=1 / 8), bound=st.sampled_from([5.0, losses.LOG_VAR_BOUND, None]))
def test_bound_log_var_gradient(backend, xp, record_gradcheck, h, bound):
    h = xp.asarray(h)
    assert_gradients(
        record_gradcheck,
        "bound_log_var",
        lambda a: losses.bound_log_var(a, bound),
        lambda d: (losses.bound_log_var_backward(d, losses.bound_log_var(h, bound), bound),),
        [h],
        ["h"],
    )
