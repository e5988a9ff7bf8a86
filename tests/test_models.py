"""The VAE, the autoencoder and the optimisers: training, the flat buffer, seeding, shapes, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scratchvae import SGD, VAE, Adam, Autoencoder, BackendError
from scratchvae.backend import to_device, to_numpy
from scratchvae.model import LIKELIHOODS

# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def binary_patterns(n=256, dim=32, n_prototypes=4, flip=0.02, seed=0):
    """``n`` binary vectors: one of a few random prototypes each, with a fraction ``flip`` of bits flipped."""
    r = np.random.default_rng(seed)
    prototypes = r.random((n_prototypes, dim)) < 0.5
    labels = r.integers(n_prototypes, size=n)
    flips = r.random((n, dim)) < flip
    return (prototypes[labels] ^ flips).astype(np.float64)


def small_vae(backend, dtype="float64", likelihood="bernoulli", seed=0, **kw):
    return VAE(12, (10, 6), 3, likelihood, "tanh", backend=backend, dtype=dtype, seed=seed, **kw)


def data(xp, dtype, batch=5, dim=12, seed=1):
    return to_device(np.random.default_rng(seed).random((batch, dim)), xp, dtype)


def noise(xp, dtype, batch=5, latent=3, seed=2):
    return to_device(np.random.default_rng(seed).standard_normal((batch, latent)), xp, dtype)


def all_dense(model):
    return model.encoder.dense + model.decoder.dense


# --------------------------------------------------------------------------------------
# Training lowers the loss.
# --------------------------------------------------------------------------------------

# (model, optimiser, optimiser arguments, final / initial loss must be below this)
# Seen on this data: about 0.2 for the VAE (Adam and SGD), 0.05-0.12 for the autoencoder.
TRAINING_CASES = {
    "vae-adam": ("vae", Adam, {"lr": 1e-2}, 0.5),
    "vae-sgd-momentum": ("vae", SGD, {"lr": 5e-3, "momentum": 0.9}, 0.5),
    "autoencoder-adam": ("autoencoder", Adam, {"lr": 1e-2}, 0.25),
    # lr 0.1 sits on the edge of stability here (float32 rounding decides the outcome); 0.05 is well inside
    "autoencoder-sgd-momentum": ("autoencoder", SGD, {"lr": 0.05, "momentum": 0.9}, 0.25),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_lowers_the_loss(backend, xp, dtype, case):
    kind, optimizer, kwargs, max_ratio = TRAINING_CASES[case]
    x = to_device(binary_patterns(), xp, dtype)
    if kind == "vae":
        model = VAE(32, (32,), 4, backend=backend, dtype=dtype, seed=0)
        eps = model.rng.normal((x.shape[0], 4), model.dtype)
        full_loss = lambda: float(model.loss_and_grad(x, eps).loss)  # noqa: E731
    else:
        model = Autoencoder(32, (32,), 4, backend=backend, dtype=dtype, seed=0)
        full_loss = lambda: float(model.loss_and_grad(x).loss)  # noqa: E731
    opt = optimizer(model, **kwargs)
    batches = np.random.default_rng(1)

    initial = full_loss()
    losses = []
    for _ in range(300):
        batch = x[xp.asarray(batches.integers(x.shape[0], size=32))]
        losses.append(float(model.loss_and_grad(batch).loss))
        opt.step()
    final = float(np.mean(losses[-20:]))

    assert np.all(np.isfinite(losses))
    assert final < max_ratio * initial, f"{case}: loss {initial:.3f} -> {final:.3f}, wanted below {max_ratio} x"
    assert full_loss() < max_ratio * initial


# --------------------------------------------------------------------------------------
# One flat buffer.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vae", "gaussian_learned", "autoencoder"])
def test_parameters_are_one_flat_buffer_viewed_by_every_layer(backend, xp, dtype, kind):
    if kind == "autoencoder":
        model = Autoencoder(7, (5, 4), 2, backend=backend, dtype=dtype)
    else:
        model = VAE(7, (5, 4), 2, "bernoulli" if kind == "vae" else kind, backend=backend, dtype=dtype)
    dense = all_dense(model)
    n = sum(layer.n_in * layer.n_out + layer.n_out for layer in dense)

    assert model.params.ndim == 1 and model.params.size == n == model.n_params
    assert model.params.flags.c_contiguous and model.grads.flags.c_contiguous
    assert model.grads.shape == model.params.shape
    assert model.params.dtype == model.grads.dtype == np.dtype(dtype)

    # Writing the flat buffer writes every layer's W and b (and d_W, d_b), in order.
    model.params[...] = xp.arange(n, dtype=model.dtype)
    model.grads[...] = -xp.arange(n, dtype=model.dtype)
    offset = 0
    for layer in dense:
        k = layer.n_in * layer.n_out
        expected_W = np.arange(offset, offset + k).reshape(layer.n_in, layer.n_out)
        expected_b = np.arange(offset + k, offset + k + layer.n_out)
        np.testing.assert_array_equal(to_numpy(layer.W), expected_W)
        np.testing.assert_array_equal(to_numpy(layer.b), expected_b)
        np.testing.assert_array_equal(to_numpy(layer.d_W), -expected_W)
        np.testing.assert_array_equal(to_numpy(layer.d_b), -expected_b)
        offset += layer.size
    # ... and writing a layer's W writes the flat buffer.
    dense[-1].W[0, 0] = 0.5
    assert float(model.params[n - dense[-1].size]) == 0.5

    # loss_and_grad fills the same gradient buffer, and the optimiser updates the same params.
    model.params[...] = to_device(np.random.default_rng(0).standard_normal(n) * 0.1, xp, dtype)
    grads_buffer = model.grads
    x = data(xp, dtype, dim=7)
    if kind == "autoencoder":
        model.loss_and_grad(x)
    else:
        model.loss_and_grad(x, noise(xp, dtype, latent=2))
    assert model.grads is grads_buffer
    assert float(xp.abs(dense[0].d_W).sum()) > 0
    before = to_numpy(dense[0].W).copy()
    opt = Adam(model, lr=0.1)
    assert opt.params is model.params and opt.grads is model.grads
    opt.step()
    assert not np.array_equal(to_numpy(dense[0].W), before)


# --------------------------------------------------------------------------------------
# Determinism and seeding.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_loss_and_grad_is_deterministic_given_eps(backend, xp, dtype, likelihood):
    model = small_vae(backend, dtype, likelihood)
    x, eps = data(xp, dtype), noise(xp, dtype)
    first = [float(v) for v in model.loss_and_grad(x, eps)]
    grads = to_numpy(model.grads).copy()
    model.loss_and_grad(x)  # a draw from the model's own generator in between changes nothing
    second = [float(v) for v in model.loss_and_grad(x, eps)]
    assert first == second
    np.testing.assert_array_equal(to_numpy(model.grads), grads)


def test_without_eps_the_noise_is_drawn_from_the_models_seeded_generator(backend, xp):
    a, b = small_vae(backend, seed=4), small_vae(backend, seed=4)
    x = data(xp, "float64")
    losses_a = [float(a.loss_and_grad(x).loss) for _ in range(3)]
    losses_b = [float(b.loss_and_grad(x).loss) for _ in range(3)]
    assert losses_a == losses_b  # same seed, same noise sequence
    assert len(set(losses_a)) == 3  # fresh noise on every call
    # and it is exactly the first draw of a fresh model's generator
    eps = small_vae(backend, seed=4).rng.normal((5, 3), np.float64)
    assert float(small_vae(backend, seed=4).loss_and_grad(x, eps).loss) == losses_a[0]


@pytest.mark.parametrize("kind", ["vae", "autoencoder"])
def test_same_seed_same_parameters_different_seed_different(backend, dtype, kind):
    make = {
        "vae": lambda seed: VAE(10, (8,), 3, backend=backend, dtype=dtype, seed=seed),
        "autoencoder": lambda seed: Autoencoder(10, (8,), 3, backend=backend, dtype=dtype, seed=seed),
    }[kind]
    np.random.seed(0)
    p0 = to_numpy(make(0).params)
    np.random.seed(1)  # global numpy state is never read
    np.random.rand(10)
    np.testing.assert_array_equal(to_numpy(make(0).params), p0)
    assert not np.array_equal(to_numpy(make(1).params), p0)


def test_initialisation_is_he_for_relu_and_glorot_otherwise_with_zero_biases(backend):
    model = VAE(784, (400,), 20, activation="relu", backend=backend, dtype="float64", seed=0)
    first, *rest = all_dense(model)
    # He normal: W ~ N(0, 2 / n_in); 313600 draws give the std to well under 1%
    W = to_numpy(first.W)
    assert abs(W.mean()) < 5 * math.sqrt(2 / 784) / math.sqrt(W.size)
    assert W.std() == pytest.approx(math.sqrt(2 / 784), rel=0.01)
    for layer in all_dense(model):
        assert not np.any(to_numpy(layer.b))
    # Glorot uniform on the linear output layers: |W| <= sqrt(6 / (n_in + n_out)), std = bound / sqrt(3)
    for layer in (model.encoder.dense[-1], model.decoder.dense[-1]):
        bound = math.sqrt(6 / (layer.n_in + layer.n_out))
        W = to_numpy(layer.W)
        assert np.abs(W).max() <= bound
        assert W.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    # tanh hidden layers are Glorot too
    tanh_model = VAE(784, (400,), 20, activation="tanh", backend=backend, dtype="float64", seed=0)
    assert np.abs(to_numpy(tanh_model.encoder.dense[0].W)).max() <= math.sqrt(6 / (784 + 400))


def test_fan_in_uniform_draws_weights_and_biases_from_plus_minus_one_over_root_fan_in(backend):
    """torch.nn.Linear's default: W and b uniform on (-1/sqrt(n_in), 1/sqrt(n_in)), mean 0, std bound / sqrt(3)."""
    model = VAE(784, (400,), 20, init="fan_in_uniform", backend=backend, dtype="float64", seed=0)
    for layer in all_dense(model):
        bound = 1 / math.sqrt(layer.n_in)
        for a in (to_numpy(layer.W), to_numpy(layer.b)):
            assert np.abs(a).max() <= bound
            assert abs(a.mean()) < 5 * bound / math.sqrt(3 * a.size)
            if a.size >= 400:
                assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)


