r"""The variational autoencoder and the plain autoencoder, with hand-written backward passes.

This is the reference: every training step of every engine is checked
against :meth:`VAE.loss_and_grad` and :meth:`Autoencoder.loss_and_grad`,
which are written with the plain forward and backward functions of
:mod:`scratchvae.layers` and :mod:`scratchvae.losses`, in named steps, and the
backward pass as ``d_<name>`` lines in reverse order.

The VAE (Kingma & Welling, 2014) for one example :math:`x` with :math:`D`
dimensions and a latent :math:`z` with :math:`J`, an encoder :math:`e` and a
decoder :math:`d`:

.. math::
    \mathrm{ELBO}(x) = \mathbb E_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z)),
    \qquad q(z|x) = N(\mu, \mathrm{diag}\,\sigma^2),\quad p(z) = N(0, I)

    [\mu, \log\sigma^2] = e(x), \qquad
    -\mathrm{KL} = \tfrac12\sum_j\big(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2\big)

    z = \mu + \sigma\,\epsilon,\quad \sigma = \exp(\tfrac12\log\sigma^2),\quad \epsilon \sim N(0, I),
    \qquad -\log p(x|z) \text{ from the decoder output } d(z)

Training minimises the negative ELBO averaged over a batch of :math:`B`
examples (with one :math:`\epsilon` each, and the KL weighted by
:math:`\beta`, 1 for the ELBO), in nats per example:

.. math:: \text{loss} = \frac1B\sum_b \big[-\log p(x_b|z_b) + \beta\,\mathrm{KL}(q(z|x_b)\,\|\,p(z))\big]

The plain autoencoder has a deterministic code and the squared error:

.. math:: \hat x = d(e(x)), \qquad \text{loss} = \frac1B\sum_b\sum_d (x_{bd} - \hat x_{bd})^2
"""

from __future__ import annotations

import secrets
from typing import NamedTuple

import numpy as np

from . import losses as L
from .backend import get_xp, to_device
from .layers import MLP, bind_flat, make_activation, sigmoid
from .rng import STREAM_INIT, STREAM_NOISE, Generator
from .validate import as_dtype, as_sizes, check_batch, check_beta, check_eps

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


class Loss(NamedTuple):
    """A loss and its parts, per example (batch mean), as 0-d arrays on the model's device."""

    loss: object
    recon: object
    kl: object


