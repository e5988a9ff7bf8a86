"""Dense layers and activations, each with its forward and, right under it, its backward.

Conventions (used everywhere in scratchvae):

* arrays are row-major batches: ``x`` has shape ``(batch, n_in)``;
* ``forward`` caches exactly what ``backward`` needs and nothing else;
* ``backward(d_y)`` takes the gradient of the scalar loss with respect to the
  layer's output and returns the gradient with respect to its input; a layer
  with parameters *accumulates* (``+=``) their gradients into its ``d_W`` and
  ``d_b`` views of the model's flat gradient buffer. (The models' training
  step, which uses each layer once, asks it to overwrite them instead, which
  spares zeroing the buffer; see :meth:`MLP.backward`.)

Parameters live in one contiguous flat buffer per model (see :func:`bind_flat`):
each layer's ``W`` and ``b`` are views into it, and ``d_W``/``d_b`` views into the
matching flat gradient buffer. The optimiser then updates one array, a
checkpoint saves one array, and a whole-model gradient check perturbs one array.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module

# --------------------------------------------------------------------------------------
# Elementwise functions shared by activations and likelihoods (stable forms).
# --------------------------------------------------------------------------------------


def sigmoid(x):
    r"""Logistic sigmoid in its overflow-free tanh form.

    .. math:: \sigma(x) = \frac{1}{1 + e^{-x}} = \tfrac12\,(1 + \tanh(x/2))
    """
    xp = get_array_module(x)
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


def softplus(x):
    r"""Softplus without overflow.

    .. math:: \operatorname{softplus}(x) = \log(1 + e^{x}) = \max(x, 0) + \log(1 + e^{-|x|})

    The right-hand form never exponentiates a positive number; it is the same
    value as ``logaddexp(0, x)`` and several times faster in float32.
    """
    xp = get_array_module(x)
    x = xp.asarray(x)
    if x.ndim == 0 or x.dtype.kind != "f":  # scalars and integers: the plain form
        return xp.logaddexp(0.0, x)
    y = xp.abs(x)
    xp.negative(y, out=y)
    xp.exp(y, out=y)  # e^{-|x|} in (0, 1]
    xp.log1p(y, out=y)
    y += xp.maximum(x, 0)
    return y


# --------------------------------------------------------------------------------------
# Activations: y = f(x) elementwise, d_x = d_y * f'(x).
# --------------------------------------------------------------------------------------


class Activation:
    """Base class of elementwise activations; ``x`` and ``y`` have any shape.

    ``forward(x, inplace=True)`` may overwrite ``x`` with ``y`` and
    ``backward(d_y, inplace=True)`` may overwrite ``d_y`` with ``d_x``; the
    training step uses this on its own work buffers to avoid allocating
    new arrays every step. The default leaves the arguments untouched.
    """

    name = "activation"

    def forward(self, x, inplace=False):
        raise NotImplementedError

    def backward(self, d_y, inplace=False):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Identity(Activation):
    r""":math:`y = x`, :math:`\partial y/\partial x = 1`."""

    name = "identity"

    def forward(self, x, inplace=False):
        return x

    def backward(self, d_y, inplace=False):
        return d_y


class ReLU(Activation):
    r"""Rectified linear unit.

    .. math::
        y = \max(x, 0), \qquad
        \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,[y > 0]

    (the subgradient at 0 is taken as 0). Caches ``y``; in place, also keeps
    the mask :math:`[y > 0]` in a buffer of its own across calls.
    """

    name = "relu"

    def forward(self, x, inplace=False):
        xp = get_array_module(x)
        self.y = xp.maximum(x, 0, out=x if inplace else None)
        return self.y

    def backward(self, d_y, inplace=False):
        xp = get_array_module(d_y)
        if not inplace:
            return xp.multiply(d_y, self.y > 0)
        mask = getattr(self, "_mask", None)
        if mask is None or mask.shape != d_y.shape or mask.dtype != d_y.dtype or get_array_module(mask) is not xp:
            mask = self._mask = xp.empty_like(d_y)
        xp.greater(self.y, 0, out=mask)  # 1.0 where y > 0, else 0.0
        return xp.multiply(d_y, mask, out=d_y)


class Tanh(Activation):
    r"""Hyperbolic tangent.

    .. math::
        y = \tanh x, \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}(1 - y^2)

    Caches ``y``.
    """

    name = "tanh"

    def forward(self, x, inplace=False):
        xp = get_array_module(x)
        self.y = xp.tanh(x, out=x if inplace else None)
        return self.y

    def backward(self, d_y, inplace=False):
        xp = get_array_module(d_y)
        return xp.multiply(d_y, 1.0 - self.y * self.y, out=d_y if inplace else None)


class Sigmoid(Activation):
    r"""Logistic sigmoid.

    .. math::
        y = \sigma(x), \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,y(1 - y)

    Caches ``y``.
    """

    name = "sigmoid"

    def forward(self, x, inplace=False):
        self.y = sigmoid(x)
        return self.y

    def backward(self, d_y, inplace=False):
        xp = get_array_module(d_y)
        return xp.multiply(d_y, self.y * (1.0 - self.y), out=d_y if inplace else None)


class Softplus(Activation):
    r"""Softplus, a smooth ReLU.

    .. math::
        y = \log(1 + e^{x}), \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,\sigma(x)

    Caches ``x``.
    """

    name = "softplus"

    def forward(self, x, inplace=False):
        self.x = x
        return softplus(x)

    def backward(self, d_y, inplace=False):
        xp = get_array_module(d_y)
        return xp.multiply(d_y, sigmoid(self.x), out=d_y if inplace else None)


ACTIVATIONS = {cls.name: cls for cls in (Identity, ReLU, Tanh, Sigmoid, Softplus)}


def make_activation(name: str) -> Activation:
    """An activation by name: one of ``identity, relu, tanh, sigmoid, softplus``."""
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


# --------------------------------------------------------------------------------------
# Dense layer.
# --------------------------------------------------------------------------------------


class Dense:
    r"""Fully connected layer.

    .. math::
        y = x W + b

        \frac{\partial L}{\partial W} = x^\top \frac{\partial L}{\partial y}, \quad
        \frac{\partial L}{\partial b} = \sum_{\text{batch}} \frac{\partial L}{\partial y}, \quad
        \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y} W^\top

    Shapes: ``x (batch, n_in)``, ``W (n_in, n_out)``, ``b (n_out,)``,
    ``y (batch, n_out)``. ``W, b, d_W, d_b`` are views into the model's flat
    buffers, set by :func:`bind_flat`. Caches ``x``.

    Parameters
    ----------
    n_in, n_out : int
    init : {"he", "glorot", "fan_in_uniform"}
        ``he``: He et al. (2015) normal, :math:`W \sim N(0, 2/n_{in})`, suits ReLU.
        ``glorot``: Glorot & Bengio (2010) uniform,
        :math:`W \sim U(\pm\sqrt{6/(n_{in}+n_{out})})`, suits tanh, sigmoid and
        linear outputs. Both start biases at zero. ``fan_in_uniform``:
        :math:`W, b \sim U(\pm 1/\sqrt{n_{in}})`, the default of
        ``torch.nn.Linear`` (He uniform with :math:`a=\sqrt5`), which the
        PyTorch VAE example trains with.
    """

    INITS = ("he", "glorot", "fan_in_uniform")

    def __init__(self, n_in: int, n_out: int, init: str = "glorot"):
        if init not in self.INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {', '.join(self.INITS)}")
        self.n_in, self.n_out, self.init = int(n_in), int(n_out), init
        self.size = self.n_in * self.n_out + self.n_out

    def bind(self, params, grads) -> None:
        """Make ``W, b`` views of ``params`` and ``d_W, d_b`` views of ``grads`` (both 1-D, ``size`` long)."""
        k = self.n_in * self.n_out
        self.W = params[:k].reshape(self.n_in, self.n_out)
        self.b = params[k:]
        self.d_W = grads[:k].reshape(self.n_in, self.n_out)
        self.d_b = grads[k:]

    def initialize(self, rng) -> None:
        """Draw ``W`` (and ``b``) in place from the layer's init scheme."""
        dtype = self.W.dtype
        if self.init == "he":
            self.W[...] = rng.normal(self.W.shape, dtype) * math.sqrt(2.0 / self.n_in)
            self.b[...] = 0
        elif self.init == "glorot":
            a = math.sqrt(6.0 / (self.n_in + self.n_out))
            self.W[...] = (2.0 * rng.uniform(self.W.shape, dtype) - 1.0) * a
            self.b[...] = 0
        else:
            a = 1.0 / math.sqrt(self.n_in)
            self.W[...] = (2.0 * rng.uniform(self.W.shape, dtype) - 1.0) * a
            self.b[...] = (2.0 * rng.uniform(self.b.shape, dtype) - 1.0) * a

    def forward(self, x, out=None):
        """``y = x W + b``; ``out`` is an optional ``(batch, n_out)`` buffer to write ``y`` into."""
        xp = get_array_module(x)
        self.x = x
        y = xp.matmul(x, self.W, out=out)
        y += self.b
        return y

    def backward(self, d_y, need_input_grad: bool = True, accumulate: bool = True, out=None):
        """Add ``x^T d_y`` to ``d_W`` and ``sum(d_y)`` to ``d_b``; return ``d_x = d_y W^T``.

        ``accumulate=False`` overwrites ``d_W, d_b`` instead of adding to them
        (for a step that uses each layer once and so need not zero the
        gradients first). ``need_input_grad=False`` skips ``d_x`` (returns
        ``None``): the first layer's input is data. ``out`` is an optional
        ``(batch, n_in)`` buffer for ``d_x``.
        """
        xp = get_array_module(d_y)
        if accumulate:
            self.d_W += self.x.T @ d_y
            self.d_b += d_y.sum(axis=0)
        else:
            xp.matmul(self.x.T, d_y, out=self.d_W)
            d_y.sum(axis=0, out=self.d_b)
        return xp.matmul(d_y, self.W.T, out=out) if need_input_grad else None

    def __repr__(self):
        return f"Dense({self.n_in}, {self.n_out}, init={self.init!r})"


