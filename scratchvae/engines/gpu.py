r"""The ``gpu`` engine: the reference step on CuPy in kept buffers and fused CUDA kernels.

Opt-in (``--engine gpu``) until a GPU run has checked it against the
reference step: ``auto`` stays ``reference`` on CuPy. One ELBO step of a VAE
with a Bernoulli or Gaussian (fixed or learned variance) likelihood is:

* per dense layer, the product ``x W`` into a kept buffer, then one
  ``bias_activation`` kernel (forward), and ``activation_backward``, the
  products for ``d_W``, ``d_x`` and one sum for ``d_b`` (backward);
* ``philox_normal`` for the noise, ``reparameterize_kl`` for
  :math:`z = \mu + \sigma\epsilon` and the KL terms, the likelihood kernel for
  :math:`-\log p(x|z)` and its gradient at once, two sums and ``batch_means``
  for the loss and its parts, ``reparameterize_kl_backward`` for the gradient
  of the encoder's output, and one ``adam_update`` or ``sgd_update`` over the
  flat parameter buffer (:mod:`~scratchvae.engines.gpu_kernels` holds their
  sources and formulas).

For the default 784-400-20 model that is 29 launches a step, counted from the
code: 11 matrix products, 6 sums (4 bias gradients, 2 for the loss) and 12
kernels of its own; ``benchmarks/throughput.py --count-kernels`` counts what
the GPU actually runs (cuBLAS may split a product into more than one kernel).

Nothing in a step waits for the GPU: the returned losses are 0-d device
arrays, read when the trainer reads them. The noise of step ``t`` (the
optimiser's step count, which checkpoints keep) is a function of the model's
seed, the noise stream and ``t`` alone, so a resumed run draws exactly the
noise an uninterrupted one draws.
"""

from __future__ import annotations

import numpy as np

from ..model import VAE, Loss
from ..optim import SGD, Adam
from ..rng import STREAM_NOISE
from .gpu_kernels import ACTIVATION_CODES, ELEMENT_TYPES, KERNELS, SOURCE
from .reference import check_engine_arguments, check_step_beta

THREADS_PER_BLOCK = 256
LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


def compile_kernels(xp, dtype) -> dict:
    """The kernels of :data:`~scratchvae.engines.gpu_kernels.KERNELS` for ``dtype``, compiled by CuPy (NVRTC)."""
    module = xp.RawModule(code=SOURCE, options=("-DSCRATCHVAE_REAL=" + ELEMENT_TYPES[np.dtype(dtype).name],))
    return {name: module.get_function(name) for name in KERNELS}


def check_gpu_model(model, optimizer, objective) -> None:
    """One line (``ValueError``) for what the gpu engine cannot run: what it computes first, then where."""
    if not isinstance(model, VAE) or objective != "elbo" or model.likelihood not in LIKELIHOODS:
        what = "an autoencoder" if not isinstance(model, VAE) else f"objective {objective!r} with {model.likelihood!r}"
        raise ValueError(f"engine 'gpu' runs the ELBO of a VAE ({', '.join(LIKELIHOODS)} likelihood), not {what}; "
                         "use engine 'reference'")  # fmt: skip
    if not isinstance(optimizer, (Adam, SGD)):
        raise ValueError(f"engine 'gpu' updates with Adam or SGD, not {type(optimizer).__name__}")
    if model.xp is np:
        raise ValueError("engine 'gpu' runs on CuPy arrays, and this model is on numpy: use backend 'cupy' "
                         "(--backend cupy), or engine 'cpu' or 'reference'")  # fmt: skip