class _Model:
    """What the VAE and the autoencoder share: flat buffers, dtype and backend, input checks."""

    bounded_input = False  # whether training data must lie in [0, 1]

    def _setup(self, input_dim, latent_dim, backend, dtype, seed):
        if int(input_dim) < 1 or int(latent_dim) < 1:
            raise ValueError(f"input_dim and latent_dim must be positive, got {input_dim}, {latent_dim}")
        self.input_dim, self.latent_dim = int(input_dim), int(latent_dim)
        self.xp = get_xp(backend)
        self.dtype = as_dtype(dtype)
        self.seed = secrets.randbits(32) if seed is None else int(seed)  # None: a fresh seed, kept in config()
        self.rng = Generator(self.seed, self.xp, stream=STREAM_NOISE)

    def _build(self, *mlps):
        """One flat parameter buffer (and one gradient buffer) for the dense layers of ``mlps``, initialised."""
        self.dense_layers = [layer for mlp in mlps for layer in mlp.dense]  # in the order of the flat buffer
        self.params, self.grads = bind_flat(self.dense_layers, self.xp, self.dtype)
        init_rng = Generator(self.seed, self.xp, stream=STREAM_INIT)
        for layer in self.dense_layers:
            layer.initialize(init_rng)

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    def check_input(self, x, name="x", bounded=None):
        """A batch ``(batch, input_dim)`` checked and returned on the model's device in its dtype.

        ``bounded`` (default: whether the model's loss needs it, as for the
        Bernoulli likelihood) also requires values in ``[0, 1]``. See
        :func:`scratchvae.validate.check_batch` for what is refused.
        """
        bounded = self.bounded_input if bounded is None else bounded
        return check_batch(x, self.xp, self.dtype, self.input_dim, name, bounded)


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
        the variance is fixed to ``exp(gaussian_log_var)``: the squared-error
        loss :math:`(x - \hat x)^2` up to scale and a constant.
        ``gaussian_learned``: the decoder outputs a mean and a per-pixel
        log-variance (``2 D`` outputs).
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
    seed : int or None
        Seeds both the initialisation and the model's own generator for
        :math:`\epsilon` (no global random state is read); ``None`` draws a
        fresh seed, kept as ``seed`` and in :meth:`config`.

    Initialisation (``init="auto"``): He normal for ReLU hidden layers,
    Glorot uniform for every other layer, zero biases. The command line's
    ``train`` uses ``fan_in_uniform``, the ``torch.nn.Linear`` default, to
    reproduce the PyTorch VAE example.

    Attributes
    ----------
    encoder, decoder : MLP
        ``x (batch, D) -> [mu, h_log_var] (batch, 2J)`` and
        ``z (batch, J) -> (batch, D)`` (``2D`` for ``gaussian_learned``).
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
        self.hidden = as_sizes(hidden)
        self.decoder_hidden = (
            tuple(reversed(self.hidden)) if decoder_hidden is None else as_sizes(decoder_hidden, "decoder_hidden")
        )
        self.likelihood = likelihood
        self.bounded_input = likelihood == "bernoulli"
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
        self.encoder = MLP((D, *self.hidden, 2 * J), activation, init)  # outputs [mu, h_log_var]
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

    # ---------------------------------------------------------------- q(z|x) and p(x|z)

    def encode(self, x):
        r"""The parameters of :math:`q(z|x) = N(\mu, \mathrm{diag}\,\sigma^2)`: ``(mu, log_var)``, each ``(batch, J)``.

        .. math:: [\mu, h] = e(x), \qquad \log\sigma^2 = c\tanh(h / c)
        """
        return self._posterior(self.check_input(x, bounded=False))

    def _posterior(self, x):
        """:meth:`encode` of a batch already checked."""
        enc_out = self.encoder.forward(x)
        J = self.latent_dim
        return enc_out[:, :J], L.bound_log_var(enc_out[:, J:], self.log_var_bound)

    def output_mean(self, dec_out):
        """The mean of :math:`p(x|z)` from a decoder output: ``sigmoid(logits)``, or the Gaussian mean."""
        if self.likelihood == "bernoulli":
            return sigmoid(dec_out)
        return dec_out[..., : self.input_dim]

    def decode(self, z):
        """The mean of :math:`p(x|z)` (pixel probabilities for Bernoulli), ``(batch, input_dim)``."""
        z = to_device(z, self.xp, dtype=self.dtype)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (batch, {self.latent_dim}), got {tuple(z.shape)}")
        return self.output_mean(self.decoder.forward(z))

    def reconstruct(self, x):
        r"""Decode the posterior mean: the mean of :math:`p(x|z=\mu(x))`, ``(batch, input_dim)``."""
        mu, _ = self.encode(x)
        return self.output_mean(self.decoder.forward(mu))

    def sample(self, n: int, rng: Generator | None = None):
        r"""``n`` samples of the generative model's mean: :math:`z \sim N(0, I)`, then ``decode(z)``."""
        if int(n) < 1:
            raise ValueError(f"n must be positive, got {n}")
        rng = rng or self.rng
        return self.decode(rng.normal((int(n), self.latent_dim), self.dtype))

    # ---------------------------------------------------------------- the reconstruction term

    def reconstruction_nll(self, dec_out, x):
        r""":math:`-\log p(x|z)` per example from the decoder output ``(..., batch, D or 2D)`` -> ``(..., batch)``.

        Bernoulli: :func:`~scratchvae.losses.bernoulli_nll` of the logits;
        Gaussian: :func:`~scratchvae.losses.gaussian_nll` of the mean with
        the fixed log-variance, or (``gaussian_learned``) with the second half
        of the output through :func:`~scratchvae.losses.bound_log_var`.
        """
        if self.likelihood == "bernoulli":
            return L.bernoulli_nll(dec_out, x)
        if self.likelihood == "gaussian":
            return L.gaussian_nll(dec_out, x, self.gaussian_log_var)
        D, c = self.input_dim, self.log_var_bound
        return L.gaussian_nll(dec_out[..., :D], x, L.bound_log_var(dec_out[..., D:], c))

    def reconstruction_nll_backward(self, d_recon, dec_out, x):
        """``d_dec_out (batch, D or 2D)`` from ``d_recon`` (scalar or ``(batch,)``), the gradient of :meth:`reconstruction_nll`."""
        if self.likelihood == "bernoulli":
            return L.bernoulli_nll_backward(d_recon, dec_out, x)
        if self.likelihood == "gaussian":
            d_mean, _ = L.gaussian_nll_backward(d_recon, dec_out, x, self.gaussian_log_var)
            return d_mean
        D, c = self.input_dim, self.log_var_bound
        log_var = L.bound_log_var(dec_out[..., D:], c)
        d_mean, d_log_var = L.gaussian_nll_backward(d_recon, dec_out[..., :D], x, log_var)
        d_h_log_var = L.bound_log_var_backward(d_log_var, log_var, c)
        return self.xp.concatenate([d_mean, d_h_log_var], axis=-1)

    def log_px_given_z(self, z, x):
        r""":math:`\log p(x|z)` for latent samples ``z (..., batch, J)`` and data ``x (batch, D)`` -> ``(..., batch)``."""
        lead = z.shape[:-1]
        dec_out = self.decoder.forward(z.reshape(-1, self.latent_dim))
        return -self.reconstruction_nll(dec_out.reshape(*lead, dec_out.shape[-1]), x)

    # ---------------------------------------------------------------- the ELBO

    def loss_parts(self, x, eps=None):
        r"""Per-example reconstruction term and KL, forward only, with one sample :math:`z = \mu + \sigma\epsilon`.

        Returns
        -------
        recon : array ``(batch,)``
            :math:`-\log p(x|z)`.
        kl : array ``(batch,)``
            :math:`\mathrm{KL}(q(z|x)\,\|\,N(0, I))`, analytic.
        """
        x = self.check_input(x)
        mu, log_var = self._posterior(x)
        shape = mu.shape
        eps = self.rng.normal(shape, self.dtype) if eps is None else check_eps(eps, shape, self.xp, self.dtype)
        z, _ = L.reparameterize(mu, log_var, eps)
        return self.reconstruction_nll(self.decoder.forward(z), x), L.kl_normal_std(mu, log_var)

    def elbo(self, x, eps=None):
        r"""Per-example ELBO, ``(batch,)``, with one reparameterized sample.

        .. math:: \mathrm{ELBO}(x) = \log p(x|z) - \mathrm{KL}(q(z|x)\,\|\,N(0,I)),\quad z = \mu + \sigma\epsilon
        """
        recon, kl = self.loss_parts(x, eps)
        return -recon - kl

    # ---------------------------------------------------------------- the loss and its gradient

    def loss_and_grad(self, x, eps=None, beta=1.0) -> Loss:
        r"""The negative ELBO, the batch mean of its per-example values, and its gradient in ``self.grads``.

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

        The forward pass is eight named steps and the backward pass the same
        steps in reverse, ``d_<name>`` being :math:`\partial\,\text{loss}/\partial\,\text{<name>}`
        (``docs/derivation.md``, section 11, walks through it line by line).
        Where a value feeds two places (``mu`` and ``log_var`` feed both
        :math:`z` and the KL) its gradients add.
        """
        x = self.check_input(x)
        beta = check_beta(beta)
        B, J, c = x.shape[0], self.latent_dim, self.log_var_bound
        eps = self.rng.normal((B, J), self.dtype) if eps is None else check_eps(eps, (B, J), self.xp, self.dtype)
        # forward
        enc_out = self.encoder.forward(x)  # F1: (B, 2J)
        mu, h_log_var = enc_out[:, :J], enc_out[:, J:]  # F2: q(z|x) = N(mu, exp(log_var))
        log_var = L.bound_log_var(h_log_var, c)
        z, sigma = L.reparameterize(mu, log_var, eps)  # F3: z = mu + sigma * eps
        dec_out = self.decoder.forward(z)  # F4
        recon = self.reconstruction_nll(dec_out, x)  # F5: -log p(x|z), (B,)
        kl = L.kl_normal_std(mu, log_var)  # F6: KL(q(z|x) || N(0, I)), (B,)
        recon_mean, kl_mean = recon.mean(), kl.mean()  # F7
        loss = recon_mean + beta * kl_mean  # F8
        # backward, in reverse order
        self.grads[...] = 0  # the layers add their parameters' gradients to it
        d_recon_mean, d_kl_mean = 1.0, beta  # B8
        d_recon, d_kl = d_recon_mean / B, d_kl_mean / B  # B7: the same for every example
        d_mu, d_log_var = L.kl_normal_std_backward(d_kl, mu, log_var)  # B6
        d_dec_out = self.reconstruction_nll_backward(d_recon, dec_out, x)  # B5
        d_z = self.decoder.backward(d_dec_out)  # B4
        d_mu_z, d_log_var_z = L.reparameterize_backward(d_z, eps, sigma)  # B3: the parts that come through z
        d_mu += d_mu_z
        d_log_var += d_log_var_z
        d_h_log_var = L.bound_log_var_backward(d_log_var, log_var, c)  # B2
        d_enc_out = self.xp.concatenate([d_mu, d_h_log_var], axis=1)
        self.encoder.backward(d_enc_out)  # B1: fills the encoder's d_W, d_b (the gradient for x goes unused)
        return Loss(loss, recon_mean, kl_mean)


