"""Tests for scratchvae.images: the hand-written PNG writer, grids, plots and the latent grid.

The PNG writer is checked three ways: a round trip through the tests' own
reader (``tests/png_reader.py``),
an independent parse of the file's chunks with a CRC recomputed here, and,
where Pillow or matplotlib is installed, a read by that library. The reader's
row filters are checked against an encoder written here from the PNG
specification. Plots are checked with and without matplotlib.
"""

import binascii
import struct
import subprocess
import sys
import zlib
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from png_reader import SAMPLES_PER_PIXEL, read_png
from scratchvae import images as im
from scratchvae.backend import to_numpy

SIGNATURE = b"\x89PNG\r\n\x1a\n"

grey_images = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9))
rgb_images = st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
    lambda hw: hnp.arrays(np.uint8, (*hw, 3))
)


def chunks(data):
    """Parse a PNG's chunks independently of the library: ``[(type, body, crc_ok)]``."""
    assert data[:8] == SIGNATURE
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        out.append((tag, body, binascii.crc32(tag + body) & 0xFFFFFFFF == crc))
        pos += 12 + length
    return out


def png_bytes(ihdr, idat, extra=()):
    """Assemble a PNG from an IHDR tuple and a raw (already filtered) IDAT payload."""

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", binascii.crc32(tag + body) & 0xFFFFFFFF)

    parts = [SIGNATURE, chunk(b"IHDR", struct.pack(">IIBBBBB", *ihdr)), *extra]
    parts += [chunk(b"IDAT", zlib.compress(idat)), chunk(b"IEND", b"")]
    return b"".join(parts)


def filter_rows(rows, types, bpp):
    """Apply PNG filters (spec section 9.2) row by row; the reference for the reader's inverse."""
    h, stride = rows.shape
    out = bytearray()
    prev = [0] * stride
    for y in range(h):
        x, t = rows[y].tolist(), types[y]
        out.append(t)
        for i in range(stride):
            a = x[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if t == 0:
                pred = 0
            elif t == 1:
                pred = a
            elif t == 2:
                pred = b
            elif t == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            out.append((x[i] - pred) % 256)
        prev = x
    return bytes(out)


# ---------------------------------------------------------------- PNG writer/reader


@given(grey_images)
@example(np.zeros((1, 1), np.uint8))
def test_png_round_trip_grey(tmp_path_factory, image):
    path = tmp_path_factory.mktemp("png") / "grey.png"
    im.write_png(path, image)
    back = read_png(path)
    assert back.dtype == np.uint8 and back.shape == image.shape
    np.testing.assert_array_equal(back, image)


@given(rgb_images)
def test_png_round_trip_rgb(tmp_path_factory, image):
    path = tmp_path_factory.mktemp("png") / "rgb.png"
    im.write_png(path, image)
    np.testing.assert_array_equal(read_png(path), image)


@given(hnp.arrays(np.float64, (4, 5), elements=st.floats(0.0, 1.0)))
def test_float_images_are_scaled_and_rounded(tmp_path_factory, image):
    path = tmp_path_factory.mktemp("png") / "float.png"
    im.write_png(path, image)
    np.testing.assert_array_equal(read_png(path), np.rint(image * 255).astype(np.uint8))


def test_float_values_outside_unit_interval_are_clipped(tmp_path):
    im.write_png(tmp_path / "c.png", np.array([[-0.5, 0.5, 1.5]]))
    np.testing.assert_array_equal(read_png(tmp_path / "c.png"), [[0, 128, 255]])


@pytest.mark.parametrize("image", [np.arange(12, dtype=np.uint8).reshape(3, 4), np.full((2, 3, 3), 200, np.uint8)])
def test_png_file_structure_and_crcs(tmp_path, image):
    path = tmp_path / "x.png"
    im.write_png(path, image)
    data = path.read_bytes()
    assert data.startswith(SIGNATURE)
    parsed = chunks(data)
    assert [tag for tag, _, _ in parsed] == [b"IHDR", b"IDAT", b"IEND"]
    assert all(ok for _, _, ok in parsed), "a chunk CRC does not match"
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", parsed[0][1])
    assert (w, h, depth, colour, comp, filt, interlace) == (
        image.shape[1], image.shape[0], 8, 0 if image.ndim == 2 else 2, 0, 0, 0
    )
    raw = zlib.decompress(parsed[1][1])
    rows = np.frombuffer(raw, np.uint8).reshape(h, -1)
    assert (rows[:, 0] == 0).all(), "every row should use filter type 0"
    np.testing.assert_array_equal(rows[:, 1:], image.reshape(h, -1))


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "x.png"  # the parent directory is created
    im.write_png(path, np.zeros((2, 2)))
    im.write_png(path, np.ones((3, 3)))  # replaces the old file
    assert read_png(path).shape == (3, 3)
    with pytest.raises(ValueError):
        im.write_png(path, np.full((2, 2), np.nan))  # a failed write keeps the old file
    assert read_png(path).shape == (3, 3)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


@given(
    st.sampled_from([0, 2, 4, 6]).flatmap(
        lambda ct: st.tuples(
            st.just(ct),
            hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(SAMPLES_PER_PIXEL[ct]))),
        )
    ),
    st.data(),
)
# Paeth ties, second pixel of the second row: b == c in distance (the spec picks b),
# and a == c in distance (the spec picks a). data=None means "Paeth on every row".
@example((0, np.array([[[2], [0]], [[3], [7]]], np.uint8)), None)
@example((0, np.array([[[2], [3]], [[0], [7]]], np.uint8)), None)
def test_reader_undoes_every_filter_type(tmp_path_factory, ct_image, data):
    colour_type, image = ct_image
    h, w, bpp = image.shape
    types = [4] * h if data is None else data.draw(st.lists(st.integers(0, 4), min_size=h, max_size=h))
    path = tmp_path_factory.mktemp("png") / "filtered.png"
    path.write_bytes(png_bytes((w, h, 8, colour_type, 0, 0, 0), filter_rows(image.reshape(h, -1), types, bpp)))
    back = read_png(path)
    np.testing.assert_array_equal(back, image[:, :, 0] if bpp == 1 else image)


