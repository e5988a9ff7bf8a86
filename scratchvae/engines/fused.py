r"""One thread's share of a training step, in kept buffers and in place: the arithmetic of the ``cpu`` engine.

Every function here computes what a reference function computes
(:meth:`VAE.loss_and_grad <scratchvae.model.VAE.loss_and_grad>`,
:func:`~scratchvae.objectives.iwae_loss_and_grad`,
:meth:`Autoencoder.loss_and_grad <scratchvae.model.Autoencoder.loss_and_grad>`,
:meth:`Adam.step <scratchvae.optim.Adam.step>`, :meth:`SGD.step
<scratchvae.optim.SGD.step>`), with the same numbers up to rounding
(``tests/test_engines.py`` checks each against the reference). What differs
is only how the arrays are handled, measured in ``benchmarks/NOTES.md``:

* every array of a step lives in a buffer kept from the previous step of the
  same shape (:class:`Workspace`): a fresh array of a batch's size costs more
  than the arithmetic on it (items 5 and 7);
* activations, the Bernoulli loss and its gradient, and the optimiser's
  update run in place, a NumPy call per pass over a buffer (items 1, 2, 7);
* each layer is used once per step, so its gradient is written, not added
  (no zeroing pass over the gradient buffer; item 5);
* the layer's input gradient :math:`d_y W^\top` is written column-major for
  wide layers and few rows, where OpenBLAS computes it faster (item 10);
* the sums over the batch are divided by ``n_total``, the rows of the
  whole batch, so that the losses and gradients of the parts of a batch
  split over threads add up to the batch's (:mod:`scratchvae.engines.cpu`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import losses as L
from ..layers import Dense, split_flat
from ..model import Loss

# --------------------------------------------------------------------------------------
# Kept buffers.
# --------------------------------------------------------------------------------------


class Workspace:
    """Work buffers kept across training steps, one per key, reallocated when the shape changes.

    Arrays handed out by a workspace are overwritten by the next step: only
    code that finishes with them within one step may use it.
    """

    def __init__(self):
        self.buffers = {}

    def get(self, key, shape, dtype, order="C"):
        """The buffer kept under ``key``: an uninitialised array of ``shape`` and ``dtype``, in memory ``order`` ("C" or "F")."""
        a = self.buffers.get(key)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype or not a.flags[f"{order}_CONTIGUOUS"]:
            a = self.buffers[key] = np.empty(shape, dtype=dtype, order=order)
        return a


def input_grad_order(rows, layer) -> str:
    r"""Memory order of the buffer :math:`d_x = d_y W^\top` is written into: ``"F"`` or ``"C"``.

    Column-major (the product is then computed as :math:`(W d_y^\top)^\top`)
    for a layer with at least four times as many inputs and outputs as rows,
    where OpenBLAS computes it faster; row-major otherwise, where the mixed
    orders of the steps around it cost more than the product saves
    (``benchmarks/NOTES.md``, item 10).
    """
    return "F" if layer.n_in >= 4 * rows and layer.n_out >= 4 * rows else "C"


# --------------------------------------------------------------------------------------
# Activations in place: forward overwrites its input, backward its upstream gradient.
# Each returns what it computed; ``saved`` is what the forward keeps for the backward.
# --------------------------------------------------------------------------------------


ACTIVATIONS_IN_PLACE = ("identity", "relu", "tanh", "sigmoid", "softplus")


def _sigmoid_into(a, out):
    r""":math:`\sigma(a) = \tfrac12(1 + \tanh(a/2))` written into ``out`` (which may be ``a``)."""
    np.multiply(a, 0.5, out=out)
    np.tanh(out, out=out)
    out += 1.0
    out *= 0.5
    return out


def activate(name, a, ws, key):
    """``(y, saved)``: activation ``name`` of the pre-activation ``a``, in place where the backward allows."""
    if name == "identity":
        return a, None
    if name == "relu":
        y = np.maximum(a, 0, out=a)
        return y, y
    if name == "tanh":
        y = np.tanh(a, out=a)
        return y, y
    if name == "sigmoid":
        y = _sigmoid_into(a, a)
        return y, y
    if name == "softplus":  # the backward needs a: softplus(a) = max(a, 0) + log(1 + e^{-|a|}) goes elsewhere
        y, t = ws.get(key + ("y",), a.shape, a.dtype), ws.get(key + ("t",), a.shape, a.dtype)
        np.abs(a, out=y)
        np.negative(y, out=y)
        np.exp(y, out=y)
        np.log1p(y, out=y)
        y += np.maximum(a, 0, out=t)
        return y, a
    raise ValueError(f"engine 'cpu' has no in-place form of the activation {name!r}; use engine 'reference'")


def differentiate(name, d_y, saved, ws, key):
    """``d_a`` from ``d_y`` (overwritten) for activation ``name``; ``saved`` as :func:`activate` returned it."""
    if name == "identity":
        return d_y
    t = ws.get(key + ("t",), d_y.shape, d_y.dtype)
    if name == "relu":  # d_a = d_y [y > 0]
        np.greater(saved, 0, out=t)  # 1.0 where y > 0, else 0.0
    elif name == "tanh":  # d_a = d_y (1 - y^2)
        np.multiply(saved, saved, out=t)
        np.subtract(1.0, t, out=t)
    elif name == "sigmoid":  # d_a = d_y y (1 - y)
        np.subtract(1.0, saved, out=t)
        t *= saved
    else:  # softplus: d_a = d_y sigma(a)
        _sigmoid_into(saved, t)
    d_y *= t
    return d_y


# --------------------------------------------------------------------------------------
# An MLP's forward and backward in kept buffers.
# --------------------------------------------------------------------------------------


class FusedMLP:
    """Forward and backward through a reference :class:`~scratchvae.layers.MLP`, in kept buffers.

    Reads each dense layer's ``W`` and ``b`` (views of the model's
    parameters, shared by every thread) and writes the weight gradients into
    ``grad_views``, ``[(d_W, d_b), ...]`` in the layers' order: views of the
    gradient buffer of the thread that runs it.
    """

    def __init__(self, mlp, grad_views, ws, name):
        self.layers, self.ws, self.name = mlp.layers, ws, name
        views = iter(grad_views)
        self.grads = [next(views) if isinstance(layer, Dense) else None for layer in self.layers]
        self.saved = [None] * len(self.layers)

    def forward(self, x):
        """``y`` from ``x (rows, n_in)``: into a kept buffer per layer, activations in place."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                self.saved[i] = x
                y = self.ws.get((self.name, "y", i), (x.shape[0], layer.n_out), x.dtype)
                np.matmul(x, layer.W, out=y)
                y += layer.b
                x = y
            else:
                x, self.saved[i] = activate(layer.name, x, self.ws, (self.name, "a", i))
        return x

    def backward(self, d_y, need_input_grad=True):
        """``d_x`` from ``d_y`` (overwritten), writing every layer's ``d_W, d_b``; ``None`` without ``need_input_grad``."""
        rows = d_y.shape[0]
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if not isinstance(layer, Dense):
                d_y = differentiate(layer.name, d_y, self.saved[i], self.ws, (self.name, "a", i))
                continue
            d_W, d_b = self.grads[i]
            np.matmul(self.saved[i].T, d_y, out=d_W)
            d_y.sum(axis=0, out=d_b)
            if i == 0 and not need_input_grad:  # the first layer's input is data
                return None
            out = self.ws.get((self.name, "d_x", i), (rows, layer.n_in), d_y.dtype, input_grad_order(rows, layer))
            d_y = np.matmul(d_y, layer.W.T, out=out)
        return d_y