# --------------------------------------------------------------------------------------
# Optimisers against step-by-step references.
# --------------------------------------------------------------------------------------


class Quadratic:
    r"""Toy objective :math:`L(p) = \tfrac12\sum_i a_i (p_i - c_i)^2`.

    It has the ``params`` and ``grads`` buffers an optimiser needs.
    """

    A = np.array([1.0, 10.0, 0.1, 3.0, 0.5])
    C = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    P0 = np.array([0.0, 1.0, -1.0, 2.0, 0.3])

    def __init__(self, xp, dtype):
        self.params = to_device(self.P0, xp, dtype)
        self.grads = xp.zeros_like(self.params)
        self.a, self.c = to_device(self.A, xp, dtype), to_device(self.C, xp, dtype)

    def loss_and_grad(self):
        self.grads[...] = self.a * (self.params - self.c)

    @classmethod
    def grad(cls, p):
        return cls.A * (p - cls.C)


@pytest.mark.parametrize("eps", [1e-8, 0.1])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.8)])
def test_adam_matches_reference(backend, xp, dtype, dtype_rtol, betas, weight_decay, eps):
    lr, (b1, b2) = 0.05, betas
    toy = Quadratic(xp, dtype)
    opt = Adam(toy, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    p, m, v = Quadratic.P0.copy(), np.zeros(5), np.zeros(5)
    for t in range(1, 21):
        toy.loss_and_grad()
        opt.step()
        # the textbook algorithm, one line per formula
        g = Quadratic.grad(p) + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(to_numpy(toy.params), p, rtol=dtype_rtol, atol=dtype_rtol, err_msg=f"step {t}")
        np.testing.assert_allclose(to_numpy(opt.m), m, rtol=dtype_rtol, atol=dtype_rtol * abs(m).max())
        np.testing.assert_allclose(to_numpy(opt.v), v, rtol=dtype_rtol, atol=dtype_rtol * abs(v).max())
    assert opt.t == 20


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_momentum_matches_reference(backend, xp, dtype, dtype_rtol, momentum, weight_decay):
    lr = 0.02
    toy = Quadratic(xp, dtype)
    opt = SGD(toy, lr=lr, momentum=momentum, weight_decay=weight_decay)
    p, velocity = Quadratic.P0.copy(), np.zeros(5)
    for t in range(1, 21):
        toy.loss_and_grad()
        opt.step()
        g = Quadratic.grad(p) + weight_decay * p
        velocity = momentum * velocity + g
        p = p - lr * velocity
        np.testing.assert_allclose(to_numpy(toy.params), p, rtol=dtype_rtol, atol=dtype_rtol, err_msg=f"step {t}")


def stop_and_resume(xp, dtype, make_opt, saved_state):
    """Run ``make_opt``'s optimiser on a toy problem for 5 + 5 steps, and again from ``saved_state(opt)`` taken after 5.

    Returns the parameters of the straight run, those of the resumed one, the
    resumed optimiser and the state it started from.
    """

    def run(opt, toy, steps):
        for _ in range(steps):
            toy.loss_and_grad()
            opt.step()

    toy = Quadratic(xp, dtype)
    opt = make_opt(toy)
    run(opt, toy, 5)
    state = saved_state(opt)
    params = toy.params.copy()
    run(opt, toy, 5)

    resumed = Quadratic(xp, dtype)
    resumed.params[...] = params
    opt2 = make_opt(resumed)
    opt2.load_state_dict(state)
    run(opt2, resumed, 5)
    return to_numpy(toy.params), to_numpy(resumed.params), opt2, state


@pytest.mark.parametrize("optimizer", [Adam, SGD])
def test_optimizer_resumes_exactly_from_its_state_dict(backend, xp, dtype, optimizer):
    def copy_of_state(opt):
        return {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state_dict().items()}

    straight, resumed, _, _ = stop_and_resume(xp, dtype, lambda toy: optimizer(toy, lr=0.05), copy_of_state)
    np.testing.assert_array_equal(resumed, straight)


@pytest.mark.parametrize("optimizer", [Adam, SGD])
def test_a_state_with_a_missing_entry_changes_nothing(backend, xp, optimizer):
    toy = Quadratic(xp, "float64")
    opt = optimizer(toy, lr=0.05)
    for _ in range(3):
        toy.loss_and_grad()
        opt.step()
    before = {k: (to_numpy(v).copy() if hasattr(v, "shape") else v) for k, v in opt.state_dict().items()}
    partial = {k: v * 2 for k, v in opt.state_dict().items() if k == "t"}  # the step count alone
    with pytest.raises(KeyError):
        opt.load_state_dict(partial)
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(to_numpy(v) if hasattr(v, "shape") else v, before[k])


# --------------------------------------------------------------------------------------
# Shapes, ranges and the ELBO.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_vae_shapes_dtypes_and_ranges(backend, xp, dtype, likelihood):
    model = small_vae(backend, dtype, likelihood)
    x = data(xp, dtype, batch=5)

    mu, log_var = model.encode(x)
    z = model.rng.normal((4, 3), model.dtype)
    outputs = {
        "mu": (mu, (5, 3)),
        "log_var": (log_var, (5, 3)),
        "decode": (model.decode(z), (4, 12)),
        "reconstruct": (model.reconstruct(x), (5, 12)),
        "sample": (model.sample(6), (6, 12)),
        "elbo": (model.elbo(x), (5,)),
    }
    for name, (out, shape) in outputs.items():
        assert isinstance(out, xp.ndarray), name
        assert out.shape == shape and out.dtype == np.dtype(dtype), (name, out.shape, out.dtype)
        assert bool(xp.isfinite(out).all()), name
    if likelihood == "bernoulli":
        for name in ("decode", "reconstruct", "sample"):
            out = to_numpy(outputs[name][0])
            assert out.min() >= 0 and out.max() <= 1, name  # pixel probabilities
        # -log p(x|z) >= 0 for targets in [0, 1] and KL >= 0, so the ELBO is <= 0
        assert to_numpy(outputs["elbo"][0]).max() <= 0


def test_autoencoder_shapes_and_ranges(backend, xp, dtype):
    model = Autoencoder(12, (10,), 3, backend=backend, dtype=dtype)
    x = data(xp, dtype)
    code, x_hat = model.encode(x), model.reconstruct(x)
    assert code.shape == (5, 3) and x_hat.shape == (5, 12)
    assert code.dtype == x_hat.dtype == np.dtype(dtype)
    assert float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1  # sigmoid output
    np.testing.assert_array_equal(to_numpy(model.decode(code)), to_numpy(x_hat))
    out = model.loss_and_grad(x)
    expected = float(((to_numpy(x_hat).astype(np.float64) - to_numpy(x)) ** 2).sum(axis=1).mean())
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert float(out.kl) == 0.0 and float(out.recon) == float(out.loss)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_elbo_is_minus_the_loss_per_example(backend, xp, dtype, dtype_rtol, likelihood):
    model = small_vae(backend, dtype, likelihood, gaussian_log_var=-1.0)
    x, eps = data(xp, dtype), noise(xp, dtype)
    elbo = to_numpy(model.elbo(x, eps)).astype(np.float64)

    # one example at a time: elbo_b = -(recon_b + kl_b)
    for b in range(x.shape[0]):
        out = model.loss_and_grad(x[b : b + 1], eps[b : b + 1])
        assert float(out.loss) == pytest.approx(float(out.recon) + float(out.kl), rel=dtype_rtol)
        assert -elbo[b] == pytest.approx(float(out.loss), rel=dtype_rtol, abs=dtype_rtol)
    # the batch loss is the mean over examples
    out = model.loss_and_grad(x, eps)
    assert -elbo.mean() == pytest.approx(float(out.loss), rel=dtype_rtol, abs=dtype_rtol)


def test_elbo_takes_host_noise_like_loss_and_grad(backend, xp, dtype, dtype_rtol):
    """``eps`` may come from the host in float64 for both methods; it is moved and cast alike."""
    model = small_vae(backend, dtype)
    x = data(xp, dtype)
    eps_host = np.random.default_rng(2).standard_normal((5, 3))  # numpy, float64
    elbo = model.elbo(x, eps_host)
    assert isinstance(elbo, xp.ndarray) and elbo.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(to_numpy(elbo), to_numpy(model.elbo(x, to_device(eps_host, xp, dtype))))
    assert -float(elbo.mean()) == pytest.approx(float(model.loss_and_grad(x, eps_host).loss), rel=dtype_rtol)


# --------------------------------------------------------------------------------------
# Bad input: ValueError naming the problem.
# --------------------------------------------------------------------------------------

D = 12
BAD_BATCHES = {
    "wrong feature dimension": (np.zeros((2, D + 1)), r"shape \(batch, 12\), got \(2, 13\)"),
    "1-D input": (np.zeros(D), r"shape \(batch, 12\), got \(12,\)"),
    "3-D input": (np.zeros((2, D, 1)), r"shape \(batch, 12\)"),
    "empty batch": (np.zeros((0, D)), "empty batch"),
    "NaN": (np.full((2, D), np.nan), "NaN or inf"),
    "inf": (np.full((2, D), np.inf), "NaN or inf"),
    "integer dtype": (np.ones((2, D), dtype=np.int64), "floating-point.*int64"),
    "uint8 images": (np.ones((2, D), dtype=np.uint8), "floating-point.*uint8"),
    "bool dtype": (np.ones((2, D), dtype=bool), "floating-point.*bool"),
    "object dtype": (np.full((2, D), 0.5, dtype=object), "floating-point.*object"),
    "nested lists of str": ([["0.5"] * D] * 2, "floating-point"),
}
OUT_OF_RANGE = {
    "above 1": (np.full((2, D), 1.5), r"\[0, 1\]"),
    "below 0": (np.full((2, D), -0.1), r"\[0, 1\]"),
}


@pytest.mark.parametrize("problem", list(BAD_BATCHES) + list(OUT_OF_RANGE))
@pytest.mark.parametrize("method", ["loss_and_grad", "elbo"])
def test_bernoulli_vae_rejects_bad_batches(backend, problem, method):
    model = small_vae(backend, "float32")
    x, match = {**BAD_BATCHES, **OUT_OF_RANGE}[problem]
    with pytest.raises(ValueError, match=match):
        getattr(model, method)(x)


@pytest.mark.parametrize("problem", list(BAD_BATCHES))
@pytest.mark.parametrize(
    "method", ["vae.encode", "vae.reconstruct", "gaussian.loss_and_grad", "autoencoder.loss_and_grad"]
)
def test_every_entry_point_rejects_bad_batches(backend, problem, method):
    models = {
        "vae": small_vae(backend, "float32"),
        "gaussian": small_vae(backend, "float32", "gaussian"),
        "autoencoder": Autoencoder(D, (10,), 3, backend=backend),
    }
    owner, name = method.split(".")
    x, match = BAD_BATCHES[problem]
    with pytest.raises(ValueError, match=match):
        getattr(models[owner], name)(x)


@pytest.mark.parametrize("problem", list(OUT_OF_RANGE))
def test_gaussian_vae_accepts_values_outside_unit_interval(backend, problem):
    model = small_vae(backend, "float64", "gaussian")
    x, _ = OUT_OF_RANGE[problem]
    assert np.isfinite(float(model.loss_and_grad(x).loss))
    autoencoder = Autoencoder(D, (6,), 2, output="identity", backend=backend, dtype="float64")
    assert np.isfinite(float(autoencoder.loss_and_grad(x).loss))


@pytest.mark.parametrize("method", ["loss_and_grad", "elbo"])
def test_wrong_eps_shape_is_rejected(backend, xp, method):
    model = small_vae(backend)
    with pytest.raises(ValueError, match=r"eps must have shape \(5, 3\), got \(1, 3\)"):
        getattr(model, method)(data(xp, "float64"), noise(xp, "float64", batch=1))


def test_decode_and_sample_reject_bad_arguments(backend, xp):
    model = small_vae(backend)
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 3\), got \(2, 4\)"):
        model.decode(xp.zeros((2, 4)))
    with pytest.raises(ValueError, match="n must be positive"):
        model.sample(0)


