"""Argument and input checks, in one place: each raises ``ValueError`` with one sentence naming the problem."""

from __future__ import annotations

import math
import operator

import numpy as np

from .backend import to_device

DTYPES = {"float32": np.float32, "float64": np.float64}
OBJECTIVES = ("elbo", "iwae")


def check_positive_int(value, name: str) -> int:
    """``value`` as an int, checked to be a positive integer (``2.5``, ``True``, ``0`` are refused)."""
    try:
        out = operator.index(value)
    except TypeError:
        out = 0
    if isinstance(value, bool) or out < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return out


def check_k(k) -> int:
    """The number of importance samples ``k``, checked by :func:`check_positive_int`."""
    return check_positive_int(k, "k")


def check_beta(beta) -> float:
    """The KL weight as a Python float (which never promotes a float32 loss), checked to be finite and >= 0."""
    try:
        value = float(beta)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return value


def check_lr(lr) -> float:
    """A learning rate as a Python float, checked to be finite and positive."""
    try:
        value = float(lr)
    except (TypeError, ValueError):  # None, "fast", ...
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"learning rate must be a positive number, got {lr!r}")
    return value


def check_objective(objective, k) -> tuple[str, int]:
    """``(objective, k)`` checked together: ``"elbo"`` takes ``k = 1`` only, ``"iwae"`` any ``k >= 1``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    k = check_k(k)
    if objective == "elbo" and k != 1:
        raise ValueError(f"objective 'elbo' uses one sample per example; k={k} needs objective 'iwae'")
    return objective, k


def as_dtype(dtype):
    """``np.float32`` or ``np.float64`` from a name or dtype; anything else is refused."""
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose float32 or float64")
    return DTYPES[key]


def as_sizes(hidden, what="hidden") -> tuple:
    """Hidden-layer widths as a tuple of positive ints (one int is one layer; ``()`` is none)."""
    if isinstance(hidden, (int, np.integer)):
        hidden = (hidden,)
    try:
        sizes = tuple(int(h) for h in hidden)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a sequence of positive ints, got {hidden!r}") from None
    if any(h < 1 for h in sizes):
        raise ValueError(f"{what} sizes must be positive, got {sizes}")
    return sizes


def check_batch(x, xp, dtype, dim, name="x", bounded=False):
    """A batch ``(batch, dim)`` checked and returned in the module ``xp`` and float ``dtype``.

    Refused, naming the problem: not 2-D, another feature dimension, no rows,
    an integer, bool or object dtype, NaN or inf, and with ``bounded=True``
    (targets of a Bernoulli likelihood) values outside ``[0, 1]``. On the GPU
    the last two checks read one number back to the host.
    """
    if not hasattr(x, "dtype"):  # a list, say
        x = np.asarray(x)
    if np.dtype(x.dtype).kind != "f":
        raise ValueError(
            f"{name} must be a floating-point array, got dtype {np.dtype(x.dtype)} "
            "(convert images with x.astype(np.float32) / 255)"
        )
    shape = tuple(x.shape)
    if len(shape) != 2 or shape[1] != dim:
        raise ValueError(f"{name} must have shape (batch, {dim}), got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    x = to_device(x, xp, dtype=dtype)
    if not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if bounded and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(f"{name} must lie in [0, 1] for the Bernoulli likelihood")
    return x


def check_int_range(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int, checked to be an integer (not a bool) in ``low..high`` (no upper end without ``high``)."""
    if (
        isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < low or (high is not None and value > high)
    ):  # fmt: skip
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def check_number(name: str, value):
    """``value``, checked to be an int or a float (not a bool, a string or ``None``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


def check_eps(eps, shape, xp, dtype):
    """Reparameterization noise ``eps`` on the device ``xp`` in ``dtype``, checked to have ``shape``."""
    eps = to_device(eps, xp, dtype=dtype)
    if eps.shape != tuple(shape):
        raise ValueError(f"eps must have shape {tuple(shape)}, got {tuple(eps.shape)}")
    return eps