class Autoencoder(_Model):
    r"""Deterministic autoencoder with the squared-error loss.

    .. math::
        \hat x = d(e(x)), \qquad \text{loss} = \frac1B \sum_b \sum_d (x_{bd} - \hat x_{bd})^2,
        \qquad \frac{\partial\,\text{loss}}{\partial \hat x} = \frac2B(\hat x - x)

    Parameters
    ----------
    input_dim, hidden, latent_dim, activation, init, backend, dtype, seed
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
        self.hidden = as_sizes(hidden)
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
        r""":math:`\hat x = d(e(x))`."""
        return self.decode(self.encode(x))

    def loss_and_grad(self, x) -> Loss:
        r"""The squared-error loss, the batch mean of each example's sum, and its gradient in ``self.grads`` (``kl`` is 0).

        ``x`` is ``(batch, input_dim)``, float and finite; the loss is
        :math:`\frac1B\sum_{b,d}(x_{bd} - \hat x_{bd})^2` as a 0-d array.
        """
        x = self.check_input(x)
        B = x.shape[0]
        # forward
        code = self.encoder.forward(x)  # F1: e(x), (B, latent_dim)
        dec_out = self.decoder.forward(code)  # F2
        x_hat = self.out_act.forward(dec_out)  # F3: x_hat = d(e(x))
        diff = x_hat - x  # F4
        loss = (diff * diff).sum() / B  # F5
        # backward, in reverse order
        self.grads[...] = 0
        d_diff = (2.0 / B) * diff  # B5
        d_x_hat = d_diff  # B4
        d_dec_out = self.out_act.backward(d_x_hat)  # B3
        d_code = self.decoder.backward(d_dec_out)  # B2
        self.encoder.backward(d_code)  # B1
        return Loss(loss, loss, self.xp.zeros((), dtype=self.dtype))