# --------------------------------------------------------------------------------------
# The Bernoulli loss and its gradient in two buffers.
# --------------------------------------------------------------------------------------


def bernoulli_nll_and_grad(logits, x, out, tmp):
    r""":func:`~scratchvae.losses.bernoulli_nll` and its gradient per unit upstream gradient, in two buffers.

    .. math::
        \mathrm{nll} = \sum_d \big[\log(1 + e^{-|l_d|}) + \max(l_d, 0) - x_d\, l_d\big],\qquad
        \frac{\partial\,\mathrm{nll}}{\partial l_d} = \sigma(l_d) - x_d = \tfrac12\big(1 + \tanh\tfrac{l_d}{2}\big) - x_d

    The same numbers as ``bernoulli_nll(logits, x)`` and
    ``bernoulli_nll_backward(1.0, logits, x)``. ``out`` receives the gradient,
    ``tmp`` is scratch (both ``(rows, dim)``). Returns ``(nll (rows,), out)``.
    """
    np.abs(logits, out=tmp)
    np.negative(tmp, out=tmp)
    np.exp(tmp, out=tmp)
    np.log1p(tmp, out=tmp)  # log(1 + e^{-|l|})
    tmp += np.maximum(logits, 0, out=out)  # softplus(l)
    np.multiply(x, logits, out=out)
    tmp -= out
    nll = tmp.sum(axis=-1)
    _sigmoid_into(logits, out)
    out -= x
    return nll, out


