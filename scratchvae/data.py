r"""MNIST on disk and in batches: the IDX format, finding, downloading and checking the files, binarization.

The IDX format (LeCun et al.) is small enough to read by hand. A file is

=========  ======================================================================
bytes      meaning
=========  ======================================================================
0-1        two zero bytes
2          element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
           0x0D float32, 0x0E float64 (all big-endian)
3          number of dimensions ``ndim``
4 ...      ``ndim`` big-endian uint32 sizes, then the elements in C order
=========  ======================================================================

so ``train-images-idx3-ubyte`` starts ``00 00 08 03``, then 60000, 28, 28.
Files may be gzip-compressed; :func:`read_idx` recognises gzip by its magic
bytes ``1f 8b``, not by the file name.

The four MNIST files are checked against the MD5 of their *uncompressed*
bytes, so a ``.gz`` file and its ``gunzip``-ed twin pass the same check.
Images stay ``uint8`` in memory, ``(N, 784)`` with one flattened 28x28 image
per row; the trainer turns one batch at a time into floats with
:func:`to_float_batch`:

.. math::
    \text{none/static:}\quad x = u / 255 \qquad\qquad
    \text{dynamic:}\quad x \sim \mathrm{Bernoulli}(u / 255)

where :math:`u \in \{0, \dots, 255\}` is the stored grey level.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .backend import get_array_module, to_device

__all__ = [
    "DataError",
    "FileSpec",
    "MNIST_FILES",
    "MIRRORS",
    "MNIST",
    "BINARIZE",
    "parse_idx",
    "read_idx",
    "default_cache_dir",
    "find_mnist",
    "download_mnist",
    "load_mnist",
    "static_binarize",
    "to_float_batch",
    "rows_to_float",
    "float_batches",
]


class DataError(ValueError):
    """A data file is missing, damaged or not what it should be (one sentence naming the file and the problem)."""


# --------------------------------------------------------------------------------------
# The IDX format.
# --------------------------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"

# type code -> big-endian element type, as stored on disk
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _shape_str(dims) -> str:
    return "x".join(str(d) for d in dims) if len(dims) else "scalar"


def parse_idx(data, name: str = "IDX data") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file.

    Parameters
    ----------
    data : bytes-like
        The whole file: header then elements.
    name : str
        What to call the data in error messages (a file name, usually).

    Returns
    -------
    numpy.ndarray, shape ``dims`` from the header
        In the native byte order of the element type. Read-only: a view of
        ``data`` for one-byte types (no copy), a byte-swapped copy otherwise.

    Raises
    ------
    DataError
        For a header shorter than it says, a bad magic number, an unknown type
        code, element data shorter or longer than the sizes say, or a shape
        NumPy cannot represent. Any byte string either decodes or raises
        this; nothing else.
    """
    buf = memoryview(data).cast("B")
    n = len(buf)
    if n < 4:
        raise DataError(f"{name}: truncated IDX header ({n} bytes, the magic number alone needs 4)")
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"{name}: bad IDX magic number {bytes(buf[:4]).hex(' ')} (an IDX file starts with two zero bytes)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{name}: unknown IDX element type code 0x{code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if n < header:
        raise DataError(f"{name}: truncated IDX header ({n} bytes, {ndim} dimensions need {header})")
    dims = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = n - header
    if found != expected:
        which = "truncated" if found < expected else "trailing bytes after the"
        raise DataError(
            f"{name}: {which} IDX data (the header says {_shape_str(dims)} {dtype.name} = {expected} bytes, "
            f"the file holds {found})"
        )
    try:
        arr = np.frombuffer(buf, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    except ValueError as exc:  # e.g. more dimensions than NumPy allows, or 0 x 2**31 x 2**31 x 2**31
        raise DataError(f"{name}: NumPy cannot hold the IDX shape {_shape_str(dims)} ({_one_line(exc)})") from None
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    arr.flags.writeable = False
    return arr


def _read_bytes(path) -> bytes:
    """The contents of a file, gunzipped when it starts with the gzip magic bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt gzip stream ({_one_line(exc)})") from None


def read_idx(path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (told apart by the bytes ``1f 8b``, not the name).

    Returns
    -------
    numpy.ndarray
        As :func:`parse_idx` (read-only).

    Raises
    ------
    DataError
        For a missing or unreadable file, a corrupt gzip stream, or any
        :func:`parse_idx` error; the message names the file.
    """
    return parse_idx(_read_bytes(path), name=str(path))


# --------------------------------------------------------------------------------------
# The MNIST files: what they are, where they are, how to get them.
# --------------------------------------------------------------------------------------


class FileSpec(NamedTuple):
    """Size and MD5 of a file's uncompressed bytes."""

    nbytes: int
    md5: str


MNIST_FILES = {
    "t10k-images-idx3-ubyte.gz": FileSpec(7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte.gz": FileSpec(10008, "27ae3e4e09519cfbb04c329615203637"),
    "train-images-idx3-ubyte.gz": FileSpec(47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte.gz": FileSpec(60008, "a25bea736e30d166cdddb491f175f624"),
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

DATA_ENV_VAR = "SCRATCHVAE_DATA"

# data/mnist beside the package in a source checkout (so `pip install -e .` finds it from any directory)
SOURCE_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"

_FILE_LIST = ", ".join(MNIST_FILES)


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _locate(directory: Path, name: str) -> Path | None:
    """``directory/name`` or its uncompressed twin (``name`` without ``.gz``), whichever is a file."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path) -> list[str]:
    return [name for name in MNIST_FILES if _locate(directory, name) is None]


def default_cache_dir() -> Path:
    """Where a download goes: ``$XDG_CACHE_HOME/scratchvae/mnist``, else ``~/.cache/scratchvae/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base).expanduser() if base else Path.home() / ".cache"
    return root / "scratchvae" / "mnist"


def _search_path() -> list[Path]:
    """The implicit places :func:`find_mnist` looks, in order, without repeats."""
    places = []
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        places.append(Path(env).expanduser())
    places += [Path.cwd() / "data" / "mnist", SOURCE_DATA_DIR, default_cache_dir()]
    unique = []
    for p in places:
        if p not in unique:
            unique.append(p)
    return unique


def _not_found(places, why: str = "") -> DataError:
    where = ", ".join(str(p) for p in places)
    return DataError(
        f"MNIST not found: no directory among {where} holds all four files {_FILE_LIST} "
        f"(gzipped or not){why}; put them in one of those directories, or pass --data-dir "
        f"(data_dir=) or set {DATA_ENV_VAR} to a directory that holds them"
    )


def find_mnist(data_dir=None) -> Path:
    """The first directory that holds all four MNIST files (each ``.gz`` or uncompressed).

    Searched in order: ``data_dir`` if given (and only it: a ``data_dir``
    without the files is an error, not a reason to look elsewhere), then
    ``$SCRATCHVAE_DATA``, ``./data/mnist`` under the current directory, the
    source checkout's ``data/mnist``, and :func:`default_cache_dir`.

    Returns
    -------
    pathlib.Path
        The directory (absolute, except a relative ``data_dir`` as given).

    Raises
    ------
    DataError
        Naming ``data_dir`` and the files it lacks, or, without ``data_dir``,
        listing the four files and every place searched.
    """
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.exists():
            raise DataError(f"MNIST data directory {d} does not exist")
        if not d.is_dir():
            raise DataError(f"MNIST data directory {d} is not a directory")
        missing = _missing(d)
        if missing:
            raise DataError(
                f"MNIST data directory {d} lacks {', '.join(missing)} (each may be gzipped or not)"
            )
        return d
    places = _search_path()
    for d in places:
        if d.is_dir() and not _missing(d):
            return d
    raise _not_found(places)


def _check(name: str, path, data: bytes) -> None:
    """Raise :class:`DataError` unless ``data`` (uncompressed) has the MD5 of MNIST's ``name``."""
    spec = MNIST_FILES[name]
    actual = hashlib.md5(data).hexdigest()
    if actual != spec.md5:
        raise DataError(
            f"{path}: MD5 of the uncompressed bytes is {actual}, expected {spec.md5} "
            f"({len(data)} bytes, expected {spec.nbytes}), so the file is damaged or not the canonical "
            "MNIST; delete it and download or copy it again"
        )


def download_mnist(dest, mirrors=MIRRORS, timeout: float = 30) -> Path:
    """Download the four MNIST ``.gz`` files into ``dest`` and check them; returns ``dest``.

    Each file is fetched with :mod:`urllib` into a temporary file in ``dest``,
    checked against :data:`MNIST_FILES`, and only then renamed into place, so
    an interrupted download leaves nothing that looks finished. A mirror that
    fails (unreachable, HTTP error, wrong checksum) passes the file on to the
    next. Files already in ``dest`` with the right checksum are kept.

    Parameters
    ----------
    dest : path
        Created if missing.
    mirrors : sequence of str
        Base URLs (``https://``, ``http://`` or ``file://``); a file's URL is
        the base, a ``/``, and its name.
    timeout : float
        Seconds to wait on each connection.

    Raises
    ------
    DataError
        When ``dest`` cannot be written, or some file could not be had from
        any mirror (the message gives each mirror's reason).
    """
    dest = Path(dest).expanduser()
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the MNIST directory {dest} ({exc.strerror or exc})") from None
    for name in MNIST_FILES:
        present = _locate(dest, name)
        if present is not None:
            try:
                _check(name, present, _read_bytes(present))
                continue
            except DataError:
                pass  # damaged: fetch it again
        reasons = []
        for mirror in mirrors:
            url = mirror if mirror.endswith("/") else mirror + "/"
            url += name
            try:
                _fetch(url, dest, name, timeout)
                break
            except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, bad checksum...
                reasons.append(f"{url}: {_one_line(exc)}")
        else:
            raise DataError(
                f"could not download {name} into {dest} from any mirror ({'; '.join(reasons) or 'none given'})"
            )
    return dest


def _fetch(url: str, dest: Path, name: str, timeout: float) -> None:
    """Fetch ``url`` to a temporary file in ``dest``, check it, rename it to ``dest/name``."""
    request = urllib.request.Request(url, headers={"User-Agent": "scratchvae"})
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        _check(name, url, _read_bytes(tmp))
        os.replace(tmp, dest / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MNIST(NamedTuple):
    """The MNIST training and test sets as ``uint8`` arrays (read-only).

    Attributes
    ----------
    train_images : uint8 ``(60000, 784)``
        One flattened 28x28 image per row, grey levels 0 (background) to 255.
    train_labels : uint8 ``(60000,)``
        Digits 0-9.
    test_images : uint8 ``(10000, 784)``
    test_labels : uint8 ``(10000,)``
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _load_split(directory: Path, prefix: str, verify: bool):
    """Images ``(N, 784)`` and labels ``(N,)`` of one split (``prefix`` ``"train"`` or ``"t10k"``)."""
    arrays = []
    for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
        name = f"{prefix}-{kind}-ubyte.gz"
        path = _locate(directory, name)
        if path is None:  # removed since find_mnist looked
            raise DataError(f"{directory / name}: no such file")
        data = _read_bytes(path)
        if verify:
            _check(name, path, data)
        arr = parse_idx(data, name=str(path))
        if arr.dtype != np.uint8 or arr.ndim != ndim or (ndim == 3 and arr.shape[1:] != (28, 28)):
            want = "N x 28 x 28" if ndim == 3 else "N"
            raise DataError(f"{path}: holds {_shape_str(arr.shape)} {arr.dtype}, expected {want} uint8")
        arrays.append((path, arr))
    (images_path, images), (labels_path, labels) = arrays
    if len(images) != len(labels):
        raise DataError(f"{images_path}: holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: holds label {labels.max()}, but digits run from 0 to 9")
    return images.reshape(len(images), 28 * 28), labels


def load_mnist(data_dir=None, download: bool = True, verify: bool = True) -> MNIST:
    """Find (or download), check and read MNIST.

    Parameters
    ----------
    data_dir : path, optional
        Read only from here; see :func:`find_mnist` for where else it looks.
    download : bool
        When the files are nowhere (and no ``data_dir`` was given), download
        them into :func:`default_cache_dir` from :data:`MIRRORS`.
    verify : bool
        Check each file's uncompressed MD5 against :data:`MNIST_FILES`.
        Shapes, counts and label range are checked either way.

    Returns
    -------
    MNIST
        ``uint8`` arrays: images ``(N, 784)``, labels ``(N,)``; read-only views
        of the decompressed files, never a float copy.

    Raises
    ------
    DataError
        Files missing (listing the four files, the places searched, and why a
        download failed), unreadable, corrupt, with a wrong checksum, or with
        shapes that do not fit MNIST.
    """
    try:
        directory = find_mnist(data_dir)
    except DataError:
        if data_dir is not None or not download:
            raise
        cache = default_cache_dir()
        try:
            directory = download_mnist(cache, mirrors=MIRRORS)
        except DataError as exc:
            raise _not_found(_search_path(), f", and downloading them failed: {exc}") from None
    return MNIST(*_load_split(directory, "train", verify), *_load_split(directory, "t10k", verify))


# --------------------------------------------------------------------------------------
# Binarization, one batch at a time.
# --------------------------------------------------------------------------------------

BINARIZE = ("none", "dynamic", "static", "dequantize")  # how grey levels u become model inputs x


def _check_uint8(images, name: str) -> None:
    dtype = getattr(images, "dtype", None)
    if dtype != np.uint8:
        got = f"dtype {dtype}" if dtype is not None else type(images).__name__
        raise ValueError(f"{name} must be a uint8 array of grey levels 0-255, got {got}")


def static_binarize(images_u8):
    """Threshold grey levels once: ``255`` where a pixel is above ``127``, else ``0``.

    Parameters
    ----------
    images_u8 : uint8 array, any shape (``(N, 784)`` for MNIST)

    Returns
    -------
    uint8 array, same shape and array module
        Only 0 and 255, so ``/ 255`` later gives exactly 0 and 1.
    """
    _check_uint8(images_u8, "images_u8")
    out = (images_u8 > 127).astype(np.uint8)
    out *= 255
    return out


def to_float_batch(images_u8, binarize: str, rng=None, dtype=np.float32, out=None):
    r"""A float batch for the model from a ``uint8`` batch.

    .. math::
        \text{none:}\ x = u/255 \in [0, 1], \qquad
        \text{static:}\ x = [u > 127] \in \{0, 1\}, \qquad
        \text{dynamic:}\ x = [\,v < u/255\,],\qquad
        \text{dequantize:}\ x = (u + v)/256, \qquad v \sim U[0, 1)

    so a dynamic pixel is 1 with probability :math:`u/255` and a fresh sample
    is drawn at every call ("dynamic binarization"). ``dequantize`` spreads
    each grey level uniformly over its bin :math:`[u/256, (u+1)/256)` (again
    freshly at every call), so a continuous density (the Gaussian
    likelihoods) cannot pile up on the 256 levels: its negative
    log-likelihood plus :math:`D\ln 256` bounds the grey levels' own
    negative log-probability from above (Theis et al., 2016). For
    ``static`` the set is normally thresholded once up front with
    :func:`static_binarize`, where this is exactly ``u/255``; thresholding
    here too makes a forgotten up-front step harmless.

    Parameters
    ----------
    images_u8 : uint8 array ``(batch, 784)`` (any shape works)
        NumPy, or CuPy together with a CuPy generator.
    binarize : {"none", "dynamic", "static", "dequantize"}
    rng : scratchvae.rng.Generator
        Source of :math:`v` (``rng.uniform(shape, dtype)``); needed for ``dynamic`` and ``dequantize``.
    dtype : float dtype
    out : float array ``images_u8.shape`` of ``dtype``, optional
        Written in place and returned, to reuse one buffer across batches.

    Returns
    -------
    float array ``(batch, 784)`` of ``dtype`` (``out`` when given)

    Raises
    ------
    ValueError
        For an unknown ``binarize`` (listing the choices), a non-uint8 batch,
        a missing ``rng`` for ``dynamic``, or an ``out`` of the wrong shape or dtype.
    """
    if binarize not in BINARIZE:
        raise ValueError(f"unknown binarize {binarize!r}; choose one of {', '.join(BINARIZE)}")
    _check_uint8(images_u8, "images_u8")
    if binarize in ("dynamic", "dequantize") and rng is None:
        raise ValueError(f"binarize={binarize!r} needs a random generator rng")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    xp = get_array_module(images_u8)
    if out is None:
        out = xp.empty(images_u8.shape, dtype=dtype)
    elif out.shape != images_u8.shape or out.dtype != dtype or get_array_module(out) is not xp:
        raise ValueError(
            f"out must be a {xp.__name__} array of shape {tuple(images_u8.shape)} and dtype {dtype}, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    if binarize == "static":
        xp.greater(images_u8, 127, out=out)  # the bool result is stored as 0.0 / 1.0
        return out
    out[...] = images_u8
    if binarize == "dequantize":
        out += rng.uniform(out.shape, dtype)
        out /= 256
        return out
    out /= 255  # exact u/255, correctly rounded in dtype
    if binarize == "dynamic":
        xp.less(rng.uniform(out.shape, dtype), out, out=out)  # P(1) = u/255
    return out


def rows_to_float(rows, binarize: str, rng=None, dtype=np.float32, out=None):
    r"""A float batch from rows of ``uint8`` grey levels (:func:`to_float_batch`) or of floats.

    Float rows are used as they are, or binarized like grey levels
    :math:`u/255`: ``static`` keeps :math:`[x > 1/2]`, ``dynamic`` draws
    :math:`[v < x]` with :math:`v \sim U[0, 1)` (values in ``[0, 1]``).
    ``out`` as for :func:`to_float_batch`.
    """
    if getattr(rows, "dtype", None) == np.uint8:
        return to_float_batch(rows, binarize, rng, dtype=dtype, out=out)
    if binarize not in BINARIZE:
        raise ValueError(f"unknown binarize {binarize!r}; choose one of {', '.join(BINARIZE)}")
    xp = get_array_module(rows)
    if out is None:
        out = xp.empty(rows.shape, dtype=dtype)
    if binarize == "static":
        xp.greater(rows, 0.5, out=out)
    else:
        out[...] = rows
    if binarize == "dynamic":
        xp.less(rng.uniform(out.shape, out.dtype), out, out=out)
    return out


def float_batches(images, binarize: str, rng, batch_size: int, dtype, xp):
    """Float batches of ``images`` in order, ``batch_size`` rows each (the last may be short), on ``xp``'s device.

    Each is :func:`rows_to_float` of the next rows (``uint8`` grey levels or
    floats), then copied to the device; ``rng`` draws the dynamic binarization.
    """
    for start in range(0, len(images), batch_size):
        yield to_device(rows_to_float(images[start : start + batch_size], binarize, rng, dtype=dtype), xp)