class MLP:
    r"""A stack of dense layers with an activation after each but the last.

    .. math:: h_0 = x,\quad h_i = f(h_{i-1} W_i + b_i),\quad y = h_{L-1} W_L + b_L

    Parameters
    ----------
    sizes : sequence of int
        ``(n_in, hidden_1, ..., n_out)``.
    activation : str
        Hidden activation name (see :data:`ACTIVATIONS`).
    init : {"auto", "he", "glorot", "fan_in_uniform"}
        ``auto`` uses He for the hidden layers when they are ReLU (Glorot
        otherwise); ``he`` uses He for the hidden layers whatever the
        activation; both use Glorot for the last, linear, layer. ``glorot``
        and ``fan_in_uniform`` use that scheme for every layer (see :class:`Dense`).
    """

    def __init__(self, sizes, activation: str = "relu", init: str = "auto"):
        sizes = [int(s) for s in sizes]
        self.sizes, self.activation, self.init = tuple(sizes), activation, init
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"layer sizes must be >= 1 and at least two of them, got {sizes}")
        if init not in ("auto", *Dense.INITS):
            raise ValueError(f"unknown init {init!r}; choose one of auto, {', '.join(Dense.INITS)}")
        if init == "auto":
            hidden_init, last_init = ("he" if activation == "relu" else "glorot"), "glorot"
        elif init == "he":
            hidden_init, last_init = "he", "glorot"
        else:
            hidden_init = last_init = init
        self.layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            self.layers.append(Dense(n_in, n_out, init=last_init if last else hidden_init))
            if not last:
                self.layers.append(make_activation(activation))

    def clone(self):
        """A new stack of the same shape, activation and init, with no parameters bound yet."""
        return MLP(self.sizes, self.activation, self.init)

    @property
    def dense(self):
        """The dense layers, in order."""
        return [layer for layer in self.layers if isinstance(layer, Dense)]

    def forward(self, x, work=None):
        """Forward through the stack.

        With a :class:`Workspace` ``work``, each layer writes into a buffer
        kept from the previous call of the same shape, and activations work
        in place (what the training step does); without it every array is new.
        """
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                out = None if work is None else work.get((id(self), "y", i), (x.shape[0], layer.n_out), x.dtype)
                x = layer.forward(x, out=out)
            else:
                x = layer.forward(x, inplace=work is not None)
        return x

    def backward(self, d_y, need_input_grad: bool = True, work=None):
        """Backward through the stack in reverse order; see :meth:`Dense.backward`.

        With a :class:`Workspace`, parameter gradients are overwritten (each
        layer is used once per step) and ``d_x`` buffers are reused; without
        it, parameter gradients are accumulated.
        """
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if isinstance(layer, Dense):
                need = need_input_grad or i > 0
                out = None
                if work is not None and need:
                    order = input_grad_order(work.xp, d_y.shape[0], layer)
                    out = work.get((id(self), "d_x", i), (d_y.shape[0], layer.n_in), d_y.dtype, order)
                d_y = layer.backward(d_y, need_input_grad=need, accumulate=work is None, out=out)
            else:
                d_y = layer.backward(d_y, inplace=work is not None)
        return d_y