# --------------------------------------------------------------------------------------
# One thread's rows: loss and gradient.
# --------------------------------------------------------------------------------------


class Lane:
    """What one thread needs for its rows of a batch: kept buffers, its gradient buffer, fused passes.

    ``grads`` is the flat gradient buffer this lane writes (the model's own
    for the first thread, one of its own for each other). The methods return
    the rows' share of the batch's loss, dividing the sums over rows by
    ``n_total``, and write the gradient of that share into ``grads``.
    """

    def __init__(self, model, grads):
        self.model, self.grads, self.ws = model, grads, Workspace()
        dense = model.dense_layers
        views = [layer.split(g) for layer, g in zip(dense, split_flat(dense, grads))]
        n_encoder = len(model.encoder.dense)
        self.encoder = FusedMLP(model.encoder, views[:n_encoder], self.ws, "encoder")
        self.decoder = FusedMLP(model.decoder, views[n_encoder:], self.ws, "decoder")

    def _recon_nll_and_grad(self, dec_out, x):
        """``-log p(x|z)`` per row and its gradient with respect to ``dec_out`` for an upstream gradient of 1."""
        model = self.model
        if model.likelihood == "bernoulli":
            out = self.ws.get("d_dec_out", dec_out.shape, dec_out.dtype)
            return bernoulli_nll_and_grad(dec_out, x, out, self.ws.get("nll_tmp", dec_out.shape, dec_out.dtype))
        return model.reconstruction_nll(dec_out, x), model.reconstruction_nll_backward(1.0, dec_out, x)

    def elbo(self, x, eps, beta, n_total) -> Loss:
        """The rows' share of :meth:`VAE.loss_and_grad <scratchvae.model.VAE.loss_and_grad>` (noise ``eps`` ``(rows, J)``)."""
        B, c, J = n_total, self.model.log_var_bound, self.model.latent_dim
        enc_out = self.encoder.forward(x)
        mu, log_var = enc_out[:, :J], L.bound_log_var(enc_out[:, J:], c)
        z, sigma = L.reparameterize(mu, log_var, eps)
        dec_out = self.decoder.forward(z)
        recon, d_dec_out = self._recon_nll_and_grad(dec_out, x)  # d recon_b / d dec_out_b
        kl = L.kl_normal_std(mu, log_var)
        recon_mean, kl_mean = recon.sum() / B, kl.sum() / B
        loss = recon_mean + beta * kl_mean
        d_dec_out *= 1.0 / B
        d_z = self.decoder.backward(d_dec_out)
        d_mu, d_log_var = L.reparameterize_backward(d_z, eps, sigma)
        d_mu_kl, d_log_var_kl = L.kl_normal_std_backward(beta / B, mu, log_var)
        d_enc_out = self.ws.get("d_enc_out", (x.shape[0], 2 * J), x.dtype)
        np.add(d_mu, d_mu_kl, out=d_enc_out[:, :J])
        d_enc_out[:, J:] = L.bound_log_var_backward(d_log_var + d_log_var_kl, log_var, c)
        self.encoder.backward(d_enc_out, need_input_grad=False)
        return Loss(loss, recon_mean, kl_mean)

    def iwae(self, x, eps, k, n_total) -> Loss:
        """The rows' share of :func:`~scratchvae.objectives.iwae_loss_and_grad` (noise ``eps`` ``(k, rows, J)``)."""
        model, n, c = self.model, n_total, self.model.log_var_bound
        K, (B, D), J = k, x.shape, model.latent_dim
        enc_out = self.encoder.forward(x)
        mu, log_var = enc_out[:, :J], L.bound_log_var(enc_out[:, J:], c)
        z, sigma = L.reparameterize(mu, log_var, eps)  # (K, B, J)
        dec_out = self.decoder.forward(z.reshape(K * B, J))
        x_k = self.ws.get("x_k", (K * B, D), x.dtype)
        x_k.reshape(K, B, D)[...] = x
        recon, d_dec_out = self._recon_nll_and_grad(dec_out, x_k)
        recon = recon.reshape(K, B)
        log_pz = L.log_standard_normal(z)
        log_qz = L.log_q_reparameterized(log_var, eps)
        log_w = -recon + log_pz - log_qz
        top = log_w.max(axis=0)
        w_shift = np.exp(log_w - top)
        w_sum = w_shift.sum(axis=0)
        w_norm = w_shift / w_sum
        bound = top + np.log(w_sum) - math.log(K)
        loss = -bound.sum() / n
        recon_mean = (w_norm * recon).sum(axis=0).sum() / n
        kl_mean = (w_norm * (log_qz - log_pz)).sum(axis=0).sum() / n
        d_log_w = w_norm * (-1.0 / n)
        d_dec_out *= (-d_log_w).reshape(K * B, 1)
        d_z = self.decoder.backward(d_dec_out).reshape(K, B, J)
        d_z += d_log_w[..., None] * (-z)
        d_mu, d_log_var = L.reparameterize_backward(d_z, eps, sigma)
        d_log_var += d_log_w[..., None] * 0.5  # d log q / d log_var = -1/2, times d_log_qz = -d_log_w
        d_enc_out = self.ws.get("d_enc_out", (B, 2 * J), x.dtype)
        d_enc_out[:, :J] = d_mu.sum(axis=0)
        d_enc_out[:, J:] = L.bound_log_var_backward(d_log_var.sum(axis=0), log_var, c)
        self.encoder.backward(d_enc_out, need_input_grad=False)
        return Loss(loss, recon_mean, kl_mean)

    def squared_error(self, x, n_total) -> Loss:
        """The rows' share of :meth:`Autoencoder.loss_and_grad <scratchvae.model.Autoencoder.loss_and_grad>`."""
        out_act = self.model.output
        code = self.encoder.forward(x)
        x_hat, saved = activate(out_act, self.decoder.forward(code), self.ws, ("out",))
        diff, square = self.ws.get("diff", x.shape, x.dtype), self.ws.get("square", x.shape, x.dtype)
        np.subtract(x_hat, x, out=diff)
        loss = np.multiply(diff, diff, out=square).sum() / n_total
        diff *= 2.0 / n_total  # d x_hat
        d_code = self.decoder.backward(differentiate(out_act, diff, saved, self.ws, ("out",)))
        self.encoder.backward(d_code, need_input_grad=False)
        return Loss(loss, loss, np.zeros((), dtype=x.dtype))


