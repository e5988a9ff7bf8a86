"""Checkpoints: one ``.npz`` file, no pickle, written atomically.

A checkpoint holds the flat parameter buffer, the optimiser's arrays, any
extra arrays the trainer needs (the current epoch's data order), and one JSON
document (stored as a ``uint8`` array named ``meta.json``) with the model
configuration, the training configuration, the epoch and step, the
generators' states and the optimiser's scalars. Loading uses
``numpy.load(allow_pickle=False)``, so a checkpoint can never execute code.

Writes go to a temporary file in the same folder, are flushed and fsynced,
and then renamed over the old file (``os.replace`` is atomic on POSIX): a
crash during a write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import atomic_write, file_kind
from .backend import BackendError, to_device, to_numpy

FORMAT = "scratchvae-checkpoint"
# 3: Adam's moments m, v as opt_m, opt_v, and the training configuration's latent_dim;
# 2: Adam's moments without their (1 - beta) factors, as opt_m_sum, opt_v_sum; 1: as in 3, with "latent"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


EXPECTED = "the checkpoint.npz that scratchvae train writes"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or does not fit (one sentence why)."""


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns: host arrays and the JSON metadata."""

    params: np.ndarray
    arrays: dict
    meta: dict


def save_checkpoint(path, params, meta: dict, arrays: dict | None = None) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or Path
    params : array ``(n_params,)``
        The model's flat parameter buffer (copied to the host).
    meta : dict
        JSON-serialisable metadata; must contain ``"model"`` (the model's
        :meth:`config`).
    arrays : dict of str -> array, optional
        Extra arrays (optimiser state, data order); names must not start with ``meta``.
    """
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, **meta}
    payload = {"params": to_numpy(params)}
    for name, a in (arrays or {}).items():
        payload[name] = to_numpy(a)
    payload["meta.json"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **payload), fsync=True)
    return path


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        Missing file or not a file; not an ``.npz`` archive (truncated,
        corrupt, or a lone ``.npy`` array); object arrays (never unpickled);
        missing entries; unreadable metadata; malformed parameters. Whatever
        the bytes are, nothing else is raised.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if not head.startswith(b"PK"):  # every .npz archive is a zip file, and every zip file starts so
        raise CheckpointError(f"{path} is {file_kind(head)}, not a scratchvae checkpoint (expected {EXPECTED})")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except OSError as exc:
        if exc.errno is None:  # e.g. bzip2's "Invalid data stream": damaged bytes, not an unreadable file
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        if "pickle" in str(exc):  # numpy refuses object arrays; they are never loaded
            raise CheckpointError(
                f"{path} holds Python objects, which scratchvae never loads, so it is not a scratchvae checkpoint "
                f"(expected {EXPECTED})"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        # Damaged bytes make zipfile and numpy raise many kinds of exception: BadZipFile, EOFError,
        # ValueError, NotImplementedError (an unknown compression method or zip version), RuntimeError
        # (an "encrypted" flag), zlib and lzma errors, MemoryError (a header announcing a huge array).
        # Each means the same here.
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    missing = [key for key in ("params", "meta.json") if key not in data]
    if len(missing) == 2:
        names = ", ".join(sorted(data)[:5]) + (", ..." if len(data) > 5 else "")
        raise CheckpointError(
            f"{path} is an .npz archive of other arrays ({names or 'none'}), not a scratchvae checkpoint "
            f"(expected {EXPECTED})"
        )
    for key in ("params", "meta.json"):
        if key not in data:
            raise CheckpointError(f"checkpoint {path} is incomplete: it has no {key!r} entry")
    try:
        meta = json.loads(data.pop("meta.json").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a scratchvae checkpoint")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('version')}, expected {VERSION} (or an earlier one: "
            f"{', '.join(map(str, READABLE_VERSIONS[:-1]))})"
        )
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} has no model configuration")
    params = data.pop("params")
    if params.ndim != 1 or params.dtype.kind != "f":
        raise CheckpointError(f"checkpoint {path} has malformed parameters ({params.dtype}, shape {params.shape})")
    return Checkpoint(params, data, meta)


def optimizer_state(ckpt: Checkpoint, optimizer) -> dict:
    r"""The optimiser's arrays a checkpoint holds (``opt_<name>``), by the names ``optimizer.load_state_dict`` takes.

    Checkpoints of format version 2 hold Adam's moments without their
    :math:`(1-\beta)` factors (``opt_m_sum``, ``opt_v_sum``); they are
    multiplied back, so a run resumed from one continues the run that wrote
    it up to rounding, not bit for bit. The step count ``t`` is in the
    metadata, not here.
    """
    state = {name[4:]: a for name, a in ckpt.arrays.items() if name.startswith("opt_")}
    for sum_name, name, beta in (("m_sum", "m", "beta1"), ("v_sum", "v", "beta2")):
        if sum_name in state and hasattr(optimizer, beta):
            state[name] = state.pop(sum_name) * (1.0 - getattr(optimizer, beta))
    return state


def build_model(config: dict, backend=None):
    """Construct the model a configuration describes (as written by ``model.config()``)."""
    from .model import VAE, Autoencoder

    cfg = dict(config)
    kind = cfg.pop("model", None)
    try:
        if kind == "VAE":
            return VAE(backend=backend, **cfg)
        if kind == "Autoencoder":
            return Autoencoder(backend=backend, **cfg)
    except BackendError:  # the requested backend, not the checkpoint, is the problem
        raise
    except (TypeError, ValueError, OverflowError, MemoryError) as exc:  # missing, unknown or ill-typed entries
        raise CheckpointError(f"checkpoint model configuration is not understood ({exc})") from None
    raise CheckpointError(f"checkpoint names an unknown model kind {kind!r}")


def restore_model(ckpt: Checkpoint, backend=None):
    """A model built from ``ckpt.meta["model"]`` with the checkpoint's parameters loaded."""
    model = build_model(ckpt.meta["model"], backend=backend)
    if ckpt.params.shape != model.params.shape:
        raise CheckpointError(
            f"checkpoint has {ckpt.params.size} parameters but its configuration needs {model.params.size}"
        )
    if not np.isfinite(ckpt.params).all():
        raise CheckpointError("checkpoint parameters contain NaN or inf")
    model.params[...] = to_device(ckpt.params, model.xp, dtype=model.dtype)
    return model


def image_shape_of(meta: dict):
    """The ``(height, width)`` of one example a checkpoint records, or None (28x28 for checkpoints of MNIST runs)."""
    data = meta.get("data")
    if isinstance(data, dict):
        shape = data.get("image_shape")
        if (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)
            and math.prod(shape) == meta["model"].get("input_dim")
        ):  # fmt: skip
            return tuple(shape)
        return None
    train = meta.get("train")  # written before checkpoints recorded their data: MNIST runs
    if isinstance(train, dict) and meta["model"].get("input_dim") == 784:
        return (28, 28)
    return None