BAD_CONSTRUCTORS = {
    "unknown likelihood": (dict(likelihood="poisson"), "unknown likelihood 'poisson'"),
    "unknown activation": (dict(activation="gelu"), "unknown activation 'gelu'"),
    "unknown activation, no hidden layer": (dict(hidden=(), activation="gelu"), "unknown activation 'gelu'"),
    "unknown dtype": (dict(dtype="float16"), "unsupported dtype 'float16'"),
    "integer dtype": (dict(dtype=np.int32), "unsupported dtype"),
    "zero hidden size": (dict(hidden=(8, 0)), r"hidden sizes must be positive, got \(8, 0\)"),
    "negative hidden size": (dict(hidden=-3), r"hidden sizes must be positive"),
    "hidden not a sequence of ints": (dict(hidden="wide"), "hidden must be a sequence of positive ints"),
    "hidden None": (dict(hidden=None), "hidden must be a sequence of positive ints"),
    "zero decoder_hidden size": (dict(decoder_hidden=(0,)), "decoder_hidden sizes must be positive"),
    "zero input_dim": (dict(input_dim=0), "input_dim and latent_dim must be positive"),
    "zero latent_dim": (dict(latent_dim=0), "input_dim and latent_dim must be positive"),
    "non-finite gaussian_log_var": (dict(gaussian_log_var=float("nan")), "gaussian_log_var must be finite"),
    "zero log_var_bound": (dict(log_var_bound=0.0), "log_var_bound must be a positive number or None"),
    "negative log_var_bound": (dict(log_var_bound=-2.0), "log_var_bound must be a positive number or None"),
    "infinite log_var_bound": (dict(log_var_bound=float("inf")), "log_var_bound must be a positive number or None"),
}