class Workspace:
    """Work buffers kept across training steps, one per key, reallocated when the shape changes.

    A training step allocates the same arrays every time; keeping them
    avoids the allocator (and, for large arrays, fresh pages from the
    operating system) on every step. Arrays handed out by a workspace are
    overwritten by the next step: only code that finishes with them within
    one step should use it.
    """

    def __init__(self, xp):
        self.xp = xp
        self._buffers = {}

    def get(self, key, shape, dtype, order="C"):
        """The buffer kept under ``key``: an uninitialised array of ``shape`` and ``dtype``, in memory ``order`` ("C" or "F")."""
        a = self._buffers.get(key)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype or not a.flags[f"{order}_CONTIGUOUS"]:
            a = self._buffers[key] = self.xp.empty(shape, dtype=dtype, order=order)
        return a


def input_grad_order(xp, rows, layer):
    r"""Memory order of the buffer :meth:`Dense.backward` writes :math:`d_x = d_y W^\top` into during a training step.

    ``"F"`` (column-major: the product is then computed as
    :math:`(W d_y^\top)^\top`) for a layer with at least four times as many
    inputs and outputs as rows on the CPU, where OpenBLAS computes it faster
    that way: for the 400x784 decoder layer and 64 rows 0.43 ms against
    0.53 ms, and the activation gradient and weight gradient after it
    still gain overall (``benchmarks/NOTES.md``, item 10). ``"C"`` otherwise:
    with more rows, that activation gradient mixes the two orders and costs
    more than the product saves. The numbers differ only by rounding.
    """
    if xp is np and layer.n_in >= 4 * rows and layer.n_out >= 4 * rows:
        return "F"
    return "C"


def bind_flat(dense_layers, xp, dtype, params=None):
    """Allocate one flat parameter buffer and one flat gradient buffer for ``dense_layers``.

    Each layer's ``W, b`` (and ``d_W, d_b``) become views into consecutive
    slices, in the order given. With ``params`` (a 1-D array of the right
    length) the layers share that parameter buffer instead of a new one
    (replicas of a model for a step split over threads); the gradient
    buffer is always new.

    Returns
    -------
    params, grads : 1-D arrays of length ``sum(layer.size)``
    """
    n = sum(layer.size for layer in dense_layers)
    if params is None:
        params = xp.zeros(n, dtype=dtype)
    elif params.shape != (n,) or params.dtype != dtype:
        raise ValueError(f"params must be a 1-D {dtype} array of length {n}, got {params.dtype} {params.shape}")
    grads = xp.zeros(n, dtype=dtype)
    offset = 0
    for layer in dense_layers:
        layer.bind(params[offset : offset + layer.size], grads[offset : offset + layer.size])
        offset += layer.size
    return params, grads
