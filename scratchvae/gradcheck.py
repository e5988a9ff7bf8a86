r"""Check a hand-written gradient against float64 central differences.

For a function ``y = f(x_1, ..., x_n)`` and a hand-written backward
``(d_x_1, ..., d_x_n) = b(d_y)``, draw a random upstream gradient ``g`` (the
shape of ``y``) and consider the scalar :math:`s(x) = \langle g, f(x)\rangle`.
Its exact gradient is what ``b(g)`` should return. Along a random unit
direction ``v`` in the space of one input,

.. math::
    \underbrace{\langle b(g)_i, v\rangle}_{\text{analytic}} \approx
    \underbrace{\frac{s(x_i + h v) - s(x_i - h v)}{2h}}_{\text{numeric},\ O(h^2)}

and the relative error :math:`|a - n| / \max(|a| + |n|, \text{floor})` should be
near float64 round-off (about ``1e-8`` for ``h = 1e-6``); a wrong gradient
gives errors of order one. Random directions test every element at once;
a few single coordinates per input are checked too, so that a failure says
*where* it happened.

Example
-------
>>> import numpy as np
>>> from scratchvae import gradcheck
>>> f = lambda x: np.tanh(x)
>>> b = lambda d_y, x: (d_y * (1 - np.tanh(x) ** 2),)
>>> x = np.linspace(-2, 2, 5)
>>> gradcheck(f, lambda d: b(d, x), [x]).ok
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, to_numpy


@dataclass
class GradcheckResult:
    """Outcome of :func:`gradcheck`.

    Attributes
    ----------
    ok : bool
        ``max_rel_error <= rtol``.
    max_rel_error : float
        The worst relative error seen.
    where : str
        Where it happened: ``"input 1 (W), direction 2"`` or ``"input 0 (x), index (3, 1)"``.
    analytic, numeric : float
        The two directional derivatives at the worst place.
    checks : list of (where, analytic, numeric, rel_error)
        Every comparison made.
    """

    ok: bool
    max_rel_error: float
    where: str
    analytic: float
    numeric: float
    rtol: float
    checks: list = field(default_factory=list, repr=False)

    def __str__(self):
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"gradcheck {verdict}: worst relative error {self.max_rel_error:.3e} (rtol {self.rtol:.1e}) "
            f"at {self.where}: analytic {self.analytic:.10e}, numeric {self.numeric:.10e}"
        )


def relative_error(a: float, n: float, floor: float = 1e-10) -> float:
    """:math:`|a - n| / \\max(|a| + |n|, \\text{floor})`; the floor keeps two near-zeros from exploding."""
    return abs(a - n) / max(abs(a) + abs(n), floor)


def gradcheck(
    forward,
    backward,
    inputs,
    *,
    names=None,
    n_directions: int = 3,
    n_coords: int = 3,
    h: float = 1e-6,
    rtol: float = 1e-6,
    floor: float = 1e-10,
    seed: int = 0,
    d_out=None,
) -> GradcheckResult:
    """Compare ``backward`` with central differences of ``forward``.

    Parameters
    ----------
    forward : callable
        ``forward(*inputs) -> y`` (an array of any shape, or a scalar). It is
        called on perturbed copies of the inputs, so it must not keep state
        that a later ``backward`` relies on.
    backward : callable
        ``backward(d_y) -> sequence of d_x_i`` at the *unperturbed* inputs, one
        per input (``None`` for an input without a gradient, which is skipped).
    inputs : sequence of float64 arrays
    names : sequence of str, optional
        Names for the report (default ``x0, x1, ...``).
    n_directions : int
        Random unit directions per input.
    n_coords : int
        Randomly chosen single coordinates per input (localises a failure).
    h : float
        Central-difference step.
    rtol : float
        Largest relative error accepted.
    floor : float
        Denominator floor of the relative error (absolute scale below which
        derivatives count as zero).
    seed : int
        Seeds the upstream gradient, directions and coordinates.
    d_out : array, optional
        Upstream gradient to use instead of a random one.

    Returns
    -------
    GradcheckResult
    """
    inputs = list(inputs)
    names = list(names) if names is not None else [f"x{i}" for i in range(len(inputs))]
    if len(names) != len(inputs):
        raise ValueError("names must have one entry per input")
    for name, a in zip(names, inputs):
        if np.dtype(a.dtype) != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs for central differences; {name} is {a.dtype}")
    xp = get_array_module(*inputs)
    rng = np.random.default_rng(seed)

    y0 = forward(*inputs)
    if d_out is None:
        d_out = xp.asarray(rng.standard_normal(np.shape(y0)))
    d_out = xp.asarray(d_out, dtype=np.float64)
    grads = backward(d_out)
    grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
    if len(grads) != len(inputs):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")

    def s(i, x_i):
        args = list(inputs)
        args[i] = x_i
        return float((forward(*args) * d_out).sum())

    checks = []
    for i, (name, x, g) in enumerate(zip(names, inputs, grads)):
        if g is None:
            continue
        if tuple(g.shape) != tuple(x.shape):
            raise ValueError(f"gradient for {name} has shape {tuple(g.shape)}, input has {tuple(x.shape)}")
        g_host = to_numpy(g).astype(np.float64)
        probes = []
        for k in range(n_directions):
            v = rng.standard_normal(x.shape)
            v /= max(np.linalg.norm(v), 1e-300)
            probes.append((f"input {i} ({name}), direction {k}", v))
        if x.size:
            for flat in rng.choice(x.size, size=min(n_coords, x.size), replace=False):
                v = np.zeros(x.shape)
                idx = np.unravel_index(int(flat), x.shape)
                v[idx] = 1.0
                probes.append((f"input {i} ({name}), index {tuple(int(j) for j in idx)}", v))
        for where, v in probes:
            v_dev = xp.asarray(v)
            numeric = (s(i, x + h * v_dev) - s(i, x - h * v_dev)) / (2.0 * h)
            analytic = float((g_host * v).sum())
            checks.append((where, analytic, numeric, relative_error(analytic, numeric, floor)))

    if not checks:
        raise ValueError("nothing to check: every gradient was None")
    where, analytic, numeric, worst = max(checks, key=lambda c: c[3])
    return GradcheckResult(worst <= rtol, worst, where, analytic, numeric, rtol, checks)


def gradcheck_model(model, *args, **kwargs) -> GradcheckResult:
    """Check ``model.loss_and_grad(*args)`` against central differences along the flat parameter buffer.

    The model must be float64, and its loss deterministic for the given
    arguments (pass ``eps`` to a VAE). ``kwargs`` go to :func:`gradcheck`.
    The parameters are restored afterwards.
    """
    p0 = model.params.copy()

    def forward(p):
        model.params[...] = p
        return model.loss_and_grad(*args).loss

    def backward(d_loss):
        model.params[...] = p0
        model.loss_and_grad(*args)
        return (d_loss * model.grads.copy(),)

    try:
        return gradcheck(forward, backward, [p0], names=["params"], **kwargs)
    finally:
        model.params[...] = p0
