r"""Data sets for training: any array, a file (``.npy``, ``.npz``, a folder of IDX files), or MNIST.

A :class:`Dataset` is what the trainer sees: a training and a test array with
one example per row, ``(N, D)``, either ``uint8`` grey levels (turned into
:math:`u / 255` a batch at a time, as for MNIST) or floats (used as they
are); optional integer labels (only for colouring ``latent.png``); and the
shape of one example when the rows are images (for the picture grids).

Where no test set is given, one is held out: a random ``validation``
fraction of the rows (at least one), drawn with the run's seed from a
generator stream of its own, so a resumed run holds out the same rows.

The checks happen here, once, before training: shapes, dtypes, NaN and inf,
and the ``[0, 1]`` range the Bernoulli likelihood needs. Each failure is a
:class:`~scratchvae.data.DataError` with one line that names the data.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .data import DataError, load_mnist, read_idx, static_binarize
from .files import file_kind
from .rng import STREAM_SPLIT, Generator


class Dataset(NamedTuple):
    """Training and test rows, their labels, and the shape of one example when the rows are images.

    Attributes
    ----------
    train, test : array ``(N, D)``, ``(M, D)``
        ``uint8`` grey levels or floats, read-only.
    train_labels, test_labels : int array ``(N,)``, ``(M,)``, or None
    image_shape : ``(height, width)`` or None
        Set when the rows are images: pictures are written as grids of them.
    source : str
        Where the data came from (a path, ``"MNIST"`` or ``"array"``).
    split : str
        How the test set was made, in words.
    """

    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None
    image_shape: tuple | None
    source: str
    split: str

    @property
    def dim(self) -> int:
        """The input dimension ``D``."""
        return self.train.shape[1]

    def fingerprint(self) -> str:
        """SHA-256 of the training rows (dtype, shape and bytes): a resumed run checks it trains on the same data."""
        h = hashlib.sha256(f"{self.train.dtype.str}{self.train.shape}".encode())
        h.update(np.ascontiguousarray(self.train).data)
        return h.hexdigest()


def rows(x, what: str, source: str):
    """``x`` as read-only rows ``(N, D)``, ``uint8`` or float, finite; returns ``(rows, image_shape or None)``.

    A 3-D array ``(N, H, W)`` is a stack of images, flattened; a 2-D one is
    used as it is. ``uint8`` stays ``uint8`` (grey levels); booleans and
    other integers become float64; anything else is refused.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: {what} must be numbers, got dtype {x.dtype}")
    if x.ndim not in (2, 3) or x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
        raise DataError(
            f"{source}: {what} must have shape (n_examples, n_features) or (n_examples, height, width) with "
            f"n_examples >= 1, got {x.shape}"
        )
    image_shape = tuple(x.shape[1:]) if x.ndim == 3 else None
    x = x.reshape(len(x), -1)
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        x = x.astype(np.float64)
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise DataError(f"{source}: {what} has {int(bad.sum())} NaN or inf values (the first in row {row}, "
                            f"column {col}); remove or impute them")  # fmt: skip
    x = x.view()
    x.flags.writeable = False
    return x, image_shape


def labels_of(y, n: int, what: str, source: str):
    """Integer labels ``(n,)`` or None."""
    if y is None:
        return None
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DataError(f"{source}: {what} must be {n} integers, got {y.dtype} of shape {y.shape}")
    return y


def square_image(dim: int, x) -> tuple | None:
    """``(s, s)`` when rows of ``dim = s * s >= 16`` values in ``[0, 1]`` (or ``uint8``) look like images, else None."""
    side = math.isqrt(dim)
    if side < 4 or side * side != dim:
        return None
    if x.dtype == np.uint8 or (x.min() >= 0 and x.max() <= 1):
        return (side, side)
    return None


