r"""Dense layers and activations, each with its forward and, right under it, its backward.

Conventions (used everywhere in scratchvae):

* arrays are row-major batches: ``x`` has shape ``(batch, n_in)``;
* ``forward(x)`` caches exactly what ``backward`` needs and nothing else;
* ``backward(d_y)`` takes :math:`\partial L/\partial y`, the gradient of the
  scalar loss with respect to the layer's output, and returns
  :math:`\partial L/\partial x`; a layer with parameters *adds* (``+=``) their
  gradients to its ``d_W`` and ``d_b``, so a model zeroes its gradients
  before a backward pass (:meth:`VAE.loss_and_grad
  <scratchvae.model.VAE.loss_and_grad>` does).

Parameters live in one contiguous flat buffer per model (see :func:`bind_flat`):
each layer's ``W`` and ``b`` are views into it, and ``d_W``/``d_b`` views into the
matching flat gradient buffer. The optimiser then updates one array, a
checkpoint saves one array, and a whole-model gradient check perturbs one array.
"""

from __future__ import annotations

import math

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

    The right-hand form never exponentiates a positive number, so it is
    finite for every finite ``x``.
    """
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


# --------------------------------------------------------------------------------------
# Activations: y = f(x) elementwise, d_x = d_y * f'(x).
# --------------------------------------------------------------------------------------


class Activation:
    """Base class of elementwise activations; ``x`` and ``y`` have any shape (the same one)."""

    name = "activation"

    def forward(self, x):
        raise NotImplementedError

    def backward(self, d_y):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Identity(Activation):
    r""":math:`y = x`, :math:`\partial y/\partial x = 1`."""

    name = "identity"

    def forward(self, x):
        return x

    def backward(self, d_y):
        return d_y


class ReLU(Activation):
    r"""Rectified linear unit.

    .. math::
        y = \max(x, 0), \qquad
        \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,[y > 0]

    (the subgradient at 0 is taken as 0). Caches ``y``.
    """

    name = "relu"

    def forward(self, x):
        xp = get_array_module(x)
        self.y = xp.maximum(x, 0)
        return self.y

    def backward(self, d_y):
        return d_y * (self.y > 0)


class Tanh(Activation):
    r"""Hyperbolic tangent.

    .. math::
        y = \tanh x, \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}(1 - y^2)

    Caches ``y``.
    """

    name = "tanh"

    def forward(self, x):
        xp = get_array_module(x)
        self.y = xp.tanh(x)
        return self.y

    def backward(self, d_y):
        return d_y * (1.0 - self.y * self.y)


class Sigmoid(Activation):
    r"""Logistic sigmoid.

    .. math::
        y = \sigma(x), \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,y(1 - y)

    Caches ``y``.
    """

    name = "sigmoid"

    def forward(self, x):
        self.y = sigmoid(x)
        return self.y

    def backward(self, d_y):
        return d_y * self.y * (1.0 - self.y)


class Softplus(Activation):
    r"""Softplus, a smooth ReLU.

    .. math::
        y = \log(1 + e^{x}), \qquad \frac{\partial L}{\partial x} = \frac{\partial L}{\partial y}\,\sigma(x)

    Caches ``x``.
    """

    name = "softplus"

    def forward(self, x):
        self.x = x
        return softplus(x)

    def backward(self, d_y):
        return d_y * sigmoid(self.x)


ACTIVATIONS = {cls.name: cls for cls in (Identity, ReLU, Tanh, Sigmoid, Softplus)}


def make_activation(name: str) -> Activation:
    """An activation by name: one of ``identity, relu, tanh, sigmoid, softplus``."""
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


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

    def split(self, flat):
        """``(W, b)``-shaped views ``(n_in, n_out)`` and ``(n_out,)`` of a 1-D array ``size`` long."""
        k = self.n_in * self.n_out
        return flat[:k].reshape(self.n_in, self.n_out), flat[k:]

    def bind(self, params, grads) -> None:
        """Make ``W, b`` views of ``params`` and ``d_W, d_b`` views of ``grads`` (both 1-D, ``size`` long)."""
        self.W, self.b = self.split(params)
        self.d_W, self.d_b = self.split(grads)

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

    def forward(self, x):
        """``y = x W + b``, ``(batch, n_out)``."""
        self.x = x
        return x @ self.W + self.b

    def backward(self, d_y):
        """Add ``x^T d_y`` to ``d_W`` and ``sum(d_y)`` to ``d_b``; return ``d_x = d_y W^T``, ``(batch, n_in)``."""
        self.d_W += self.x.T @ d_y
        self.d_b += d_y.sum(axis=0)
        return d_y @ self.W.T

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

    @property
    def dense(self):
        """The dense layers, in order."""
        return [layer for layer in self.layers if isinstance(layer, Dense)]

    def forward(self, x):
        """``y`` from ``x`` through every layer in order."""
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, d_y):
        """``d_x`` from ``d_y`` through every layer in reverse order; adds to every ``d_W``, ``d_b``."""
        for layer in reversed(self.layers):
            d_y = layer.backward(d_y)
        return d_y


def bind_flat(dense_layers, xp, dtype):
    """Allocate one flat parameter buffer and one flat gradient buffer for ``dense_layers``.

    Each layer's ``W, b`` (and ``d_W, d_b``) become views into consecutive
    slices, in the order given.

    Returns
    -------
    params, grads : 1-D arrays of length ``sum(layer.size)``, zero
    """
    n = sum(layer.size for layer in dense_layers)
    params, grads = xp.zeros(n, dtype=dtype), xp.zeros(n, dtype=dtype)
    for layer, p, g in zip(dense_layers, split_flat(dense_layers, params), split_flat(dense_layers, grads)):
        layer.bind(p, g)
    return params, grads


def split_flat(dense_layers, flat):
    """The consecutive slices of the 1-D array ``flat`` that belong to each of ``dense_layers``, in order."""
    out, offset = [], 0
    for layer in dense_layers:
        out.append(flat[offset : offset + layer.size])
        offset += layer.size
    return out
