r"""The variational autoencoder and the plain autoencoder, with hand-written backward passes.

VAE (Kingma & Welling, 2014), for a batch ``x`` of shape ``(batch, input_dim)``:

.. math::
    [\mu, \log\sigma^2] = e(x) \qquad\text{(encoder MLP)}

    z = \mu + \sigma\,\epsilon,\quad \sigma = \exp(\tfrac12\log\sigma^2),\quad \epsilon\sim N(0,I)

    \text{decoder output} = d(z) \qquad\text{(logits, or the Gaussian mean [and log-variance])}

    \text{loss} = \frac1B\sum_b \big[-\log p(x_b|z_b) + \beta\,\mathrm{KL}(q(z|x_b)\,\|\,N(0,I))\big]
               = -\frac1B\sum_b \mathrm{ELBO}(x_b) \quad(\beta = 1)

The loss is summed over data dimensions and latent dimensions and *averaged*
over the batch: it is the negative ELBO per example, in nats.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np

from . import losses as L
from .backend import STREAM_INIT, STREAM_NOISE, Generator, get_xp, to_device
from .layers import MLP, Activation, Workspace, bind_flat, make_activation, sigmoid

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")
DTYPES = {"float32": np.float32, "float64": np.float64}


class Loss(NamedTuple):
    """A loss and its parts, per example (batch mean), as 0-d arrays on the model's device."""

    loss: object
    recon: object
    kl: object