def from_arrays(train, test=None, *, validation=0.1, seed=0, image_shape=None, train_labels=None,
                test_labels=None, source="array") -> Dataset:  # fmt: skip
    """A :class:`Dataset` from arrays; without ``test``, a ``validation`` fraction of ``train`` is held out.

    Parameters
    ----------
    train : array ``(N, D)`` or ``(N, H, W)``
        ``uint8`` grey levels, or numbers (used as floats).
    test : array ``(M, D)`` or ``(M, H, W)``, optional
    validation : float in ``(0, 1)``
        Fraction held out as the test set when ``test`` is None:
        ``ceil(validation * N)`` rows, at least 1 and at most ``N - 1``.
    seed : int
        Chooses the held-out rows (generator stream ``STREAM_SPLIT``).
    image_shape : ``(height, width)``, optional
        The shape of one example, when the rows are flattened images. By
        default: ``(H, W)`` of a 3-D array, or ``(s, s)`` for ``D = s * s >= 16``
        values in ``[0, 1]``; otherwise the rows are not pictures.
    """
    train, shape3 = rows(train, "the training data", source)
    train_labels = labels_of(train_labels, len(train), "the training labels", source)
    if test is not None:
        test, _ = rows(test, "the test data", source)
        if test.shape[1] != train.shape[1]:
            raise DataError(f"{source}: the test data have {test.shape[1]} features, the training data {train.shape[1]}")
        if test.dtype.kind != train.dtype.kind:
            raise DataError(f"{source}: the training data are {train.dtype}, the test data {test.dtype}; "
                            "give both as uint8 grey levels or both as floats")  # fmt: skip
        test_labels = labels_of(test_labels, len(test), "the test labels", source)
        split = f"the given test set of {len(test):,} examples"
    else:
        if not (isinstance(validation, (int, float, np.floating)) and 0 < validation < 1):
            raise DataError(f"validation must be a fraction between 0 and 1, got {validation!r}")
        n = len(train)
        if n < 2:
            raise DataError(f"{source}: {n} example cannot be split into training and test data; give more")
        n_test = min(max(1, math.ceil(validation * n)), n - 1)
        order = Generator(seed, np, stream=STREAM_SPLIT).permutation(n)
        keep, held = np.sort(order[n_test:]), np.sort(order[:n_test])
        test, train = train[held], train[keep]
        if train_labels is not None:
            test_labels, train_labels = train_labels[held], train_labels[keep]
        split = (f"no test set was given: a random {validation:.0%} of the examples ({n_test:,}, chosen with seed "
                 f"{seed}) is held out as the test set")  # fmt: skip
    if image_shape is not None:
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 2 or min(image_shape) < 1 or math.prod(image_shape) != train.shape[1]:
            raise DataError(f"{source}: an image shape {image_shape} does not fit {train.shape[1]} values per example")
    else:
        image_shape = shape3 or square_image(train.shape[1], train)
    return Dataset(train, test, train_labels, test_labels, image_shape, source, split)


# --------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------

NPZ_KEYS = (("train", "test"), ("x_train", "x_test"))
NPZ_LABELS = (("y_train", "y_test"), ("train_labels", "test_labels"))


