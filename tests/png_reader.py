"""Reading PNG files, for the tests of :func:`scratchvae.images.write_png` (the package only writes them).

Enough of the format to read the writer's files and most others: 8-bit grey,
grey + alpha, RGB and RGBA, every row filter, no interlacing.
"""

from __future__ import annotations

import binascii
import os
import struct
import zlib

import numpy as np

from scratchvae.images import PNG_SIGNATURE

# PNG colour type -> samples per pixel: 0 grey and 2 RGB (what the writer makes), 4 grey + alpha and
# 6 RGBA (what other programs, matplotlib among them, usually write).
SAMPLES_PER_PIXEL = {0: 1, 2: 3, 4: 2, 6: 4}


def unfilter_row(filter_type, line, prev, bpp):
    r"""Undo one row's PNG filter.

    With ``x`` the filtered byte, ``a`` the reconstructed byte ``bpp`` to the
    left, ``b`` the one above and ``c`` the one above ``a`` (0 outside the
    image), the reconstruction is ``x + predictor`` modulo 256:

    ====  =======  ==========================================================
    type  name     predictor
    ====  =======  ==========================================================
    0     None     0
    1     Sub      ``a``
    2     Up       ``b``
    3     Average  ``(a + b) // 2``
    4     Paeth    whichever of ``a, b, c`` is closest to ``p = a + b - c``
                   (ties prefer ``a``, then ``b``)
    ====  =======  ==========================================================

    Parameters
    ----------
    filter_type : int
    line : uint8 array ``(W * bpp,)``
        The filtered row, without its filter byte.
    prev : uint8 array ``(W * bpp,)``
        The reconstructed row above (zeros for the first row).
    bpp : int
        Bytes per pixel.

    Returns
    -------
    uint8 array ``(W * bpp,)``
    """
    if filter_type == 0:
        return line
    if filter_type == 1:
        # Each byte adds the reconstructed byte bpp to its left: a running sum per
        # channel, and uint8 arithmetic wraps modulo 256 exactly as PNG requires.
        return np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if filter_type == 2:
        return line + prev
    if filter_type not in (3, 4):
        raise ValueError(f"unknown PNG filter type {filter_type}")
    # Average and Paeth depend on the byte just reconstructed: a plain loop.
    x, b = line.tolist(), prev.tolist()
    for i in range(len(x)):
        a = x[i - bpp] if i >= bpp else 0
        if filter_type == 3:
            pred = (a + b[i]) // 2
        else:
            c = b[i - bpp] if i >= bpp else 0
            p = a + b[i] - c
            pa, pb, pc = abs(p - a), abs(p - b[i]), abs(p - c)
            pred = a if (pa <= pb and pa <= pc) else (b[i] if pb <= pc else c)
        x[i] = (x[i] + pred) & 0xFF
    return np.array(x, dtype=np.uint8)


def read_png(path) -> np.ndarray:
    """Read an 8-bit, non-interlaced PNG file (enough to read :func:`write_png`'s files and most others).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    uint8 array
        ``(H, W)`` for greyscale, ``(H, W, 3)`` for RGB, ``(H, W, 2)`` for grey
        with alpha, ``(H, W, 4)`` for RGBA.

    Raises
    ------
    ValueError
        Not a PNG, truncated, a chunk whose CRC does not match, corrupt
        compressed data, or a kind of PNG this reader does not handle
        (palette images, bit depths other than 8, interlacing).

    Notes
    -----
    All five row filters are decoded (see :func:`unfilter_row`). Ancillary
    chunks (type starting with a lower-case letter) and ``PLTE`` are skipped.
    """
    with open(path, "rb") as f:
        data = f.read()
    name = os.fspath(path)
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{name}: not a PNG file (bad signature)")
    pos, header, idat = len(PNG_SIGNATURE), None, []
    while True:
        if pos + 8 > len(data):
            raise ValueError(f"{name}: truncated PNG (no IEND chunk)")
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body_end = pos + 8 + length
        if body_end + 4 > len(data):
            raise ValueError(f"{name}: truncated PNG (chunk {tag!r} runs past the end)")
        body = data[pos + 8 : body_end]
        (crc,) = struct.unpack(">I", data[body_end : body_end + 4])
        if binascii.crc32(tag + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"{name}: bad CRC in chunk {tag!r}")
        pos = body_end + 4
        if header is None and tag != b"IHDR":
            raise ValueError(f"{name}: the first chunk must be IHDR, got {tag!r}")
        if tag == b"IHDR":
            if length != 13:
                raise ValueError(f"{name}: IHDR has length {length}, expected 13")
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        elif not tag[0] & 0x20 and tag != b"PLTE":  # upper-case first letter: critical
            raise ValueError(f"{name}: unsupported critical chunk {tag!r}")

    width, height, depth, colour_type, compression, filter_method, interlace = header
    if width == 0 or height == 0:
        raise ValueError(f"{name}: empty image {width}x{height}")
    if depth != 8 or colour_type not in SAMPLES_PER_PIXEL:
        raise ValueError(
            f"{name}: only 8-bit grey, grey+alpha, RGB and RGBA PNGs are supported "
            f"(bit depth {depth}, colour type {colour_type})"
        )
    if compression != 0 or filter_method != 0:
        raise ValueError(f"{name}: unknown compression/filter method {compression}/{filter_method}")
    if interlace != 0:
        raise ValueError(f"{name}: interlaced PNGs are not supported")
    if not idat:
        raise ValueError(f"{name}: no IDAT chunk")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ValueError(f"{name}: corrupt image data ({exc})") from None

    bpp = SAMPLES_PER_PIXEL[colour_type]
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{name}: image data has {len(raw)} bytes, expected {height * (stride + 1)}")
    raw = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.empty((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        prev = out[y] = unfilter_row(int(raw[y, 0]), raw[y, 1:], prev, bpp)
    return out.reshape(height, width) if bpp == 1 else out.reshape(height, width, bpp)
