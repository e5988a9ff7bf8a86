r"""Optimisers that update a model's flat parameter buffer in a few vectorised passes.

Both take any object with ``params`` and ``grads`` (1-D arrays of equal
length, as :class:`~scratchvae.model.VAE` exposes) and update ``params`` in
place from ``grads``. Their state is plain arrays, returned by
:meth:`state_dict` for checkpoints.

``step()`` is ``t += 1`` followed by ``update(slice(None))``. The update of
any slice of the buffer depends only on that slice, so
:class:`~scratchvae.parallel.ParallelStep` advances ``t`` once and lets
each thread ``update`` its own slice.
"""

from __future__ import annotations

import math

from .backend import get_array_module


def _check_lr(lr):
    try:
        value = float(lr)
    except (TypeError, ValueError):  # None, "fast", ...
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    return value


class SGD:
    r"""Stochastic gradient descent with (heavy-ball) momentum and optional L2 weight decay.

    .. math::
        g_t = \nabla_\theta L + \lambda\theta_{t-1}, \qquad
        v_t = \mu\, v_{t-1} + g_t, \qquad
        \theta_t = \theta_{t-1} - \eta\, v_t
    """

    def __init__(self, model, lr=0.01, momentum=0.9, weight_decay=0.0):
        self.params, self.grads = model.params, model.grads
        self.lr = _check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.t = 0
        self.velocity = self.params * 0

    def step(self):
        """One update of ``params`` in place from the current ``grads``."""
        self.t += 1
        self.update(slice(None))

    def update(self, part: slice):
        """Update ``params[part]`` from ``grads[part]`` (the step count ``t`` is left alone)."""
        p, g, velocity = self.params[part], self.grads[part], self.velocity[part]
        if self.weight_decay:
            g = g + self.weight_decay * p
        velocity *= self.momentum
        velocity += g
        p -= self.lr * velocity

    def state_dict(self):
        """``{"t": steps taken, "velocity": array like params}`` (live arrays, not copies)."""
        return {"t": self.t, "velocity": self.velocity}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned (arrays are copied into the kept buffers)."""
        self.t = int(state["t"])
        self.velocity[...] = state["velocity"]


class Adam:
    r"""Adam (Kingma & Ba, 2015) with bias correction and optional L2 weight decay.

    .. math::
        g_t = \nabla_\theta L + \lambda\theta_{t-1}

        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2

        \theta_t = \theta_{t-1} - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \varepsilon},\qquad
        \hat m_t = \frac{m_t}{1-\beta_1^t},\ \hat v_t = \frac{v_t}{1-\beta_2^t}

    The buffers hold the moments without their :math:`(1-\beta)` factors,
    :math:`M_t = m_t/(1-\beta_1) = \beta_1 M_{t-1} + g_t` and
    :math:`V_t = v_t/(1-\beta_2) = \beta_2 V_{t-1} + g_t^2` (``m_sum``,
    ``v_sum``; the properties ``m`` and ``v`` give the textbook ones), and the
    update is computed as

    .. math::
        \theta_t = \theta_{t-1} - \eta_t\,\frac{M_t}{\sqrt{V_t} + \hat\varepsilon_t},\qquad
        c_t = \sqrt{\frac{1-\beta_2}{1-\beta_2^t}},\quad
        \eta_t = \frac{\eta\,(1-\beta_1)}{(1-\beta_1^t)\,c_t},\quad
        \hat\varepsilon_t = \frac{\varepsilon}{c_t}

    (since :math:`\hat m_t = \frac{1-\beta_1}{1-\beta_1^t} M_t` and
    :math:`\sqrt{\hat v_t} = c_t\sqrt{V_t}`): the same numbers up to rounding
    in ten passes over the buffer instead of twelve (``benchmarks/NOTES.md``, item 10).
    :math:`V` runs up to :math:`1/(1-\beta_2)` times :math:`v` (1000 times for
    0.999), so in float32 it overflows to inf once gradients reach about
    :math:`10^{17}`; the parameters then stop moving but stay finite, which is
    why the trainer also checks the optimiser's state before each checkpoint.
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.grads = model.params, model.grads
        self.lr = _check_lr(lr)
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.beta1, self.beta2, self.eps, self.weight_decay = b1, b2, float(eps), float(weight_decay)
        self.t = 0
        self.m_sum = self.params * 0
        self.v_sum = self.params * 0
        self._tmp = self.params * 0

    @property
    def m(self):
        r"""The first moment :math:`m_t = (1-\beta_1) M_t`: a new array (writing to it changes nothing here)."""
        return self.m_sum * (1.0 - self.beta1)

    @property
    def v(self):
        r"""The second moment :math:`v_t = (1-\beta_2) V_t`: a new array (writing to it changes nothing here)."""
        return self.v_sum * (1.0 - self.beta2)

    def step(self):
        """One update of ``params`` in place from the current ``grads`` (10 passes; no allocation without weight decay)."""
        self.t += 1
        self.update(slice(None))

    def update(self, part: slice):
        """Update ``params[part]`` from ``grads[part]`` at the current step count ``t`` (not advanced)."""
        xp = get_array_module(self.params)
        # every pass writes into a kept buffer
        p, g, m, v, tmp = (a[part] for a in (self.params, self.grads, self.m_sum, self.v_sum, self._tmp))
        if self.weight_decay:
            g = g + self.weight_decay * p
        b1, b2, t = self.beta1, self.beta2, self.t
        if t < 1:
            raise ValueError("Adam.update needs t >= 1 (step() advances t, then updates)")
        m *= b1  # M = b1 M + g
        m += g
        xp.multiply(g, g, out=tmp)  # V = b2 V + g^2
        v *= b2
        v += tmp
        # params -= eta_t M / (sqrt(V) + eps_t)
        c = math.sqrt((1.0 - b2) / (1.0 - b2**t))
        step_size = self.lr * (1.0 - b1) / ((1.0 - b1**t) * c)
        xp.sqrt(v, out=tmp)
        tmp += self.eps / c
        xp.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp

    def state_dict(self):
        """``{"t": steps taken, "m_sum", "v_sum": moment sums like params}`` (live arrays, not copies)."""
        return {"t": self.t, "m_sum": self.m_sum, "v_sum": self.v_sum}

    def load_state_dict(self, state):
        r"""Restore what :meth:`state_dict` returned (arrays are copied into the kept buffers).

        Also takes the textbook moments ``"m"`` and ``"v"`` instead of the sums
        (what checkpoints of format version 1 hold): they are divided by
        :math:`1-\beta`, so a run continued from them matches one that was
        never stopped up to rounding, not bit for bit. A missing entry raises
        ``KeyError`` before anything is changed.
        """
        sums = "m_sum" in state or "v_sum" in state
        t, m, v = int(state["t"]), state["m_sum" if sums else "m"], state["v_sum" if sums else "v"]
        self.m_sum[...] = m
        self.v_sum[...] = v
        if not sums:
            self.m_sum /= 1.0 - self.beta1
            self.v_sum /= 1.0 - self.beta2
        self.t = t


OPTIMIZERS = {"adam": Adam, "sgd": SGD}
