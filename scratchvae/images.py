r"""Pictures of what a VAE learned: PNG files, image grids, training curves, latent plots.

Everything here runs on NumPy alone. PNG files are written by hand with the
standard library (:mod:`zlib`, :mod:`struct`, :func:`binascii.crc32`),
so that a grid of samples can be saved without any imaging package. Plots use
matplotlib when it is installed (``pip install 'scratchvae[plot]'``) and fall
back to a plain NumPy rendering otherwise, so the picture always exists;
matplotlib is imported inside the plotting functions, never when this module
is imported.

This module sits at the edge of the library: it is where arrays are copied to
the host (:func:`scratchvae.backend.to_numpy`), so every function accepts CuPy
arrays as well as NumPy ones.

The PNG format, as far as it is used here::

    file  = signature  IHDR-chunk  IDAT-chunk...  IEND-chunk
    chunk = length (4 bytes, big-endian)  type (4 ASCII bytes)  data  CRC-32(type + data)
    IHDR  = width, height (4 bytes each), bit depth, colour type, 0, 0, interlace (1 byte each)
    IDAT  = zlib stream of the image rows, each row prefixed by its filter-type byte

Typical use after training (``model`` a :class:`scratchvae.VAE`, ``x`` and
``y`` test images and labels):

>>> save_reconstructions("recon.png", x[:20], model.reconstruct(x[:20]))  # doctest: +SKIP
>>> save_grid("samples.png", model.sample(100), ncols=10)  # doctest: +SKIP
>>> print(plot_curves("loss.png", {"train": train_losses, "test": test_losses}))  # doctest: +SKIP
>>> # with latent_dim == 2:
>>> save_grid("manifold.png", model.decode(latent_grid(20)), ncols=20)  # doctest: +SKIP
>>> print(plot_latent("latent.png", model.encode(x)[0], y))  # doctest: +SKIP
"""

from __future__ import annotations

import binascii
import struct
import zlib
from statistics import NormalDist

import numpy as np

from .files import atomic_write
from .backend import to_numpy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


MATPLOTLIB = "matplotlib"
NUMPY_FALLBACK = "numpy (install scratchvae[plot] for labelled axes)"

# The ten "tab10" colours (matplotlib's default cycle), so that both renderers
# colour series and labels alike.
PALETTE_NAMES = ("blue", "orange", "green", "red", "purple", "brown", "pink", "grey", "olive", "cyan")
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.uint8,
)


# --------------------------------------------------------------------------- PNG


def _to_uint8(a, what="image"):
    """Pixel values as ``uint8``: floats in ``[0, 1]`` are scaled by 255 and rounded.

    Floats outside ``[0, 1]`` are clipped (a Gaussian decoder's mean can stray
    slightly past the ends); integers must already lie in ``0..255``; booleans
    become 0 and 255. NaN or inf raises :class:`ValueError`.
    """
    a = np.asarray(a)
    kind = a.dtype.kind
    if a.dtype == np.uint8:
        return a
    if kind == "b":
        return a.astype(np.uint8) * np.uint8(255)
    if kind in "iu":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"integer {what} values must lie in 0..255, got {a.min()}..{a.max()}")
        return a.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"{what} contains NaN or inf")
        return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"{what} must be a numeric array, got dtype {a.dtype}")


