r"""Closed forms for the derivation: two Gaussian integrals and a VAE whose :math:`\log p(x)` is exact.

The derivation of the VAE objective has two Gaussian integrals at its core.
For :math:`q(z) = N(\mu, \mathrm{diag}\,\sigma^2)` and :math:`p(z) = N(0, I)` over
``latent_dim`` :math:`= J` dimensions,

.. math::
    \int q \log p(z)\,dz = -\tfrac J2\log 2\pi - \tfrac12\sum_j(\mu_j^2 + \sigma_j^2)

    \int q \log q\,dz = -\tfrac J2\log 2\pi - \tfrac12\sum_j(1 + \log\sigma_j^2)

(:func:`expected_log_prior` and :func:`negative_entropy`), and their difference
is :math:`-\mathrm{KL}(q\,\|\,p(z))` (:func:`scratchvae.losses.kl_normal_std`).
The step-by-step derivation, with the test of each equation, is
``docs/derivation.md``.

A neural decoder leaves :math:`\log p(x)` and the true posterior
:math:`p(z|x)` out of reach, so the identities
:math:`\log p(x) = \mathrm{ELBO} + \mathrm{KL}(q\,\|\,p(z|x))` and
:math:`\log p(x) \ge \mathrm{ELBO}` can only be checked on a model where they
have closed forms. :class:`LinearGaussianVAE` is that model: a :class:`VAE`
with a linear decoder and a fixed-variance Gaussian likelihood,

.. math::
    p(z) = N(0, I_J), \qquad p(x|z) = N(zW + b,\ s^2 I_D), \qquad
    W \in \mathbb R^{J\times D},

(probabilistic PCA, Tipping & Bishop 1999), in which every quantity of the
derivation is a Gaussian integral. It *is* a :class:`VAE` (same encoder,
:meth:`VAE.elbo`, :meth:`VAE.loss_and_grad` and
:func:`scratchvae.evaluate.iwae_bound`), so the closed forms check the code
that trains real models.

The model's closed forms are computed in float64, whatever the model's dtype,
on the model's array module (NumPy or CuPy); the module-level functions work
in the dtype and array module of their inputs.
"""

from __future__ import annotations

import math

import numpy as np

from . import losses as L
from .backend import get_array_module, to_device
from .model import VAE

# --------------------------------------------------------------------------------------
# The two Gaussian integrals, and the KL between full-covariance Gaussians.
# --------------------------------------------------------------------------------------


def expected_log_prior(mu, log_var):
    r"""Cross term :math:`\int q(z)\log p(z)\,dz` for :math:`q = N(\mu, \sigma^2)`, :math:`p(z) = N(0, I)`.

    .. math::
        \int q\log p(z)\,dz = \mathbb E_q\Big[-\tfrac12\sum_j(\log 2\pi + z_j^2)\Big]
        = -\tfrac J2\log 2\pi - \tfrac12\sum_j\big(\mu_j^2 + \sigma_j^2\big)

    since :math:`\mathbb E_q[z_j^2] = \mu_j^2 + \sigma_j^2`.

    Parameters
    ----------
    mu, log_var : arrays ``(batch, latent_dim)``
        Mean and :math:`\log\sigma^2` of the diagonal Gaussian ``q``.

    Returns
    -------
    array ``(batch,)``
    """
    xp = get_array_module(mu, log_var)
    return -0.5 * (L.LOG_2PI + mu * mu + xp.exp(log_var)).sum(axis=-1)


def negative_entropy(mu, log_var):
    r"""Negative entropy :math:`\int q(z)\log q(z)\,dz` of :math:`q = N(\mu, \sigma^2)`.

    .. math::
        \int q\log q\,dz = \mathbb E_q\Big[-\tfrac12\sum_j\Big(\log 2\pi + \log\sigma_j^2
            + \frac{(z_j - \mu_j)^2}{\sigma_j^2}\Big)\Big]
        = -\tfrac J2\log 2\pi - \tfrac12\sum_j\big(1 + \log\sigma_j^2\big)

    since :math:`\mathbb E_q[(z_j - \mu_j)^2] = \sigma_j^2`. It does not depend on
    :math:`\mu`, which is taken only for its shape.

    Parameters
    ----------
    mu, log_var : arrays ``(batch, latent_dim)``

    Returns
    -------
    array ``(batch,)``
    """
    xp = get_array_module(mu, log_var)
    log_var = xp.broadcast_to(log_var, mu.shape)
    return -0.5 * (L.LOG_2PI + 1.0 + log_var).sum(axis=-1)


