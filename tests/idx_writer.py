"""Writing IDX files, for the tests of the reader in :mod:`scratchvae.data` (the package only reads them).

The IDX layout is described in :mod:`scratchvae.data`; :func:`format_idx` is
the inverse of :func:`scratchvae.data.parse_idx`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from scratchvae.data import IDX_DTYPES


def _idx_code(dtype: np.dtype) -> int:
    for code, big in IDX_DTYPES.items():
        if dtype in (big, big.newbyteorder("=")):
            return code
    names = ", ".join(dt.newbyteorder("=").name for dt in IDX_DTYPES.values())
    raise ValueError(f"IDX cannot store dtype {dtype}; use one of {names}")


def format_idx(array) -> bytes:
    """Encode an array as the bytes of an IDX file (the inverse of :func:`parse_idx`).

    Parameters
    ----------
    array : array_like, any shape with at most 255 dimensions, each below 2**32
        Of dtype uint8, int8, int16, int32, float32 or float64.

    Raises
    ------
    ValueError
        For any other dtype, or a shape IDX cannot describe.
    """
    arr = np.asarray(array)
    code = _idx_code(arr.dtype)
    if arr.ndim > 255 or any(d >= 1 << 32 for d in arr.shape):
        raise ValueError(f"IDX cannot describe shape {arr.shape} (at most 255 dimensions, each below 2**32)")
    header = bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path, array, compress: bool | None = None) -> Path:
    """Write an array as an IDX file, gzip-compressed when ``compress`` (default: ``path`` ends in ``.gz``).

    The gzip header carries no timestamp, so equal arrays give equal files.
    Returns the path. Raises ``ValueError`` as :func:`format_idx`.
    """
    path = Path(path)
    data = format_idx(array)
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
