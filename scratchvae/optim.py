r"""The textbook optimisers, updating a model's flat parameter buffer in place.

Both take any object with ``params`` and ``grads`` (1-D arrays of equal
length, as :class:`~scratchvae.model.VAE` exposes); ``step()`` applies one
update to ``params`` from ``grads``, written formula by formula. Their state
is plain arrays, returned by :meth:`state_dict` for checkpoints. (The ``cpu``
engine applies the same updates with kept buffers and in place, a slice per
thread: :mod:`scratchvae.engines.fused`.)
"""

from __future__ import annotations

from .backend import get_array_module
from .validate import check_lr


class SGD:
    r"""Stochastic gradient descent with (heavy-ball) momentum and optional L2 weight decay.

    .. math::
        g_t = \nabla_\theta L + \lambda\theta_{t-1}, \qquad
        v_t = \mu\, v_{t-1} + g_t, \qquad
        \theta_t = \theta_{t-1} - \eta\, v_t

    with learning rate :math:`\eta` (``lr``), momentum :math:`\mu` and weight
    decay :math:`\lambda`; ``velocity`` holds :math:`v_t`.
    """

    def __init__(self, model, lr=0.01, momentum=0.9, weight_decay=0.0):
        self.params, self.grads = model.params, model.grads
        self.lr = check_lr(lr)
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
        g = self.grads + self.weight_decay * self.params
        self.velocity[...] = self.momentum * self.velocity + g
        self.params -= self.lr * self.velocity

    def state_dict(self):
        """``{"t": steps taken, "velocity": array like params}`` (live arrays, not copies)."""
        return {"t": self.t, "velocity": self.velocity}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned (arrays are copied into the kept buffers)."""
        t, velocity = int(state["t"]), state["velocity"]
        self.velocity[...] = velocity
        self.t = t


class Adam:
    r"""Adam (Kingma & Ba, 2015) with bias correction and optional L2 weight decay.

    .. math::
        g_t = \nabla_\theta L + \lambda\theta_{t-1}

        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2

        \hat m_t = \frac{m_t}{1-\beta_1^t},\qquad \hat v_t = \frac{v_t}{1-\beta_2^t},\qquad
        \theta_t = \theta_{t-1} - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \varepsilon}

    with :math:`m_0 = v_0 = 0`, learning rate :math:`\eta` (``lr``),
    ``betas`` :math:`= (\beta_1, \beta_2)`, ``eps`` :math:`= \varepsilon` and
    weight decay :math:`\lambda`; ``m`` and ``v`` hold :math:`m_t` and
    :math:`v_t`, and ``t`` the number of steps taken.
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.grads = model.params, model.grads
        self.lr = check_lr(lr)
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.beta1, self.beta2, self.eps, self.weight_decay = b1, b2, float(eps), float(weight_decay)
        self.t = 0
        self.m = self.params * 0
        self.v = self.params * 0

    def step(self):
        """One update of ``params`` in place from the current ``grads``."""
        xp = get_array_module(self.params)
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        g = self.grads + self.weight_decay * self.params
        self.m[...] = b1 * self.m + (1.0 - b1) * g
        self.v[...] = b2 * self.v + (1.0 - b2) * g * g
        m_hat = self.m / (1.0 - b1**self.t)
        v_hat = self.v / (1.0 - b2**self.t)
        self.params -= self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)

    def state_dict(self):
        """``{"t": steps taken, "m", "v": moments like params}`` (live arrays, not copies)."""
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned (arrays are copied into the kept buffers).

        A missing entry raises ``KeyError`` before anything is changed.
        """
        t, m, v = int(state["t"]), state["m"], state["v"]
        self.m[...] = m
        self.v[...] = v
        self.t = t


OPTIMIZERS = {"adam": Adam, "sgd": SGD}