def _batched(cov, batch):
    """A covariance ``(J, J)`` or ``(batch, J, J)`` as a contiguous ``(batch, J, J)`` array."""
    xp = get_array_module(cov)
    return xp.ascontiguousarray(xp.broadcast_to(cov, (batch, *cov.shape[-2:])))


def kl_normal_full(mean_q, cov_q, mean_p, cov_p):
    r""":math:`\mathrm{KL}(N(m_q, S)\,\|\,N(m_p, P))` between full-covariance Gaussians, per example.

    .. math::
        \mathrm{KL} = \tfrac12\Big[\operatorname{tr}(P^{-1}S)
            + (m_p - m_q)\,P^{-1}(m_p - m_q)^\top - J
            + \log\det P - \log\det S\Big]

    With :math:`m_p = 0`, :math:`P = I` and a diagonal :math:`S` it reduces to
    :func:`scratchvae.losses.kl_normal_std`.

    Parameters
    ----------
    mean_q : array ``(batch, J)``
    cov_q : array ``(J, J)`` or ``(batch, J, J)``, symmetric positive definite
    mean_p : array ``(J,)`` or ``(batch, J)``
    cov_p : array ``(J, J)`` or ``(batch, J, J)``, symmetric positive definite

    Returns
    -------
    array ``(batch,)``
    """
    xp = get_array_module(mean_q, cov_q, mean_p, cov_p)
    B, J = mean_q.shape
    S, P = _batched(cov_q, B), _batched(cov_p, B)
    diff = xp.broadcast_to(mean_p, (B, J)) - mean_q  # (B, J)
    trace = xp.trace(xp.linalg.solve(P, S), axis1=-2, axis2=-1)
    quad = (diff * xp.linalg.solve(P, diff[..., None])[..., 0]).sum(axis=-1)
    _, logdet_p = xp.linalg.slogdet(P)
    _, logdet_s = xp.linalg.slogdet(S)
    return 0.5 * (trace + quad - J + logdet_p - logdet_s)


def log_normal_full(z, mean, cov):
    r"""Full-covariance Gaussian log-density :math:`\log N(z; m, \Sigma)`.

    .. math::
        \log N(z; m, \Sigma) = -\tfrac12\Big[J\log 2\pi + \log\det\Sigma
            + (z - m)\,\Sigma^{-1}(z - m)^\top\Big]

    Parameters
    ----------
    z, mean : arrays ``(batch, J)``
    cov : array ``(J, J)`` or ``(batch, J, J)``

    Returns
    -------
    array ``(batch,)``
    """
    xp = get_array_module(z, mean, cov)
    B, J = z.shape
    C = _batched(cov, B)
    r = z - mean
    quad = (r * xp.linalg.solve(C, r[..., None])[..., 0]).sum(axis=-1)
    _, logdet = xp.linalg.slogdet(C)
    return -0.5 * (J * L.LOG_2PI + logdet + quad)


# --------------------------------------------------------------------------------------
# The linear-Gaussian VAE.
# --------------------------------------------------------------------------------------