class GPUEngine:
    """ELBO training steps of a CuPy ``model`` with ``optimizer`` (Adam or SGD) in fused kernels.

    ``objective`` must be ``"elbo"`` (``k = 1``); ``threads`` must be None or 1.
    """

    name = "gpu"
    threads = 1

    def __init__(self, model, optimizer, *, objective="elbo", k=1, threads=None):
        objective, k, _ = check_engine_arguments(model, optimizer, objective, k)
        if threads not in (None, 1):
            raise ValueError(f"threads (here {threads!r}) apply to engine 'cpu'; engine 'gpu' runs one stream")
        check_gpu_model(model, optimizer, objective)
        self.model, self.optimizer, self.xp = model, optimizer, model.xp
        self.kernels = compile_kernels(self.xp, model.dtype)
        self.buffers = {}

    # ---------------------------------------------------------------- helpers

    def _buffer(self, key, shape):
        buf = self.buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self.buffers[key] = self.xp.empty(shape, dtype=self.model.dtype)
        return buf

    def _launch(self, name, n, *args):
        blocks = (int(n) + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
        self.kernels[name]((max(blocks, 1),), (THREADS_PER_BLOCK,), args)

    def _scalar(self, value):
        return np.dtype(self.model.dtype).type(value)

    def _forward(self, mlp, x, tag):
        """The activations of every layer of ``mlp`` (the last is the output), in kept buffers."""
        xp, outputs, h = self.xp, [], x
        last = len(mlp.dense) - 1
        for i, layer in enumerate(mlp.dense):
            y = self._buffer((tag, "y", i), (h.shape[0], layer.W.shape[1]))
            xp.matmul(h, layer.W, out=y)
            code = 0 if i == last else ACTIVATION_CODES[mlp.activation]
            self._launch("bias_activation", y.size, y, layer.b, np.int32(y.shape[0]), np.int32(y.shape[1]),
                         np.int32(code))  # fmt: skip
            outputs.append(y)
            h = y
        return outputs

    def _backward(self, mlp, x, outputs, d_out, tag):
        """Gradients of ``mlp``'s parameters into the model's grads from ``d_out``; returns ``d_x``."""
        xp = self.xp
        d = d_out
        last = len(mlp.dense) - 1
        for i in range(last, -1, -1):
            layer = mlp.dense[i]
            if i != last:
                self._launch("activation_backward", d.size, d, outputs[i], np.int32(d.size),
                             np.int32(ACTIVATION_CODES[mlp.activation]))  # fmt: skip
            h = x if i == 0 else outputs[i - 1]
            xp.matmul(h.T, d, out=layer.d_W)
            d.sum(axis=0, out=layer.d_b)
            if i == 0 and tag == "enc":
                return None  # the gradient for x goes unused
            d_h = self._buffer((tag, "d", i), h.shape)
            xp.matmul(d, layer.W.T, out=d_h)
            d = d_h
        return d

    # ---------------------------------------------------------------- the step

    def step(self, x, beta=1.0, *, check_input=True) -> Loss:
        """Loss and gradient of the batch ``x``, then one optimiser update; returns the loss before the update.

        ``check_input=False`` skips the input checks (they read the batch back
        to the host); the trainer checks its data once, up front.
        """
        model, xp = self.model, self.xp
        beta = check_step_beta(beta, weighed=True)
        x = model.check_input(x) if check_input else xp.asarray(x, dtype=model.dtype)
        B, J, D = x.shape[0], model.latent_dim, model.input_dim
        c = self._scalar(model.log_var_bound or 0.0)
        # F1-F3, F6: encoder, noise of step t, reparameterization and KL terms
        enc = self._forward(model.encoder, x, "enc")
        eps = self._buffer("eps", (B, J))
        seed = model.seed & 0xFFFFFFFFFFFFFFFF
        self._launch("philox_normal", -(-eps.size // 4), eps, np.int64(eps.size), np.uint32(seed & 0xFFFFFFFF),
                     np.uint32(seed >> 32), np.uint32(self.optimizer.t), np.uint32(STREAM_NOISE))  # fmt: skip
        z, log_var, sigma, kl_terms = (self._buffer(name, (B, J)) for name in ("z", "log_var", "sigma", "kl"))
        self._launch("reparameterize_kl", B * J, enc[-1], eps, z, log_var, sigma, kl_terms, np.int32(B), np.int32(J), c)
        # F4, F5 and B5: decoder, likelihood and its gradient in one kernel
        dec = self._forward(model.decoder, z, "dec")
        nll_terms, d_dec_out = self._buffer("nll", (B, D)), self._buffer("d_dec_out", dec[-1].shape)  # (B, D or 2D)
        scale = self._scalar(1.0 / B)
        if model.likelihood == "bernoulli":
            self._launch("bernoulli_nll", B * D, dec[-1], x, nll_terms, d_dec_out, np.int32(B * D), scale)
        elif model.likelihood == "gaussian":
            self._launch("gaussian_nll", B * D, dec[-1], x, nll_terms, d_dec_out, np.int32(B * D),
                         self._scalar(model.gaussian_log_var), scale)  # fmt: skip
        else:
            self._launch("gaussian_learned_nll", B * D, dec[-1], x, nll_terms, d_dec_out, np.int32(B), np.int32(D),
                         c, scale)  # fmt: skip
        # F7, F8: batch means, left on the device (a new array each step: the trainer reads them later)
        parts = xp.empty(3, dtype=model.dtype)
        self._launch("batch_means", 1, nll_terms.sum(), kl_terms.sum(), parts, self._scalar(B), self._scalar(beta))
        # B4: decoder backward; B6, B3, B2: encoder output's gradient; B1: encoder backward
        d_z = self._backward(model.decoder, z, dec, d_dec_out, "dec")
        d_enc_out = self._buffer("d_enc_out", (B, 2 * J))
        self._launch("reparameterize_kl_backward", B * J, d_z, enc[-1], eps, log_var, sigma, d_enc_out, np.int32(B),
                     np.int32(J), self._scalar(beta / B), c)  # fmt: skip
        self._backward(model.encoder, x, enc, d_enc_out, "enc")
        self._update()
        return Loss(parts[0], parts[1], parts[2])

    def _update(self):
        """The optimiser's step (as ``optimizer.step()`` computes it) in one kernel over the flat buffer."""
        opt, n, s = self.optimizer, np.int64(self.model.params.size), self._scalar
        opt.t += 1
        if isinstance(opt, Adam):
            bc1, bc2 = 1.0 - opt.beta1**opt.t, 1.0 - opt.beta2**opt.t
            self._launch("adam_update", n, opt.params, opt.grads, opt.m, opt.v, n, s(opt.lr), s(opt.beta1),
                         s(opt.beta2), s(opt.eps), s(opt.weight_decay), s(bc1), s(bc2))  # fmt: skip
        else:
            self._launch("sgd_update", n, opt.params, opt.grads, opt.velocity, n, s(opt.lr), s(opt.momentum),
                         s(opt.weight_decay))  # fmt: skip

    def close(self):
        """Release the kept buffers."""
        self.buffers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