def check_beta(beta) -> float:
    """The KL weight as a Python float (which never promotes a float32 loss), checked to be finite and >= 0."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {value!r}")
    return value


def _as_dtype(dtype):
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose float32 or float64")
    return DTYPES[key]


def _as_sizes(hidden, what="hidden"):
    if isinstance(hidden, (int, np.integer)):
        hidden = (hidden,)
    try:
        sizes = tuple(int(h) for h in hidden)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of positive ints, got {hidden!r}") from None
    if any(h < 1 for h in sizes):
        raise ValueError(f"{what} sizes must be positive, got {sizes}")
    return sizes


class _Model:
    """What the VAE and the autoencoder share: flat buffers, dtype/backend, input checks."""

    def _setup(self, input_dim, latent_dim, backend, dtype, seed):
        if int(input_dim) < 1 or int(latent_dim) < 1:
            raise ValueError(f"input_dim and latent_dim must be positive, got {input_dim}, {latent_dim}")
        self.input_dim, self.latent_dim = int(input_dim), int(latent_dim)
        self.xp = get_xp(backend)
        self.dtype = _as_dtype(dtype)
        self.seed = int(seed)
        self.rng = Generator(self.seed, self.xp, stream=STREAM_NOISE)

    def _build(self, *mlps):
        self._mlp_names = [next(k for k, v in vars(self).items() if v is mlp) for mlp in mlps]
        dense = [layer for mlp in mlps for layer in mlp.dense]
        self.params, self.grads = bind_flat(dense, self.xp, self.dtype)
        self._work = Workspace(self.xp)  # buffers of the training step, kept across steps
        init_rng = Generator(self.seed, self.xp, stream=STREAM_INIT)
        for layer in dense:
            layer.initialize(init_rng)

    def _replica(self):
        """A model that shares this one's parameter buffer but has its own gradients and work buffers.

        Layers cache their inputs in ``forward`` for ``backward``, so two
        threads cannot run one model at once; each runs its own replica
        (see :mod:`scratchvae.parallel`). Writing the replica's ``params``
        writes this model's.
        """
        r = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Activation):  # e.g. the autoencoder's output activation caches y
                setattr(r, name, copy.copy(value))
        mlps = [getattr(self, name).clone() for name in self._mlp_names]
        for name, mlp in zip(self._mlp_names, mlps):
            setattr(r, name, mlp)
        dense = [layer for mlp in mlps for layer in mlp.dense]
        r.params, r.grads = bind_flat(dense, self.xp, self.dtype, params=self.params)
        r._work = Workspace(self.xp)
        return r

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    def check_input(self, x, name="x", bounded=False):
        """Validate a batch and return it on the model's device in its dtype.

        Raises ``ValueError`` naming the problem: not 2-D, wrong feature
        dimension, empty, integer/bool/object dtype, NaN/inf, or (for a
        Bernoulli likelihood, ``bounded=True``) values outside ``[0, 1]``.
        """
        xp = self.xp
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            x = np.asarray(x)
            dtype = x.dtype
        if np.dtype(dtype).kind != "f":
            raise ValueError(
                f"{name} must be a floating-point array, got dtype {np.dtype(dtype)} "
                "(convert images with x.astype(np.float32) / 255)"
            )
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"{name} must have shape (batch, {self.input_dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        x = to_device(x, xp, dtype=self.dtype)
        if not bool(xp.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
        if bounded and not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"{name} must lie in [0, 1] for the Bernoulli likelihood")
        return x


class VAE(_Model):
    r"""Variational autoencoder with an MLP encoder and decoder and a Gaussian latent.

    Parameters
    ----------
    input_dim : int
        Data dimension ``D`` (784 for MNIST).
    hidden : sequence of int
        Encoder hidden widths; the decoder mirrors them unless ``decoder_hidden`` is given.
    latent_dim : int
        Latent dimension ``J``.
    likelihood : {"bernoulli", "gaussian", "gaussian_learned"}
        ``bernoulli``: the decoder outputs logits ``l`` and
        :math:`-\log p(x|z) = \sum_d \operatorname{softplus}(l_d) - x_d l_d`
        (targets in ``[0, 1]``). ``gaussian``: the decoder outputs the mean and
        the variance is fixed to ``exp(gaussian_log_var)``: the
        squared-error loss :math:`(x - \hat x)^2` up to scale and a constant. ``gaussian_learned``: the decoder outputs a
        mean and a per-pixel log-variance (``2 D`` outputs).
    activation : str
        Hidden activation: relu, tanh, sigmoid or softplus.
    decoder_hidden : sequence of int, optional
        Decoder hidden widths (``()`` gives a linear decoder: with
        ``likelihood="gaussian"`` that is the exact linear-Gaussian model).
    gaussian_log_var : float
        :math:`\log\sigma^2` of the fixed-variance Gaussian likelihood.
    log_var_bound : float or None
        Learned log-variances (the encoder's, and the decoder's for
        ``gaussian_learned``) are :math:`c\tanh(h/c)` of the network output
        ``h`` with ``c = log_var_bound`` (default 30), which keeps
        :math:`\sigma^2` finite for any output and is the identity for
        ordinary values; ``None`` uses ``h`` as it is
        (:func:`~scratchvae.losses.bound_log_var`).
    init : {"auto", "he", "glorot", "fan_in_uniform"}
        Parameter initialisation (see :class:`~scratchvae.layers.MLP`).
    backend : {"numpy", "cupy", "auto"}, optional
    dtype : {"float32", "float64"}
    seed : int
        Seeds both the initialisation and the model's own generator for
        :math:`\epsilon` (no global random state is read).

    Initialisation (``init="auto"``): He normal for ReLU hidden layers,
    Glorot uniform for every other layer, zero biases. The command line's
    ``train`` uses ``fan_in_uniform``, the ``torch.nn.Linear`` default, to
    reproduce the PyTorch VAE example.

    Attributes
    ----------
    params, grads : 1-D arrays
        All weights and biases in one flat buffer, and their gradients; every
        layer's ``W, b, d_W, d_b`` is a view into these.
    """

    def __init__(
        self,
        input_dim,
        hidden=(400,),
        latent_dim=20,
        likelihood="bernoulli",
        activation="relu",
        *,
        decoder_hidden=None,
        gaussian_log_var=0.0,
        log_var_bound=L.LOG_VAR_BOUND,
        init="auto",
        backend=None,
        dtype="float32",
        seed=0,
    ):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        self._setup(input_dim, latent_dim, backend, dtype, seed)
        self.hidden = _as_sizes(hidden)
        self.decoder_hidden = (
            tuple(reversed(self.hidden)) if decoder_hidden is None else _as_sizes(decoder_hidden, "decoder_hidden")
        )
        self.likelihood = likelihood
        make_activation(activation)  # an unknown name fails here even if no hidden layer uses it
        self.activation = activation
        self.gaussian_log_var = float(gaussian_log_var)
        if not np.isfinite(self.gaussian_log_var):
            raise ValueError("gaussian_log_var must be finite")
        if log_var_bound is not None and not (np.isfinite(log_var_bound) and log_var_bound > 0):
            raise ValueError(f"log_var_bound must be a positive number or None, got {log_var_bound!r}")
        self.log_var_bound = None if log_var_bound is None else float(log_var_bound)
        J, D = self.latent_dim, self.input_dim
        n_out = 2 * D if likelihood == "gaussian_learned" else D
        self.init = init
        self.encoder = MLP((D, *self.hidden, 2 * J), activation, init)  # outputs [mu, log_var]
        self.decoder = MLP((J, *self.decoder_hidden, n_out), activation, init)
        self._build(self.encoder, self.decoder)

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable (what a checkpoint stores)."""
        return {
            "model": "VAE",
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "latent_dim": self.latent_dim,
            "likelihood": self.likelihood,
            "activation": self.activation,
            "decoder_hidden": list(self.decoder_hidden),
            "gaussian_log_var": self.gaussian_log_var,
            "log_var_bound": self.log_var_bound,
            "init": self.init,
            "dtype": np.dtype(self.dtype).name,
            "seed": self.seed,
        }

    # ---------------------------------------------------------------- forward pieces

    def encode(self, x):
        """Posterior parameters ``(mu, log_var)``, each ``(batch, latent_dim)``, of :math:`q(z|x)`."""
        x = self.check_input(x)
        return self._encode(x)

    def _encode(self, x, work=None):
        h = self.encoder.forward(x, work=work)  # (batch, 2J) = [mu, h_log_var]
        J = self.latent_dim
        return h[:, :J], L.bound_log_var(h[:, J:], self.log_var_bound)

    def _recon_nll(self, dec_out, x):
        """:math:`-\\log p(x|z)` per example from the decoder output ``(batch, D or 2D)``."""
        if self.likelihood == "bernoulli":
            return L.bernoulli_nll(dec_out, x)
        if self.likelihood == "gaussian":
            return L.gaussian_nll(dec_out, x, self.gaussian_log_var)
        D = self.input_dim
        return L.gaussian_nll(dec_out[..., :D], x, L.bound_log_var(dec_out[..., D:], self.log_var_bound))

    def _recon_nll_backward(self, dec_out, x, d_nll):
        """``d_dec_out`` from the upstream gradient of :meth:`_recon_nll`."""
        if self.likelihood == "bernoulli":
            return L.bernoulli_nll_backward(dec_out, x, d_nll)
        if self.likelihood == "gaussian":
            d_mean, _ = L.gaussian_nll_backward(dec_out, x, self.gaussian_log_var, d_nll)
            return d_mean
        D, c = self.input_dim, self.log_var_bound
        log_var = L.bound_log_var(dec_out[:, D:], c)
        d_mean, d_log_var = L.gaussian_nll_backward(dec_out[:, :D], x, log_var, d_nll)
        return self.xp.concatenate([d_mean, L.bound_log_var_backward(d_log_var, log_var, c)], axis=1)

    def _recon_nll_and_grad(self, dec_out, x, work):
        """:meth:`_recon_nll` and ``d nll_b / d dec_out_b`` (for an upstream gradient of 1), for the training steps.

        The caller scales the gradient's rows in place by the real upstream
        gradient. The Bernoulli case runs in two kept buffers of ``work``
        (see :func:`~scratchvae.losses.bernoulli_nll_and_grad`).
        """
        if self.likelihood == "bernoulli":
            out = work.get("d_dec_out", dec_out.shape, dec_out.dtype)
            return L.bernoulli_nll_and_grad(dec_out, x, out=out, tmp=work.get("nll_tmp", dec_out.shape, dec_out.dtype))
        return self._recon_nll(dec_out, x), self._recon_nll_backward(dec_out, x, 1.0)

    def _mean_from_output(self, dec_out):
        """The mean of :math:`p(x|z)`: ``sigmoid(logits)`` or the Gaussian mean."""
        if self.likelihood == "bernoulli":
            return sigmoid(dec_out)
        return dec_out[:, : self.input_dim]

    def decode(self, z):
        """Mean of :math:`p(x|z)` (pixel probabilities for Bernoulli), ``(batch, input_dim)``."""
        z = to_device(z, self.xp, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (batch, {self.latent_dim}), got {tuple(z.shape)}")
        return self._mean_from_output(self.decoder.forward(z))

    def reconstruct(self, x):
        """Decode the posterior mean: :math:`\\mathbb{E}[p(x|z=\\mu(x))]`, ``(batch, input_dim)``."""
        mu, _ = self.encode(x)
        return self._mean_from_output(self.decoder.forward(mu))

    def sample(self, n: int, rng: Generator | None = None):
        """``n`` samples from the generative model's mean: :math:`z\\sim N(0,I)`, return ``decode(z)``."""
        if int(n) < 1:
            raise ValueError(f"n must be positive, got {n}")
        rng = rng or self.rng
        return self.decode(rng.normal((int(n), self.latent_dim), self.dtype))

    def log_px_given_z(self, z, x):
        r""":math:`\log p(x|z)` for latent samples ``z (..., batch, J)`` and data ``x (batch, D)`` -> ``(..., batch)``."""
        lead = z.shape[:-1]
        dec_out = self.decoder.forward(z.reshape(-1, self.latent_dim))
        dec_out = dec_out.reshape(*lead, dec_out.shape[-1])
        return -self._recon_nll(dec_out, x)

    def loss_parts(self, x, eps=None):
        r"""Per-example reconstruction term and KL, forward only.

        Returns
        -------
        recon : array ``(batch,)``
            :math:`-\log p(x|z)` at :math:`z = \mu + \sigma\epsilon` (one sample).
        kl : array ``(batch,)``
            :math:`\mathrm{KL}(q(z|x)\,\|\,N(0, I))`, analytic.
        """
        x = self.check_input(x, bounded=self.likelihood == "bernoulli")
        return self._loss_parts(x, self._check_eps(eps, x.shape[0]))

    def _loss_parts(self, x, eps=None):
        mu, log_var = self._encode(x)
        if eps is None:
            eps = self.rng.normal(mu.shape, self.dtype)
        z, _ = L.reparameterize(mu, log_var, eps)
        return self._recon_nll(self.decoder.forward(z), x), L.kl_normal_std(mu, log_var)

    def elbo(self, x, eps=None):
        r"""Per-example ELBO, ``(batch,)``, with one reparameterized sample.

        .. math:: \mathrm{ELBO}(x) = \log p(x|z) - \mathrm{KL}(q(z|x)\,\|\,N(0,I)),\quad z = \mu + \sigma\epsilon
        """
        recon, kl = self.loss_parts(x, eps)
        return -recon - kl

    # ---------------------------------------------------------------- loss and gradient

    def loss_and_grad(self, x, eps=None, beta=1.0) -> Loss:
        r"""Negative ELBO per example and its gradient in ``self.grads``.

        Parameters
        ----------
        x : array ``(batch, input_dim)``, float, finite (in ``[0, 1]`` for Bernoulli)
        eps : array ``(batch, latent_dim)``, optional
            Reparameterization noise; drawn from the model's generator when
            omitted. Pass it to make the call deterministic.
        beta : float
            Weight of the KL term (1 gives the ELBO; see beta-VAE).

        Returns
        -------
        Loss
            ``loss`` :math:`= \frac1B\sum_b(\text{recon}_b + \beta\,\text{kl}_b)`,
            ``recon`` :math:`= \frac1B\sum_b -\log p(x_b|z_b)`, ``kl`` the mean
            KL, all 0-d arrays on the model's device. ``self.grads`` holds
            :math:`\partial\,\text{loss}/\partial\,\text{params}` on return.
        """
        x = self.check_input(x, bounded=self.likelihood == "bernoulli")
        return self._loss_and_grad(x, self._check_eps(eps, x.shape[0]), check_beta(beta))

    def _check_eps(self, eps, batch):
        """``eps`` (or ``None``) on the model's device and in its dtype, checked to be ``(batch, latent_dim)``."""
        if eps is None:
            return None
        eps = to_device(eps, self.xp, dtype=self.dtype)
        if eps.shape != (batch, self.latent_dim):
            raise ValueError(f"eps must have shape {(batch, self.latent_dim)}, got {tuple(eps.shape)}")
        return eps

    def _loss_and_grad(self, x, eps=None, beta=1.0, n_total=None) -> Loss:
        """:meth:`loss_and_grad` without input checks (``x`` already on device, in dtype).

        Layer outputs live in work buffers kept across calls, and every
        layer's gradient is written once (no zeroing, no temporaries); the
        numbers are those of the plain forward/backward the tests check.

        ``n_total`` (default: the rows of ``x``) is the batch size the sums
        are divided by: with ``x`` a part of a batch of ``n_total`` rows, the
        loss and gradient are that part's share of the batch's, and the
        shares of all parts add up to the whole (see :mod:`scratchvae.parallel`).
        """
        xp, work, c = self.xp, self._work, self.log_var_bound
        J = self.latent_dim
        B = x.shape[0] if n_total is None else n_total
        # forward
        mu, log_var = self._encode(x, work=work)  # encoder output [mu, h_log_var], log_var = c tanh(h / c)
        if eps is None:
            eps = self.rng.normal((x.shape[0], J), self.dtype)
        z, sigma = L.reparameterize(mu, log_var, eps)
        dec_out = self.decoder.forward(z, work=work)
        recon, d_dec_out = self._recon_nll_and_grad(dec_out, x, work)  # (rows,), d recon_b / d dec_out_b
        kl = L.kl_normal_std(mu, log_var)  # (rows,)
        recon_mean, kl_mean = recon.sum() / B, kl.sum() / B
        loss = recon_mean + beta * kl_mean
        # backward (reverse order); d loss / d recon_b = 1/B, d loss / d kl_b = beta/B
        d_dec_out *= 1.0 / B
        d_z = self.decoder.backward(d_dec_out, work=work)
        d_mu, d_log_var = L.reparameterize_backward(d_z, eps, sigma)
        d_mu_kl, d_log_var_kl = L.kl_normal_std_backward(mu, log_var, beta / B)
        d_enc_out = work.get("d_enc_out", mu.shape[:1] + (2 * J,), mu.dtype)
        xp.add(d_mu, d_mu_kl, out=d_enc_out[:, :J])  # mu feeds z and the KL: gradients add
        d_enc_out[:, J:] = L.bound_log_var_backward(d_log_var + d_log_var_kl, log_var, c)
        self.encoder.backward(d_enc_out, need_input_grad=False, work=work)
        return Loss(loss, recon_mean, kl_mean)


class Autoencoder(_Model):
    r"""Deterministic autoencoder with the squared-error loss.

    .. math::
        \hat x = d(e(x)), \qquad \text{loss} = \frac1B \sum_b \sum_d (x_{bd} - \hat x_{bd})^2,
        \qquad \frac{\partial\,\text{loss}}{\partial \hat x} = \frac2B(\hat x - x)

    Parameters
    ----------
    input_dim, hidden, latent_dim, activation, backend, dtype, seed
        As for :class:`VAE`; the code ``e(x)`` has ``latent_dim`` units.
    output : {"sigmoid", "identity"}
        Output activation of the decoder (sigmoid keeps images in ``[0, 1]``).
    """

    def __init__(
        self,
        input_dim,
        hidden=(400,),
        latent_dim=20,
        activation="relu",
        *,
        output="sigmoid",
        init="auto",
        backend=None,
        dtype="float32",
        seed=0,
    ):
        self._setup(input_dim, latent_dim, backend, dtype, seed)
        self.hidden = _as_sizes(hidden)
        make_activation(activation)  # an unknown name fails here even if no hidden layer uses it
        self.activation = activation
        if output not in ("sigmoid", "identity"):
            raise ValueError(f"unknown output {output!r}; choose 'sigmoid' or 'identity'")
        self.output = output
        self.init = init
        self.encoder = MLP((self.input_dim, *self.hidden, self.latent_dim), activation, init)
        self.decoder = MLP((self.latent_dim, *reversed(self.hidden), self.input_dim), activation, init)
        self.out_act = make_activation(output)
        self._build(self.encoder, self.decoder)

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable (what a checkpoint stores)."""
        return {
            "model": "Autoencoder",
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "latent_dim": self.latent_dim,
            "activation": self.activation,
            "output": self.output,
            "init": self.init,
            "dtype": np.dtype(self.dtype).name,
            "seed": self.seed,
        }

    def encode(self, x):
        """The code :math:`e(x)`, ``(batch, latent_dim)``."""
        return self.encoder.forward(self.check_input(x))

    def decode(self, code):
        """The reconstruction :math:`d(c)`, ``(batch, input_dim)``."""
        code = to_device(code, self.xp, dtype=self.dtype)
        return self.out_act.forward(self.decoder.forward(code))

    def reconstruct(self, x):
        """:math:`\\hat x = d(e(x))`."""
        return self.decode(self.encode(x))

    def loss_and_grad(self, x) -> Loss:
        """Mean squared-error loss per example and its gradient in ``self.grads`` (``kl`` is 0)."""
        x = self.check_input(x)
        return self._loss_and_grad(x)

    def _loss_and_grad(self, x, eps=None, beta=1.0, n_total=None) -> Loss:
        B = x.shape[0] if n_total is None else n_total  # see VAE._loss_and_grad
        self.grads[...] = 0
        code = self.encoder.forward(x)
        x_hat = self.out_act.forward(self.decoder.forward(code))
        diff = x_hat - x
        loss = (diff * diff).sum() / B
        d_x_hat = (2.0 / B) * diff
        d_code = self.decoder.backward(self.out_act.backward(d_x_hat))
        self.encoder.backward(d_code, need_input_grad=False)
        return Loss(loss, loss, self.xp.zeros((), dtype=self.dtype))