def test_the_constructors_defaults_are_the_documented_ones():
    """784-400-20, Bernoulli, ReLU, mirrored decoder, unit Gaussian variance, bound 30, float32, seed 0."""
    assert VAE(784, backend="numpy").config() == {
        "model": "VAE", "input_dim": 784, "hidden": [400], "latent_dim": 20, "likelihood": "bernoulli",
        "activation": "relu", "decoder_hidden": [400], "gaussian_log_var": 0.0, "log_var_bound": 30.0,
        "init": "auto", "dtype": "float32", "seed": 0,
    }  # fmt: skip
    assert Autoencoder(784, backend="numpy").config() == {
        "model": "Autoencoder", "input_dim": 784, "hidden": [400], "latent_dim": 20, "activation": "relu",
        "output": "sigmoid", "init": "auto", "dtype": "float32", "seed": 0,
    }  # fmt: skip


def test_small_log_var_bounds_and_one_sample_are_accepted(backend, xp):
    model = small_vae(backend, log_var_bound=0.5)
    assert model.log_var_bound == 0.5
    assert np.isfinite(float(model.loss_and_grad(data(xp, "float64")).loss))
    assert model.sample(1).shape == (1, 12)


@pytest.mark.parametrize("problem", list(BAD_CONSTRUCTORS))
def test_vae_constructor_rejects_bad_arguments(backend, problem):
    kwargs, match = BAD_CONSTRUCTORS[problem]
    args = dict(input_dim=D, hidden=(8,), latent_dim=2, backend=backend) | kwargs
    with pytest.raises(ValueError, match=match):
        VAE(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output="softmax"), "unknown output 'softmax'"),
        (dict(output="relu"), "unknown output 'relu'"),
        (dict(activation="swish"), "unknown activation 'swish'"),
        (dict(hidden=(0,)), "hidden sizes must be positive"),
        (dict(dtype="int8"), "unsupported dtype"),
    ],
)
def test_autoencoder_constructor_rejects_bad_arguments(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Autoencoder(D, **{"hidden": (8,), "latent_dim": 2, "backend": backend, **kwargs})


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), float("inf"), None, "fast"])
@pytest.mark.parametrize("optimizer", [Adam, SGD])
def test_optimizers_reject_bad_learning_rates(backend, optimizer, lr):
    with pytest.raises(ValueError, match="learning rate must be a positive number"):
        optimizer(small_vae(backend), lr=lr)