def load_file(path, *, validation=0.1, seed=0) -> Dataset:
    """A :class:`Dataset` from ``path``: a ``.npy`` array, an ``.npz`` archive, or a folder of IDX files.

    * ``.npy``: one array of examples; a test set is held out (``validation``).
    * ``.npz``: arrays ``train`` and ``test`` (or ``x_train`` and ``x_test``),
      the test array optional; labels ``y_train``/``y_test`` and an
      ``image_shape`` of two integers, if present, are used. An archive with a
      single array is read like a ``.npy`` file.
    * a folder: the IDX files of the MNIST family (MNIST, Fashion-MNIST,
      EMNIST), found by name: ``*train-images*`` and ``*t10k-images*`` or
      ``*test-images*``, ``.gz`` or not, with their ``-labels`` files if there.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        return _load_idx_folder(path, validation, seed)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    arrays = _load_numpy(path)
    if len(arrays) == 1 and not any(k in arrays for pair in NPZ_KEYS for k in pair):
        (train,) = arrays.values()
        return from_arrays(train, validation=validation, seed=seed, source=source)
    for train_key, test_key in NPZ_KEYS:
        if train_key in arrays:
            break
    else:
        names = ", ".join(sorted(arrays))
        raise DataError(f"{source}: expected arrays named train and test (or x_train and x_test), found {names}")
    labels = {}
    for train_lab, test_lab in NPZ_LABELS:
        if train_lab in arrays:
            labels = {"train_labels": arrays[train_lab], "test_labels": arrays.get(test_lab)}
            break
    shape = arrays.get("image_shape")
    if shape is not None and (shape.shape != (2,) or shape.dtype.kind not in "iu"):
        raise DataError(f"{source}: image_shape must hold two integers (height, width), got {shape!r}")
    return from_arrays(arrays[train_key], arrays.get(test_key), validation=validation, seed=seed,
                       image_shape=None if shape is None else tuple(shape), source=source, **labels)  # fmt: skip


def _load_numpy(path: Path) -> dict:
    """The arrays of a ``.npy`` (``{"data": array}``) or ``.npz`` file; never unpickles."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if not head.startswith((b"\x93NUMPY", b"PK")):  # an .npy file's magic, or a zip file's (.npz)
            raise DataError(f"{path}: is {file_kind(head)}, not a .npy or .npz file")
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"data": loaded}
        with loaded as z:
            return {name: z[name] for name in z.files}
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{path}: holds Python objects, which scratchvae never loads; save plain numeric arrays "
                            "with numpy.save or numpy.savez") from None  # fmt: skip
        raise DataError(f"{path}: not a readable .npy or .npz file ({' '.join(str(exc).split())})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except Exception as exc:  # damaged archives raise many kinds (BadZipFile, EOFError, zlib errors)
        kind = "an .npz archive" if head.startswith(b"PK") else "a .npy or .npz file"
        raise DataError(f"{path}: not {kind} that can be read ({type(exc).__name__}: {exc})") from None


def _find(folder: Path, patterns) -> Path | None:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for pattern in patterns:
        found = [n for n in names if re.search(pattern, n)]
        if found:
            return folder / found[0]
    return None


def _load_idx_folder(folder: Path, validation, seed) -> Dataset:
    files = {
        "train": _find(folder, [r"train-images"]),
        "test": _find(folder, [r"t10k-images", r"test-images"]),
        "train_labels": _find(folder, [r"train-labels"]),
        "test_labels": _find(folder, [r"t10k-labels", r"test-labels"]),
    }
    if files["train"] is None:
        raise DataError(f"{folder}: no IDX file of training images (a name with 'train-images', as in MNIST, "
                        "Fashion-MNIST and EMNIST)")  # fmt: skip
    arrays = {k: (read_idx(p) if p is not None else None) for k, p in files.items()}
    for key in ("train", "test"):
        a = arrays[key]
        if a is not None and (a.ndim != 3 or a.dtype != np.uint8):
            raise DataError(f"{files[key]}: holds {a.dtype} of shape {a.shape}, expected N x height x width uint8")
    if arrays["test"] is None:
        arrays["test_labels"] = None
    return from_arrays(arrays["train"], arrays["test"], validation=validation, seed=seed,
                       train_labels=arrays["train_labels"], test_labels=arrays["test_labels"],
                       source=str(folder))  # fmt: skip


def load_mnist_dataset(data_dir=None) -> Dataset:
    """MNIST (:func:`~scratchvae.data.load_mnist`) as a :class:`Dataset` of 28x28 images."""
    mnist = load_mnist(data_dir)
    return Dataset(mnist.train_images, mnist.test_images, mnist.train_labels, mnist.test_labels, (28, 28),
                   "MNIST", "the MNIST test set")  # fmt: skip


def prepare(ds: Dataset, *, likelihood: str, binarize: str, train_size=None, test_size=None) -> Dataset:
    """``ds`` cut to ``train_size``/``test_size`` rows, thresholded once for ``binarize="static"``, checked for the likelihood.

    The Bernoulli likelihood and binarization need values in ``[0, 1]``
    (``uint8`` grey levels always are).
    """
    for name, size, x, split in (("train_size", train_size, ds.train, "training"),
                                 ("test_size", test_size, ds.test, "test")):  # fmt: skip
        if size is not None and size > len(x):
            raise ValueError(f"{name} {size} is more than the {len(x)} {split} examples; leave it out to use them all")
    train, test = ds.train[:train_size], ds.test[:test_size]
    train_labels = None if ds.train_labels is None else ds.train_labels[:train_size]
    test_labels = None if ds.test_labels is None else ds.test_labels[:test_size]
    if binarize == "dequantize" and train.dtype != np.uint8:
        raise DataError(f"{ds.source}: binarize=dequantize spreads uint8 grey levels over their bins; these data are "
                        f"{train.dtype}, not grey levels")  # fmt: skip
    if train.dtype.kind == "f" and (likelihood == "bernoulli" or binarize != "none"):
        lo, hi = min(train.min(), test.min()), max(train.max(), test.max())
        if lo < 0 or hi > 1:
            need = "the bernoulli likelihood" if binarize == "none" else f"binarize={binarize}"
            raise DataError(
                f"{ds.source}: values run from {lo:.4g} to {hi:.4g}, but {need} needs values in [0, 1]; "
                "use the gaussian likelihood (--likelihood gaussian) for real-valued data, or scale the data into [0, 1]"
            )
    if binarize == "static":
        if train.dtype == np.uint8:
            train, test = static_binarize(train), static_binarize(test)
        else:
            train, test = (train > 0.5).astype(train.dtype), (test > 0.5).astype(test.dtype)
    return Dataset(train, test, train_labels, test_labels, ds.image_shape, ds.source, ds.split)


def describe(ds: Dataset) -> str:
    """One line: how many examples of what, and how the test set was made."""
    kind = "grey-level images" if ds.train.dtype == np.uint8 else "examples"
    shape = f"{ds.image_shape[0]}x{ds.image_shape[1]} " if ds.image_shape else f"{ds.dim}-d "
    return f"{ds.source}: {len(ds.train):,} {shape}{kind} for training, {len(ds.test):,} for testing ({ds.split})"