def test_reader_skips_ancillary_chunks(tmp_path):
    text = struct.pack(">I", 4) + b"tEXt" + b"a\x00bc" + struct.pack(">I", binascii.crc32(b"tEXta\x00bc"))
    path = tmp_path / "t.png"
    path.write_bytes(png_bytes((2, 1, 8, 0, 0, 0, 0), b"\x00\x07\x09", extra=[text]))
    np.testing.assert_array_equal(read_png(path), [[7, 9]])


def test_png_readable_by_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (7, 5), dtype=np.uint8), rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)):
        im.write_png(tmp_path / "p.png", image)
        with Image.open(tmp_path / "p.png") as f:
            np.testing.assert_array_equal(np.asarray(f), image)


def test_png_readable_by_matplotlib(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    image = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    im.write_png(tmp_path / "m.png", image)
    back = mpimg.imread(tmp_path / "m.png")  # floats in [0, 1] for PNG
    np.testing.assert_array_equal(np.rint(back[..., :3] * 255).astype(np.uint8), image)


@pytest.mark.parametrize(
    "image",
    [np.zeros(5), np.zeros((2, 2, 2)), np.zeros((2, 2, 4)), np.zeros((0, 3)), np.array([[0.5, np.nan]]),
     np.array([[np.inf]]), np.array([[256]]), np.array([[-1]]), np.array([["a"]])],
    ids=["1d", "2ch", "4ch", "empty", "nan", "inf", "int>255", "int<0", "str"],
)
def test_write_png_rejects_bad_input(tmp_path, image):
    with pytest.raises(ValueError):
        im.write_png(tmp_path / "bad.png", image)
    assert not (tmp_path / "bad.png").exists()


def _corrupt(data):
    """Variants of a valid PNG that the reader must refuse."""
    ihdr_body = 8 + 8  # offset of the IHDR data
    flip = bytearray(data)
    flip[ihdr_body] ^= 1  # width changes, CRC no longer matches
    return {
        "signature": b"\x89PNG\r\n\x1a\x00" + data[8:],
        "crc": bytes(flip),
        "truncated": data[:-20],
        "no-iend": data[:-12],
        "not-png": b"hello",
        "16-bit": png_bytes((1, 1, 16, 0, 0, 0, 0), b"\x00\x00\x00"),
        "palette": png_bytes((1, 1, 8, 3, 0, 0, 0), b"\x00\x00"),
        "interlaced": png_bytes((1, 1, 8, 0, 0, 0, 1), b"\x00\x00"),
        "short-data": png_bytes((2, 2, 8, 0, 0, 0, 0), b"\x00\x01\x02"),
        "bad-filter": png_bytes((1, 1, 8, 0, 0, 0, 0), b"\x05\x00"),
        "bad-zlib": data[:33] + struct.pack(">I", 3) + b"IDAT" + b"xyz" + struct.pack(">I", binascii.crc32(b"IDATxyz"))
        + data[-12:],
    }


@pytest.mark.parametrize("kind", list(_corrupt(png_bytes((1, 1, 8, 0, 0, 0, 0), b"\x00\x00"))))
def test_read_png_rejects_bad_files(tmp_path, kind):
    good = tmp_path / "good.png"
    im.write_png(good, np.zeros((2, 3), np.uint8))
    path = tmp_path / "bad.png"
    path.write_bytes(_corrupt(good.read_bytes())[kind])
    with pytest.raises(ValueError):
        read_png(path)


# --------------------------------------------------------------------------- grids


def distinct_tiles(n, shape=(28, 28)):
    """``n`` uint8 tiles, tile ``k`` filled with the value ``k`` (plus a mark in its corner)."""
    tiles = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], shape[0] * shape[1], axis=1).reshape(n, *shape)
    tiles[:, 0, 0] = 250  # top-left corner marks the orientation
    return tiles