@pytest.mark.parametrize(
    "optimizer, kwargs, match",
    [
        (SGD, dict(momentum=1.0), "momentum must be in"),
        (SGD, dict(momentum=-0.1), "momentum must be in"),
        (SGD, dict(weight_decay=-1.0), "weight_decay must be >= 0"),
        (Adam, dict(betas=(1.0, 0.999)), "betas must be in"),
        (Adam, dict(betas=(-0.1, 0.999)), "betas must be in"),
        (Adam, dict(betas=(0.9, 1.0)), "betas must be in"),
        (Adam, dict(betas=(0.9, -0.1)), "betas must be in"),
        (Adam, dict(eps=0.0), "eps must be positive"),
        (Adam, dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    ],
)
def test_optimizers_reject_bad_hyperparameters(backend, optimizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optimizer(small_vae(backend), **kwargs)


@pytest.mark.parametrize("model", [VAE, Autoencoder])
def test_unknown_backend_name_is_a_backend_error(model):
    with pytest.raises(BackendError, match="unknown backend 'tpu'; choose one of numpy, cupy, auto") as info:
        model(D, (8,), 2, backend="tpu")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("beta", [-1.0, float("nan"), float("inf"), "half", None])
def test_loss_and_grad_rejects_a_bad_beta(beta):
    model = small_vae("numpy")
    with pytest.raises(ValueError, match="beta"):
        model.loss_and_grad(data(np, "float64"), beta=beta)


def test_numpy_scalar_beta_keeps_a_float32_loss():
    model = VAE(12, (6,), 3, dtype="float32")
    out = model.loss_and_grad(data(np, "float32"), beta=np.float64(0.5))
    assert out.loss.dtype == np.float32 and model.grads.dtype == np.float32


def test_he_init_means_he_for_hidden_layers_whatever_the_activation():
    he = VAE(400, (300,), 4, activation="tanh", init="he", dtype="float64")
    auto = VAE(400, (300,), 4, activation="tanh", init="auto", dtype="float64")
    assert np.std(he.encoder.dense[0].W) == pytest.approx(np.sqrt(2 / 400), rel=0.03)  # He normal
    assert np.abs(auto.encoder.dense[0].W).max() <= np.sqrt(6 / 700)  # Glorot uniform for tanh


def test_optimizers_defaults_and_edge_values():
    model = small_vae("numpy")
    adam, sgd = Adam(model), SGD(model)
    assert (adam.lr, adam.beta1, adam.beta2, adam.eps, adam.weight_decay) == (1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (0.01, 0.9, 0.0)
    assert (Adam(model, betas=(0.0, 0.0)).beta1, SGD(model, momentum=0.0).momentum) == (0.0, 0.0)  # the closed ends