class LinearGaussianVAE(VAE):
    r"""A VAE with a linear-Gaussian decoder, where :math:`\log p(x)` and :math:`p(z|x)` are exact.

    Generative model, for ``input_dim`` :math:`= D`, ``latent_dim`` :math:`= J`:

    .. math::
        z \sim N(0, I_J), \qquad x\,|\,z \sim N(zW + b,\ s^2 I_D)

    with ``W (J, D)`` and ``b (D,)`` the decoder's single :class:`~scratchvae.layers.Dense`
    layer (``y = z @ W + b``) and :math:`\log s^2` = ``gaussian_log_var``.
    Writing :math:`r = x - b`, everything is Gaussian:

    .. math::
        p(x) = N\big(b,\ W^\top W + s^2 I_D\big), \qquad
        p(z|x) = N\big(r\,W^\top\Sigma / s^2,\ \Sigma\big), \quad
        \Sigma = \Lambda^{-1},\ \Lambda = I_J + W W^\top / s^2 .

    The encoder is the ordinary VAE encoder (an MLP, or with ``hidden=()`` a
    single linear layer, which can represent the best diagonal ``q``; see
    :meth:`set_mean_field_encoder`). This is exactly

    ``VAE(input_dim, hidden, latent_dim, likelihood="gaussian", activation,
    decoder_hidden=(), gaussian_log_var=..., ...)``

    so :meth:`VAE.elbo`, :meth:`VAE.loss_and_grad` and
    :func:`scratchvae.evaluate.iwae_bound` run unchanged, and its
    :meth:`config` is that of the equivalent :class:`VAE`.

    Parameters
    ----------
    input_dim : int
    hidden : sequence of int
        Encoder hidden widths; ``()`` gives a linear encoder.
    latent_dim : int
    activation : str
        Encoder hidden activation.
    gaussian_log_var : float
        :math:`\log s^2`, the log-variance of the observation noise.
    dtype : {"float32", "float64"}
        Defaults to float64 here, since the closed forms are compared to round-off.
    **kwargs
        Any other keyword argument of :class:`VAE` (``backend``, ``seed``, ...).
    """

    def __init__(
        self,
        input_dim,
        hidden=(),
        latent_dim=2,
        activation="tanh",
        *,
        gaussian_log_var=0.0,
        dtype="float64",
        **kwargs,
    ):
        super().__init__(
            input_dim,
            hidden=hidden,
            latent_dim=latent_dim,
            likelihood="gaussian",
            activation=activation,
            decoder_hidden=(),
            gaussian_log_var=gaussian_log_var,
            dtype=dtype,
            **kwargs,
        )

    # ---------------------------------------------------------------- parameters

    @property
    def W(self):
        """Decoder weight ``(latent_dim, input_dim)``, a writable view into :attr:`params`."""
        return self.decoder.dense[0].W

    @property
    def b(self):
        """Decoder bias ``(input_dim,)``, a writable view into :attr:`params`."""
        return self.decoder.dense[0].b

    @property
    def noise_var(self) -> float:
        r"""Observation noise variance :math:`s^2 = \exp(\texttt{gaussian\_log\_var})`."""
        return math.exp(self.gaussian_log_var)

    def _f64(self, a, name, last_dim):
        """``a`` on the model's device in float64, checked to be ``(batch, last_dim)`` and finite."""
        a = to_device(a, self.xp, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != last_dim:
            raise ValueError(f"{name} must have shape (batch, {last_dim}), got {tuple(a.shape)}")
        if not bool(self.xp.isfinite(a).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return a

    def _x64(self, x):
        return self._f64(x, "x", self.input_dim)

    def _decoder64(self):
        """``(W, b)`` in float64: ``W (J, D)``, ``b (D,)``."""
        return self.W.astype(np.float64), self.b.astype(np.float64)

    def posterior_precision(self):
        r"""Precision of the exact posterior, :math:`\Lambda = I_J + W W^\top / s^2`, ``(J, J)``."""
        W, _ = self._decoder64()
        return self.xp.eye(self.latent_dim, dtype=np.float64) + (W @ W.T) / self.noise_var

    # ---------------------------------------------------------------- exact densities

    def log_marginal(self, x):
        r"""Exact :math:`\log p(x) = \log N(x;\ b,\ W^\top W + s^2 I_D)` per example.

        .. math::
            \log p(x) = -\tfrac12\Big[D\log 2\pi + \log\det C + (x - b)\,C^{-1}(x - b)^\top\Big],
            \qquad C = W^\top W + s^2 I_D

        computed from the ``(D, D)`` marginal covariance directly (not through
        the posterior), so that it is an independent reference for the
        identities that involve the posterior.

        Parameters
        ----------
        x : array ``(batch, input_dim)``

        Returns
        -------
        array ``(batch,)``, float64
        """
        xp = self.xp
        x = self._x64(x)
        W, b = self._decoder64()
        C = W.T @ W + self.noise_var * xp.eye(self.input_dim, dtype=np.float64)
        r = x - b
        quad = (r * xp.linalg.solve(C, r.T).T).sum(axis=-1)
        _, logdet = xp.linalg.slogdet(C)
        return -0.5 * (self.input_dim * L.LOG_2PI + logdet + quad)

    def log_joint(self, x, z):
        r""":math:`\log p(x, z) = \log p(x|z) + \log p(z)`, ``(batch,)``, through the model's own decoder.

        Parameters
        ----------
        x : array ``(batch, input_dim)``
        z : array ``(batch, latent_dim)``
        """
        x = self._x64(x)
        z = self._f64(z, "z", self.latent_dim)
        W, b = self._decoder64()
        return L.log_normal(x, z @ W + b, self.gaussian_log_var) + L.log_standard_normal(z)

    def posterior(self, x):
        r"""The exact posterior :math:`p(z|x) = N(m, \Sigma)`.

        .. math::
            \Lambda = I_J + \frac{W W^\top}{s^2}, \qquad \Sigma = \Lambda^{-1}, \qquad
            m = \frac{(x - b)\,W^\top\,\Sigma}{s^2}

        (complete the square in :math:`\log p(z) + \log p(x|z)`). The covariance
        is the same for every ``x``, and diagonal only when :math:`W W^\top` is.

        Parameters
        ----------
        x : array ``(batch, input_dim)``

        Returns
        -------
        mean : array ``(batch, latent_dim)``, float64
        cov : array ``(latent_dim, latent_dim)``, float64
        """
        x = self._x64(x)
        W, b = self._decoder64()
        cov = self.xp.linalg.inv(self.posterior_precision())
        cov = 0.5 * (cov + cov.T)
        mean = ((x - b) @ W.T) @ cov / self.noise_var
        return mean, cov

    def log_posterior(self, z, x):
        r""":math:`\log p(z|x) = \log N(z;\ m(x), \Sigma)` per example, ``(batch,)``.

        Parameters
        ----------
        z : array ``(batch, latent_dim)``
        x : array ``(batch, input_dim)``
        """
        z = self._f64(z, "z", self.latent_dim)
        mean, cov = self.posterior(x)
        return log_normal_full(z, mean, cov)

    # ---------------------------------------------------------------- the ELBO in closed form

    def _expected_log_likelihood(self, x, mean, trace_w_cov_w):
        r""":math:`\log p(x|z{=}m) - \operatorname{tr}(W^\top S W) / 2s^2` from the trace term ``(batch,)``."""
        W, b = self._decoder64()
        return L.log_normal(x, mean @ W + b, self.gaussian_log_var) - 0.5 * trace_w_cov_w / self.noise_var

    def expected_log_likelihood(self, x, mu, log_var):
        r""":math:`\mathbb E_{q}[\log p(x|z)]` for a diagonal :math:`q = N(\mu, \sigma^2)`.

        .. math::
            \mathbb E_q[\log p(x|z)] = \log N(x;\ \mu W + b,\ s^2 I)
                - \frac{1}{2s^2}\sum_j \sigma_j^2 \,\lVert W_{j\cdot}\rVert^2

        since :math:`\mathbb E_q\lVert x - b - zW\rVert^2 = \lVert x - b - \mu W\rVert^2
        + \operatorname{tr}(W^\top\,\mathrm{diag}(\sigma^2)\,W)`.

        Parameters
        ----------
        x : array ``(batch, input_dim)``
        mu, log_var : arrays ``(batch, latent_dim)``

        Returns
        -------
        array ``(batch,)``, float64
        """
        x = self._x64(x)
        mu = self._f64(mu, "mu", self.latent_dim)
        log_var = self._f64(log_var, "log_var", self.latent_dim)
        W, _ = self._decoder64()
        trace = (self.xp.exp(log_var) * (W * W).sum(axis=1)).sum(axis=-1)
        return self._expected_log_likelihood(x, mu, trace)

    def elbo_analytic(self, x, mu, log_var):
        r"""The exact ELBO of a diagonal Gaussian :math:`q(z|x) = N(\mu, \sigma^2)`.

        .. math::
            \mathrm{ELBO}(q) = \mathbb E_q[\log p(x|z)] - \mathrm{KL}(q\,\|\,p(z))

        with :meth:`expected_log_likelihood` and the analytic
        :func:`scratchvae.losses.kl_normal_std`. It is what the one-sample
        :meth:`VAE.elbo` estimates without bias when ``mu, log_var`` come from
        the encoder.

        Parameters
        ----------
        x : array ``(batch, input_dim)``
        mu, log_var : arrays ``(batch, latent_dim)``

        Returns
        -------
        array ``(batch,)``, float64
        """
        mu = self._f64(mu, "mu", self.latent_dim)
        log_var = self._f64(log_var, "log_var", self.latent_dim)
        return self.expected_log_likelihood(x, mu, log_var) - L.kl_normal_std(mu, log_var)

    def elbo_analytic_full(self, x, mean, cov):
        r"""The exact ELBO of a full-covariance Gaussian :math:`q = N(m, S)`.

        .. math::
            \mathrm{ELBO}(q) = \log N(x;\ mW + b,\ s^2 I) - \frac{\operatorname{tr}(W^\top S W)}{2s^2}
                - \mathrm{KL}(N(m, S)\,\|\,N(0, I))

        With ``(mean, cov) = posterior(x)`` it equals :meth:`log_marginal`.

        Parameters
        ----------
        x : array ``(batch, input_dim)``
        mean : array ``(batch, latent_dim)``
        cov : array ``(latent_dim, latent_dim)`` or ``(batch, latent_dim, latent_dim)``

        Returns
        -------
        array ``(batch,)``, float64
        """
        xp = self.xp
        x = self._x64(x)
        mean = self._f64(mean, "mean", self.latent_dim)
        cov = to_device(cov, xp, dtype=np.float64)
        W, _ = self._decoder64()
        B, J = mean.shape
        trace = xp.trace(W.T @ _batched(cov, B) @ W, axis1=-2, axis2=-1)
        kl = kl_normal_full(mean, cov, xp.zeros(J), xp.eye(J))
        return self._expected_log_likelihood(x, mean, trace) - kl

    def kl_to_posterior(self, x, mu, log_var):
        r""":math:`\mathrm{KL}(q(z|x)\,\|\,p(z|x))` for a diagonal :math:`q = N(\mu, \sigma^2)`.

        With the exact posterior :math:`N(m, \Lambda^{-1})`
        (:meth:`posterior`, :meth:`posterior_precision`):

        .. math::
            \mathrm{KL} = \tfrac12\Big[\sum_j \Lambda_{jj}\sigma_j^2 + (m - \mu)\,\Lambda\,(m - \mu)^\top
                - J - \log\det\Lambda - \sum_j\log\sigma_j^2\Big]

        It is the gap :math:`\log p(x) - \mathrm{ELBO}(q) \ge 0`.

        Parameters
        ----------
        x : array ``(batch, input_dim)``
        mu, log_var : arrays ``(batch, latent_dim)``

        Returns
        -------
        array ``(batch,)``, float64
        """
        xp = self.xp
        mu = self._f64(mu, "mu", self.latent_dim)
        log_var = self._f64(log_var, "log_var", self.latent_dim)
        cov_q = xp.exp(log_var)[:, :, None] * xp.eye(self.latent_dim)  # (B, J, J) diagonal
        return self.kl_to_posterior_full(x, mu, cov_q)

    def kl_to_posterior_full(self, x, mean, cov):
        r""":math:`\mathrm{KL}(N(m_q, S)\,\|\,p(z|x))` for a full-covariance ``q``; see :func:`kl_normal_full`.

        Parameters
        ----------
        x : array ``(batch, input_dim)``
        mean : array ``(batch, latent_dim)``
        cov : array ``(latent_dim, latent_dim)`` or ``(batch, latent_dim, latent_dim)``

        Returns
        -------
        array ``(batch,)``, float64
        """
        mean = self._f64(mean, "mean", self.latent_dim)
        cov = to_device(cov, self.xp, dtype=np.float64)
        post_mean, post_cov = self.posterior(x)
        return kl_normal_full(mean, cov, post_mean, post_cov)

    # ---------------------------------------------------------------- the best diagonal encoder

    def set_mean_field_encoder(self):
        r"""Set a linear encoder (``hidden=()``) to the best diagonal Gaussian :math:`q(z|x)`.

        Among diagonal Gaussians, :math:`\mathrm{KL}(q\,\|\,N(m, \Lambda^{-1}))` is
        smallest at

        .. math:: \mu = m(x) = \frac{(x - b)\,W^\top\Sigma}{s^2}, \qquad \sigma_j^2 = \frac{1}{\Lambda_{jj}}

        (Bishop, PRML §10.1.2), both of which a linear encoder
        :math:`[\mu, \log\sigma^2] = x W_e + b_e` represents exactly. When
        :math:`W W^\top` is diagonal this ``q`` *is* the posterior and the ELBO
        equals :math:`\log p(x)`.

        Raises
        ------
        ValueError
            If the encoder has hidden layers.
        """
        if self.hidden:
            raise ValueError(f"set_mean_field_encoder needs a linear encoder (hidden=()), got hidden={self.hidden}")
        xp, J = self.xp, self.latent_dim
        W, b = self._decoder64()
        precision = self.posterior_precision()
        gain = W.T @ xp.linalg.inv(precision) / self.noise_var  # (D, J): m = (x - b) @ gain
        enc = self.encoder.dense[0]
        enc.W[:, :J] = gain
        enc.b[:J] = -(b @ gain)
        enc.W[:, J:] = 0
        log_var = -xp.log(xp.diagonal(precision))
        c = self.log_var_bound  # the encoder's output h gives log_var = c tanh(h / c): invert it
        enc.b[J:] = log_var if c is None else c * xp.arctanh(log_var / c)