def _chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC-32 of type + data."""
    crc = binascii.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def write_png(path, image) -> None:
    """Write an 8-bit greyscale or RGB PNG file.

    Parameters
    ----------
    path : str or os.PathLike
        Written atomically (a temporary file in the same directory is renamed
        over it); missing parent directories are created.
    image : array ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB)
        ``uint8``, or floats in ``[0, 1]`` (scaled by 255 and rounded; values
        outside are clipped), or integers in ``0..255``. NumPy or CuPy.

    Raises
    ------
    ValueError
        Wrong number of dimensions or channels, an empty image, NaN/inf, or
        integers outside ``0..255``.

    Notes
    -----
    Every row is stored with filter type 0 (no filter) and the rows are
    compressed with :func:`zlib.compress`; that is all a valid PNG needs.
    """
    a = to_numpy(image)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {a.shape}")
    height, width = a.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image is empty, shape {a.shape}")
    a = np.ascontiguousarray(_to_uint8(a))
    colour_type = 0 if a.ndim == 2 else 2
    rows = a.reshape(height, -1)
    filtered = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter byte 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    data = b"".join(
        [
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)),
            _chunk(b"IEND", b""),
        ]
    )
    atomic_write(path, lambda f: f.write(data))


# ------------------------------------------------------------------------ grids


def _tile_shape(shape):
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair of positive ints (height, width), got {shape!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"shape must be a pair of positive ints (height, width), got {shape!r}")
    return h, w


def _as_tiles(images, shape, what="images"):
    """A batch ``(N, h*w)`` or ``(N, h, w)`` as ``uint8`` tiles ``(N, h, w)`` on the host."""
    h, w = _tile_shape(shape)
    a = to_numpy(images)
    if not ((a.ndim == 2 and a.shape[1] == h * w) or (a.ndim == 3 and a.shape[1:] == (h, w))):
        raise ValueError(f"{what} must have shape (N, {h * w}) or (N, {h}, {w}), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    return _to_uint8(a, what).reshape(-1, h, w)


def _canvas(nrows, ncols, h, w, pad, pad_value):
    """A blank grid of ``nrows x ncols`` cells of ``h x w`` pixels, ``pad`` pixels apart and around."""
    if int(pad) != pad or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    pad_value = float(pad_value)
    if not 0.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value must lie in [0, 1], got {pad_value}")
    pad = int(pad)
    fill = np.uint8(round(pad_value * 255))
    return np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad), fill, dtype=np.uint8)


def _put(canvas, tile, row, col, pad):
    """Place ``tile`` ``(h, w)`` in cell ``(row, col)``: top-left pixel at ``pad + row*(h+pad), pad + col*(w+pad)``."""
    h, w = tile.shape
    top, left = pad + row * (h + pad), pad + col * (w + pad)
    canvas[top : top + h, left : left + w] = tile


def _ncols(ncols, n, default):
    if ncols is None:
        ncols = default
    if int(ncols) != ncols or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    return min(int(ncols), n)


def image_grid(images, ncols=None, shape=(28, 28), pad=2, pad_value=1.0) -> np.ndarray:
    """Tile a batch of images into one greyscale picture, row by row.

    Parameters
    ----------
    images : array ``(N, h*w)`` or ``(N, h, w)``
        Floats in ``[0, 1]`` or ``uint8``; NumPy or CuPy (copied to the host here).
    ncols : int, optional
        Tiles per row; default ``ceil(sqrt(N))``. Capped at ``N``.
    shape : (int, int)
        ``(h, w)`` of one tile; ``(28, 28)`` for MNIST.
    pad : int
        Pixels between tiles and around the border.
    pad_value : float in ``[0, 1]``
        Grey level of the padding and of empty cells (1.0: white).

    Returns
    -------
    uint8 array ``(H, W)``
        ``H = nrows*(h + pad) + pad`` and ``W = ncols*(w + pad) + pad`` with
        ``nrows = ceil(N / ncols)``. Image ``k`` sits in row ``k // ncols``,
        column ``k % ncols``; its top-left pixel is at
        ``(pad + row*(h + pad), pad + col*(w + pad))``.

    Raises
    ------
    ValueError
        Wrong shape, an empty batch, NaN/inf, or bad ``ncols``/``pad``/``pad_value``.
    """
    tiles = _as_tiles(images, shape)
    n, h, w = tiles.shape
    ncols = _ncols(ncols, n, int(np.ceil(np.sqrt(n))))
    nrows = -(-n // ncols)
    canvas = _canvas(nrows, ncols, h, w, pad, pad_value)
    for k, tile in enumerate(tiles):
        _put(canvas, tile, k // ncols, k % ncols, int(pad))
    return canvas


def save_grid(path, images, ncols=None, shape=(28, 28)) -> None:
    """Write :func:`image_grid` ``(images, ncols, shape)`` to a PNG file (white 2-pixel padding).

    Parameters
    ----------
    path : str or os.PathLike
    images : array ``(N, h*w)`` or ``(N, h, w)``, floats in ``[0, 1]`` or ``uint8``
    ncols : int, optional
        Tiles per row; default ``ceil(sqrt(N))``.
    shape : (int, int)
    """
    write_png(path, image_grid(images, ncols=ncols, shape=shape))


def save_reconstructions(path, originals, reconstructions, ncols=10, shape=(28, 28)) -> None:
    """Write originals and their reconstructions as pairs of rows to a PNG file.

    Layout: the examples are taken ``ncols`` at a time; each group gives two
    grid rows, the originals on top and, directly below each one, its
    reconstruction. Twenty examples with ``ncols=10`` give four rows::

        row 0: x[0]  .. x[9]        originals
        row 1: r[0]  .. r[9]        their reconstructions
        row 2: x[10] .. x[19]
        row 3: r[10] .. r[19]

    A last, incomplete group leaves its remaining cells white. Tiles are
    2 pixels apart, as in :func:`image_grid`.

    Parameters
    ----------
    path : str or os.PathLike
    originals, reconstructions : arrays ``(N, h*w)`` or ``(N, h, w)``
        Same ``N``; floats in ``[0, 1]`` or ``uint8``; NumPy or CuPy.
    ncols : int
        Examples per row (capped at ``N``).
    shape : (int, int)

    Raises
    ------
    ValueError
        Different numbers of originals and reconstructions, or bad shapes/values.
    """
    x = _as_tiles(originals, shape, "originals")
    r = _as_tiles(reconstructions, shape, "reconstructions")
    if x.shape[0] != r.shape[0]:
        raise ValueError(f"got {x.shape[0]} originals but {r.shape[0]} reconstructions")
    n, h, w = x.shape
    pad = 2
    ncols = _ncols(ncols, n, 10)
    ngroups = -(-n // ncols)
    canvas = _canvas(2 * ngroups, ncols, h, w, pad, 1.0)
    for k in range(n):
        group, col = divmod(k, ncols)
        _put(canvas, x[k], 2 * group, col, pad)
        _put(canvas, r[k], 2 * group + 1, col, pad)
    write_png(path, canvas)


def latent_grid(n=20, span=0.95, xp=np):
    r"""Latent points for the picture of a 2-D latent space (the "manifold" figure).

    Each axis takes the standard-normal quantiles of ``n`` evenly spaced
    probabilities, so the grid covers the prior evenly in probability:

    .. math::
        q_i = \Phi^{-1}(p_i),\qquad p_i = \mathrm{linspace}(1 - \mathrm{span},\ \mathrm{span},\ n)_i

    Point ``k = row*n + col`` is :math:`(z_1, z_2) = (q_{col}, q_{n-1-row})`:
    ``z1`` grows along a row and ``z2`` falls down the rows, so decoding the
    points and tiling them with ``save_grid(path, decoded, ncols=n)`` puts
    the picture the right way up (``z2`` upwards, as on a plot).

    Parameters
    ----------
    n : int
        Points per axis, at least 2.
    span : float in ``(0.5, 1)``
        Largest probability; 0.95 reaches :math:`\Phi^{-1}(0.95) \approx 1.645`.
    xp : module
        Array module of the result (``numpy`` or ``cupy``).

    Returns
    -------
    float64 array ``(n*n, 2)``
    """
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    span = float(span)
    if not 0.5 < span < 1.0:
        raise ValueError(f"span must lie strictly between 0.5 and 1, got {span}")
    n = int(n)
    inv_cdf = NormalDist().inv_cdf
    q = np.array([inv_cdf(p) for p in np.linspace(1.0 - span, span, n)])
    z1 = np.tile(q, n)  # columns: increasing
    z2 = np.repeat(q[::-1], n)  # rows: decreasing
    return xp.asarray(np.stack([z1, z2], axis=1))


# ------------------------------------------------------------------------ plots


def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, or ``None`` when matplotlib is not installed.

    The object-oriented API with an explicit Agg canvas draws off-screen
    without pyplot and without switching the process-wide backend (which
    would disturb, say, a notebook that imported this module).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _save_figure(path, fig) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _data_range(lo, hi):
    """``(lo, hi)`` widened by 5% on each side, and by 1 where it is a single value."""
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    margin = 0.05 * (hi - lo)
    return lo - margin, hi + margin


class _Frame:
    """A white RGB canvas with a plot area; maps data coordinates to pixels."""

    def __init__(self, height, width, margins, xlim, ylim):
        top, right, bottom, left = margins
        self.canvas = np.full((height, width, 3), 255, dtype=np.uint8)
        self.x0, self.x1 = left, width - 1 - right  # plot area, pixel columns
        self.y0, self.y1 = top, height - 1 - bottom  # plot area, pixel rows
        self.xlim, self.ylim = xlim, ylim

    def px(self, x):
        (lo, hi) = self.xlim
        return self.x0 + (np.asarray(x, float) - lo) / (hi - lo) * (self.x1 - self.x0)

    def py(self, y):
        (lo, hi) = self.ylim
        return self.y1 - (np.asarray(y, float) - lo) / (hi - lo) * (self.y1 - self.y0)  # y grows upwards

    def stamp(self, cols, rows, colour, size):
        """Paint ``size x size`` squares centred at pixel ``(rows, cols)``; ``colour`` ``(3,)`` or ``(N, 3)``."""
        cols = np.rint(np.asarray(cols, float)).astype(np.intp).reshape(-1)
        rows = np.rint(np.asarray(rows, float)).astype(np.intp).reshape(-1)
        h, w = self.canvas.shape[:2]
        for dr in range(size):
            for dc in range(size):
                r = np.clip(rows + dr - size // 2, 0, h - 1)
                c = np.clip(cols + dc - size // 2, 0, w - 1)
                self.canvas[r, c] = colour

    def line(self, c0, r0, c1, r1, colour, size=1):
        """A straight line between two pixel positions, one stamp per pixel step."""
        steps = int(np.ceil(max(abs(c1 - c0), abs(r1 - r0)))) + 1
        self.stamp(np.linspace(c0, c1, steps), np.linspace(r0, r1, steps), colour, size)

    def axes(self, box=False):
        """Black axis lines along the left and bottom of the plot area (all four sides if ``box``)."""
        black = (0, 0, 0)
        self.line(self.x0, self.y1, self.x1, self.y1, black)
        self.line(self.x0, self.y0, self.x0, self.y1, black)
        if box:
            self.line(self.x0, self.y0, self.x1, self.y0, black)
            self.line(self.x1, self.y0, self.x1, self.y1, black)


def _as_series(series):
    """``{name: float64 array (n,)}`` with non-finite values as NaN; validates the input."""
    if not isinstance(series, dict) or not series:
        raise ValueError("series must be a non-empty dict {name: list of floats}")
    out = {}
    for name, values in series.items():
        try:
            y = np.array([float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"series {name!r} must be a sequence of numbers") from None
        if y.size == 0:
            raise ValueError(f"series {name!r} is empty")
        y[~np.isfinite(y)] = np.nan
        out[str(name)] = y
    if all(np.isnan(y).all() for y in out.values()):
        raise ValueError("series contain no finite values to plot")
    return out


def plot_curves(path, series, xlabel="epoch", ylabel="loss (nats)", title=None) -> str:
    """Plot one or more curves (e.g. train and test loss per epoch) to a PNG file.

    Parameters
    ----------
    path : str or os.PathLike
    series : dict ``{name: sequence of float}``
        Value ``i`` of every series is drawn at ``x = i + 1`` (epochs count from
        1). Series may differ in length; NaN/inf values leave a gap.
    xlabel, ylabel, title : str
        Used by matplotlib; the NumPy fallback draws no text.

    Returns
    -------
    str
        Which renderer drew the picture: ``"matplotlib"``, or the NumPy
        fallback's note followed by the colour of each series (it has no legend).

    Notes
    -----
    With matplotlib: a labelled line plot with a legend, 640x480 pixels. Without
    it: a 640x480 white canvas with left and bottom axes spanning the data
    range, each series a 2-pixel polyline in its own colour (matplotlib's
    default colours, in the order of ``series``), with square markers when a
    series has at most 100 points.
    """
    data = _as_series(series)
    mpl = _matplotlib()
    if mpl is not None:
        Figure, FigureCanvasAgg = mpl
        from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

        fig = Figure(figsize=(6.4, 4.8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, y in data.items():
            ax.plot(np.arange(1, y.size + 1), y, marker="o" if y.size <= 100 else None, markersize=3, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        _save_figure(path, fig)
        return MATPLOTLIB

    finite = np.concatenate([y[np.isfinite(y)] for y in data.values()])
    longest = max(y.size for y in data.values())
    xlim, ylim = _data_range(1.0, float(longest)), _data_range(finite.min(), finite.max())
    frame = _Frame(480, 640, (20, 20, 30, 40), xlim, ylim)
    frame.axes()
    for i, y in enumerate(data.values()):
        colour = PALETTE[i % len(PALETTE)]
        cols, rows = frame.px(np.arange(1, y.size + 1)), frame.py(y)
        for j in range(y.size - 1):  # a segment wherever both ends are finite
            if np.isfinite(y[j]) and np.isfinite(y[j + 1]):
                frame.line(cols[j], rows[j], cols[j + 1], rows[j + 1], colour, size=2)
        ok = np.isfinite(y)
        if y.size <= 100 or ok.sum() == 1:
            frame.stamp(cols[ok], rows[ok], colour, size=5)
    write_png(path, frame.canvas)
    key = ", ".join(f"{name}={PALETTE_NAMES[i % len(PALETTE)]}" for i, name in enumerate(data))
    return f"{NUMPY_FALLBACK}; colours: {key}"


def plot_latent(path, codes, labels, title=None) -> str:
    """Scatter 2-D latent codes coloured by their class label, to a PNG file.

    Parameters
    ----------
    path : str or os.PathLike
    codes : array ``(N, 2)``
        Latent codes (e.g. the encoder means ``mu``); NumPy or CuPy, finite.
    labels : int array ``(N,)``
        Class labels in ``0..9``; NumPy or CuPy.
    title : str, optional
        Used by matplotlib; the NumPy fallback draws no text.

    Returns
    -------
    str
        ``"matplotlib"``, or the NumPy fallback's note followed by its colour key.

    Notes
    -----
    With matplotlib: a scatter plot with axes ``z1``, ``z2`` and a colour bar,
    640x560 pixels. Without it: a 560x560 white canvas framed by a box at the
    data range, grey lines at ``z1 = 0`` and ``z2 = 0`` where they fall inside it,
    and a 3x3-pixel square per code in the colour of its label (matplotlib's
    "tab10" palette: 0 blue, 1 orange, ..., 9 cyan), drawn in the given order.
    """
    z = to_numpy(codes)
    y = to_numpy(labels)
    if z.ndim != 2 or z.shape[1] != 2 or z.shape[0] == 0:
        raise ValueError(f"codes must have shape (N, 2) with N >= 1, got {z.shape}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"labels must have shape ({z.shape[0]},), got {y.shape}")
    if z.dtype.kind not in "iuf" or not np.isfinite(z).all():
        raise ValueError("codes must be finite numbers")
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() > 9:
        raise ValueError(f"labels must be ints in 0..9, got dtype {y.dtype}")
    z = z.astype(np.float64)
    y = y.astype(np.intp)

    mpl = _matplotlib()
    if mpl is not None:
        Figure, FigureCanvasAgg = mpl
        fig = Figure(figsize=(6.4, 5.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        points = ax.scatter(z[:, 0], z[:, 1], c=y, cmap="tab10", vmin=-0.5, vmax=9.5, s=4, linewidths=0)
        fig.colorbar(points, ax=ax, ticks=range(10), label="label")
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        if title:
            ax.set_title(title)
        _save_figure(path, fig)
        return MATPLOTLIB

    xlim = _data_range(z[:, 0].min(), z[:, 0].max())
    ylim = _data_range(z[:, 1].min(), z[:, 1].max())
    frame = _Frame(560, 560, (20, 20, 20, 20), xlim, ylim)
    grey = (200, 200, 200)
    if xlim[0] < 0 < xlim[1]:
        frame.line(frame.px(0.0), frame.y0, frame.px(0.0), frame.y1, grey)
    if ylim[0] < 0 < ylim[1]:
        frame.line(frame.x0, frame.py(0.0), frame.x1, frame.py(0.0), grey)
    frame.axes(box=True)
    frame.stamp(frame.px(z[:, 0]), frame.py(z[:, 1]), PALETTE[y], size=3)
    write_png(path, frame.canvas)
    key = ", ".join(f"{k}={PALETTE_NAMES[k]}" for k in range(10))
    return f"{NUMPY_FALLBACK}; label colours: {key}"