# --------------------------------------------------------------------------------------
# The optimisers' updates, a slice of the flat buffer at a time.
# --------------------------------------------------------------------------------------

UPDATE_CHUNK = 1 << 16  # elements: the five arrays of an update (64k float32 each) stay in a 2 MiB L2 cache


def chunks(part: slice, size: int = UPDATE_CHUNK):
    """``part`` (a slice with a start and a stop) cut into consecutive slices of at most ``size`` elements.

    A step on one thread updates the parameters chunk by chunk: each of the
    update's dozen passes then reads what the previous one wrote from the
    cache, not from memory (``benchmarks/NOTES.md``, item 12).
    """
    return [slice(i, min(i + size, part.stop)) for i in range(part.start, part.stop, size)]



def adam_update(opt, part, tmp):
    r""":meth:`Adam.step <scratchvae.optim.Adam.step>` on ``params[part]`` at step ``opt.t`` (already counted), in place.

    Twelve passes over the slice, into the kept buffer ``tmp`` (like
    ``params``), with the bias corrections folded into two scalars,
    :math:`c_t = \sqrt{1-\beta_2^t}`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\,g, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\,g^2, \qquad
        \theta \mathrel{-}= \frac{\eta\,c_t}{1-\beta_1^t}\,\frac{m}{\sqrt v + \varepsilon c_t}

    since :math:`\sqrt{\hat v_t} + \varepsilon = (\sqrt{v_t} + \varepsilon c_t)/c_t`.
    The update of a slice depends on that slice alone.
    """
    p, g, m, v, tmp = (a[part] for a in (opt.params, opt.grads, opt.m, opt.v, tmp))
    if opt.weight_decay:
        g = g + opt.weight_decay * p
    b1, b2, t = opt.beta1, opt.beta2, opt.t
    m *= b1
    np.multiply(g, 1.0 - b1, out=tmp)
    m += tmp
    v *= b2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v += tmp
    c = math.sqrt(1.0 - b2**t)
    np.sqrt(v, out=tmp)
    tmp += opt.eps * c
    np.divide(m, tmp, out=tmp)
    tmp *= opt.lr * c / (1.0 - b1**t)
    p -= tmp


def sgd_update(opt, part, tmp):
    """:meth:`SGD.step <scratchvae.optim.SGD.step>` on ``params[part]`` (the step already counted), in place."""
    p, g, velocity, tmp = (a[part] for a in (opt.params, opt.grads, opt.velocity, tmp))
    if opt.weight_decay:
        g = g + opt.weight_decay * p
    velocity *= opt.momentum
    velocity += g
    np.multiply(velocity, opt.lr, out=tmp)
    p -= tmp