@pytest.mark.parametrize("n, ncols, pad", [(7, 3, 2), (12, 4, 0), (1, None, 3), (10, None, 2), (3, 10, 1)])
def test_grid_geometry_and_placement(n, ncols, pad):
    tiles = distinct_tiles(n)
    grid = im.image_grid(tiles.reshape(n, -1), ncols=ncols, pad=pad)
    cols = min(ncols or int(np.ceil(np.sqrt(n))), n)
    rows = -(-n // cols)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * (28 + pad) + pad, cols * (28 + pad) + pad)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = pad + r * (28 + pad), pad + c * (28 + pad)
        np.testing.assert_array_equal(grid[top : top + 28, left : left + 28], tiles[k])
    # padding and empty cells are white
    mask = np.ones(grid.shape, bool)
    for k in range(n):
        r, c = divmod(k, cols)
        mask[pad + r * (28 + pad) : pad + r * (28 + pad) + 28, pad + c * (28 + pad) : pad + c * (28 + pad) + 28] = False
    assert (grid[mask] == 255).all()


def test_grid_float_input_shape_and_pad_value():
    images = np.full((4, 3, 5), 0.5)
    grid = im.image_grid(images, ncols=2, shape=(3, 5), pad=1, pad_value=0.0)
    assert grid.shape == (2 * 4 + 1, 2 * 6 + 1)
    assert grid[0, 0] == 0 and grid[1, 1] == 128


def test_grid_accepts_every_backend(xp):
    rng = np.random.default_rng(0)
    images = rng.random((5, 784))
    grid = im.image_grid(xp.asarray(images), ncols=3)
    assert isinstance(grid, np.ndarray)
    np.testing.assert_array_equal(grid, im.image_grid(images, ncols=3))


@pytest.mark.parametrize(
    "images, kwargs",
    [
        (np.zeros((3, 783)), {}),
        (np.zeros((0, 784)), {}),
        (np.zeros(784), {}),
        (np.full((2, 784), np.nan), {}),
        (np.zeros((2, 784)), {"ncols": 0}),
        (np.zeros((2, 784)), {"pad": -1}),
        (np.zeros((2, 784)), {"pad_value": 2.0}),
        (np.zeros((2, 784)), {"shape": (28, 0)}),
    ],
)
def test_image_grid_rejects_bad_input(images, kwargs):
    with pytest.raises(ValueError):
        im.image_grid(images, **kwargs)


def test_save_grid_writes_the_grid(tmp_path):
    images = np.random.default_rng(0).random((6, 784))
    im.save_grid(tmp_path / "g.png", images, ncols=3)
    np.testing.assert_array_equal(read_png(tmp_path / "g.png"), im.image_grid(images, ncols=3))


@pytest.mark.parametrize("n, ncols", [(20, 10), (13, 5), (3, 10)])
def test_reconstructions_sit_below_their_originals(tmp_path, n, ncols):
    x = distinct_tiles(n)
    r = distinct_tiles(n) + 100  # reconstruction k is filled with 100 + k
    im.save_reconstructions(tmp_path / "r.png", x.reshape(n, -1), r.reshape(n, -1), ncols=ncols)
    grid = read_png(tmp_path / "r.png")
    cols = min(ncols, n)
    groups = -(-n // cols)
    assert grid.shape == (2 * groups * 30 + 2, cols * 30 + 2)
    for k in range(n):
        g, c = divmod(k, cols)
        top, left = 2 + 2 * g * 30, 2 + c * 30
        np.testing.assert_array_equal(grid[top : top + 28, left : left + 28], x[k])  # original
        np.testing.assert_array_equal(grid[top + 30 : top + 58, left : left + 28], r[k])  # right below
    if n % cols:  # cells after the last example are blank
        g, c = divmod(n, cols)
        assert (grid[2 + 2 * g * 30 :, 2 + c * 30 :] == 255).all()


def test_reconstructions_must_match_originals(tmp_path):
    with pytest.raises(ValueError):
        im.save_reconstructions(tmp_path / "r.png", np.zeros((4, 784)), np.zeros((3, 784)))


# --------------------------------------------------------------------------- plots


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make ``import matplotlib`` fail, as on a machine without the plot extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def colour_present(picture, rgb):
    return bool((picture == np.array(rgb, np.uint8)).all(axis=-1).any())


def test_importing_images_does_not_import_matplotlib():
    code = "import sys, scratchvae.images; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_curves_numpy_fallback(tmp_path, no_matplotlib):
    series = {"train": [120.0, 100.0, 95.0, 93.0], "test": [118.0, 104.0, float("nan"), 99.0], "one": [110.0]}
    how = im.plot_curves(tmp_path / "c.png", series, title="ignored")
    assert how.startswith(im.NUMPY_FALLBACK)
    assert "train=blue" in how and "test=orange" in how and "one=green" in how
    picture = read_png(tmp_path / "c.png")
    assert picture.shape == (480, 640, 3)
    assert (picture[0, 0] == 255).all()  # white background
    for rgb in im.PALETTE[:3]:
        assert colour_present(picture, rgb)
    assert colour_present(picture, (0, 0, 0))  # axes


def test_plot_curves_fallback_puts_high_values_up_and_late_epochs_right(tmp_path, no_matplotlib):
    im.plot_curves(tmp_path / "c.png", {"loss": [0.0, 10.0]})
    picture = read_png(tmp_path / "c.png")
    rows, cols = np.nonzero((picture == im.PALETTE[0]).all(axis=-1))
    assert rows[cols.argmin()] > rows[cols.argmax()]  # the curve rises to the right


@pytest.mark.parametrize("series", [{}, {"a": []}, {"a": [float("nan")]}, {"a": ["x"]}, [1.0, 2.0]])
def test_plot_curves_rejects_bad_series(tmp_path, series):
    with pytest.raises(ValueError):
        im.plot_curves(tmp_path / "c.png", series)


def latent_data(n=300):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    angle = labels * (2 * np.pi / 10)
    codes = np.stack([np.cos(angle), np.sin(angle)], 1) * 2 + 0.2 * rng.standard_normal((n, 2))
    return codes, labels


def test_plot_latent_numpy_fallback(tmp_path, no_matplotlib):
    codes, labels = latent_data()
    how = im.plot_latent(tmp_path / "z.png", codes, labels)
    assert how.startswith(im.NUMPY_FALLBACK) and "0=blue" in how and "9=cyan" in how
    picture = read_png(tmp_path / "z.png")
    assert picture.shape == (560, 560, 3)
    for rgb in im.PALETTE:
        assert colour_present(picture, rgb)
    # label 0 sits at angle 0 (right of centre), label 5 at angle pi (left of centre)
    _, c0 = np.nonzero((picture == im.PALETTE[0]).all(axis=-1))
    _, c5 = np.nonzero((picture == im.PALETTE[5]).all(axis=-1))
    assert c0.mean() > 280 > c5.mean()


def test_plot_latent_accepts_every_backend(tmp_path, xp, no_matplotlib):
    codes, labels = latent_data(50)
    im.plot_latent(tmp_path / "a.png", xp.asarray(codes), xp.asarray(labels))
    im.plot_latent(tmp_path / "b.png", codes, labels)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize(
    "codes, labels",
    [
        (np.zeros((3, 3)), np.zeros(3, int)),
        (np.zeros((3, 2)), np.zeros(2, int)),
        (np.zeros((3, 2)), np.array([0, 1, 10])),
        (np.zeros((3, 2)), np.array([0, -1, 1])),
        (np.zeros((3, 2)), np.zeros(3)),
        (np.array([[0.0, np.nan]]), np.zeros(1, int)),
        (np.zeros((0, 2)), np.zeros(0, int)),
    ],
)
def test_plot_latent_rejects_bad_input(tmp_path, codes, labels):
    with pytest.raises(ValueError):
        im.plot_latent(tmp_path / "z.png", codes, labels)


def test_plots_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    how = im.plot_curves(tmp_path / "c.png", {"train": [3.0, 2.0, 1.5], "test": [3.1, 2.5, 2.0]}, title="loss")
    assert how == im.MATPLOTLIB
    codes, labels = latent_data()
    assert im.plot_latent(tmp_path / "z.png", codes, labels, title="latent") == im.MATPLOTLIB
    for name, size in [("c.png", (480, 640)), ("z.png", (560, 640))]:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(SIGNATURE)
        assert all(ok for _, _, ok in chunks(data))
        width, height = struct.unpack(">II", chunks(data)[0][1][:8])
        assert (height, width) == size
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # matplotlib writes RGBA with Sub/Up/Paeth row filters: a foreign file for our reader
    Image = pytest.importorskip("PIL.Image")  # a matplotlib dependency
    with Image.open(tmp_path / "c.png") as f:
        np.testing.assert_array_equal(read_png(tmp_path / "c.png"), np.asarray(f))


def test_plots_with_matplotlib_leave_pyplot_backend_alone(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    im.plot_curves(tmp_path / "c.png", {"a": [1.0, 2.0]})
    assert matplotlib.get_backend() == before
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


# ---------------------------------------------------------------------- latent grid


def test_latent_grid_values_and_order():
    n, span = 5, 0.9
    z = im.latent_grid(n, span)
    q = [NormalDist().inv_cdf(p) for p in np.linspace(1 - span, span, n)]
    assert z.shape == (n * n, 2)
    grid = z.reshape(n, n, 2)  # [row, col, (z1, z2)]
    np.testing.assert_allclose(grid[0, :, 0], q)  # z1 increases along a row
    np.testing.assert_allclose(grid[:, 0, 1], q[::-1])  # z2 decreases down the rows
    assert (np.diff(grid[..., 0], axis=1) > 0).all() and (np.diff(grid[..., 0], axis=0) == 0).all()
    assert (np.diff(grid[..., 1], axis=0) < 0).all() and (np.diff(grid[..., 1], axis=1) == 0).all()
    np.testing.assert_allclose(grid[0, -1], [NormalDist().inv_cdf(span)] * 2)  # top right: both largest


@given(st.integers(2, 30), st.floats(0.51, 0.999))
def test_latent_grid_is_symmetric(n, span):
    z = im.latent_grid(n, span).reshape(n, n, 2)
    np.testing.assert_allclose(z[..., 0], -z[::-1, ::-1, 0], atol=1e-12)  # q is odd about the centre
    np.testing.assert_allclose(z[..., 0], z[..., 1][::-1].T, atol=1e-12)  # same quantiles on both axes
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0.0, atol=1e-12)


def test_latent_grid_backend(xp):
    z = im.latent_grid(4, xp=xp)
    assert isinstance(z, xp.ndarray)
    np.testing.assert_array_equal(to_numpy(z), im.latent_grid(4))


@pytest.mark.parametrize("n, span", [(1, 0.95), (2.5, 0.95), (4, 0.5), (4, 1.0), (4, 1.2)])
def test_latent_grid_rejects_bad_arguments(n, span):
    with pytest.raises(ValueError):
        im.latent_grid(n, span)
