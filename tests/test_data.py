"""MNIST data: the IDX reader (against a writer in tests/idx_writer.py), file checks, search order, download, binarization.

Everything runs offline: downloads use ``file://`` mirrors pointing at the
repository's own ``data/mnist``, and every search starts from an environment
with ``SCRATCHVAE_DATA``, the current directory and ``XDG_CACHE_HOME`` pinned
to temporary directories.
"""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from idx_writer import format_idx, write_idx
from scratchvae import data as D
from scratchvae.backend import get_xp, to_numpy
from scratchvae.rng import Generator

MNIST_DIR = Path(__file__).parents[1] / "data" / "mnist"
SOURCE_DATA_DIR = D.SOURCE_DATA_DIR  # before any test pins it elsewhere
IDX_DTYPES = ["uint8", "int8", "int16", "int32", "float32", "float64"]


def one_line_error(excinfo, *fragments):
    """The message is one line and contains every fragment."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert str(f) in msg, f"{f!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------------------
# IDX round trip and errors
# --------------------------------------------------------------------------------------

idx_arrays = st.sampled_from(IDX_DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory for files written inside hypothesis tests (module-scoped, so hypothesis accepts it)."""
    return tmp_path_factory.mktemp("idx")


@given(arr=idx_arrays, compress=st.booleans())
def test_idx_round_trip(arr, compress, scratch):
    path = scratch / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress  # compress defaults to the .gz suffix
    back = D.read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()  # bit for bit, NaNs and -0.0 included
    assert not back.flags.writeable
    assert D.parse_idx(format_idx(arr)).tobytes() == arr.tobytes()


def test_idx_layout_is_big_endian_with_the_documented_header():
    arr = np.array([[1, 2, 3], [4, 5, 258]], dtype=np.int16)
    data = format_idx(arr)
    assert data[:4] == bytes([0, 0, 0x0B, 2])
    assert data[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert data[-2:] == (258).to_bytes(2, "big")


def test_gzip_is_detected_by_content_not_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = write_idx(tmp_path / "raw.gz", arr, compress=False)
    raw_named_gz = write_idx(tmp_path / "gz.idx", arr, compress=True)
    assert gz_named_raw.read_bytes()[:2] == b"\0\0"
    for path in (gz_named_raw, raw_named_gz):
        np.testing.assert_array_equal(D.read_idx(path), arr)


@pytest.mark.parametrize("dtype", ["int64", "bool", "float16", "complex64"])
def test_write_idx_rejects_types_idx_cannot_hold(dtype, tmp_path):
    with pytest.raises(ValueError, match="IDX cannot store dtype"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=dtype))


GOOD = format_idx(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "content, fragment",
    [
        (GOOD[:2], "truncated IDX header"),
        (GOOD[:10], "truncated IDX header"),  # 3 dims need 16 header bytes
        (GOOD[:-1], "truncated IDX data"),
        (GOOD + b"\0", "trailing bytes"),
        (b"\x01" + GOOD[1:], "bad IDX magic"),
        (GOOD[:2] + b"\x07" + GOOD[3:], "unknown IDX element type code 0x07"),
        (b"\x1f\x8b" + b"not a gzip stream at all", "corrupt gzip stream"),
        (gzip.compress(GOOD)[:-12], "corrupt gzip stream"),  # cut short
        (gzip.compress(GOOD)[:-8] + b"\0\0\0\0" + gzip.compress(GOOD)[-4:], "corrupt gzip stream"),  # bad CRC
        (gzip.compress(GOOD[:-1]), "truncated IDX data"),  # a good gzip of a bad IDX
    ],
    ids=[
        "short-magic",
        "short-dims",
        "short-data",
        "long-data",
        "bad-magic",
        "bad-type",
        "garbage-gzip",
        "cut-gzip",
        "bad-crc",
        "gzipped-short-data",
    ],
)
def test_corrupt_files_raise_data_error_naming_file(content, fragment, tmp_path):
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(D.DataError) as excinfo:
        D.read_idx(path)
    one_line_error(excinfo, path, fragment)


def test_missing_file_and_directory_raise_data_error(tmp_path):
    with pytest.raises(D.DataError) as excinfo:
        D.read_idx(tmp_path / "nope.gz")
    one_line_error(excinfo, "nope.gz", "no such file")
    with pytest.raises(D.DataError) as excinfo:
        D.read_idx(tmp_path)
    one_line_error(excinfo, tmp_path, "cannot be read")


@st.composite
def mutated_idx(draw):
    """A valid IDX encoding, then a few random byte edits, a cut, or garbage appended."""
    data = bytearray(format_idx(draw(idx_arrays)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "cut", "append", "insert"]))
        if op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "append":
            data += draw(st.binary(max_size=8))
        elif op == "insert":
            data[draw(st.integers(0, len(data))) : 0] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@st.composite
def odd_headers(draw):
    """A well-formed header announcing extreme shapes (many dimensions, zeros, sizes near 2**32), then a few bytes."""
    ndim = draw(st.integers(0, 70))
    dims = draw(st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**32 - 1]), min_size=ndim, max_size=ndim))
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]))
    header = bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + draw(st.binary(max_size=16))


@given(data=st.one_of(st.binary(max_size=64), mutated_idx(), odd_headers()))
@example(data=b"")
@example(data=b"\0\0\x08\x00\x07")  # a 0-d uint8 array
@example(data=b"\0\0\x0e\x01\0\0\0\0")  # an empty float64 vector
@example(data=b"\0\0\x08\xff")  # 255 dimensions announced, none there
@example(data=b"\0\0\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff")  # ~2**64 elements announced
@example(data=b"\0\0\x08\x03\xb3\0\0\0\0\0\0\0\xb7\x10\0\0")  # 0 elements, but a shape NumPy refuses
@example(data=b"\0\0\x08\x41" + b"\0\0\0\x01" * 65 + b"\x07")  # 65 dimensions: one more than NumPy's limit
def test_parse_idx_fuzz_only_decodes_or_raises_data_error(data):
    try:
        arr = D.parse_idx(data)
    except D.DataError as exc:
        assert "\n" not in str(exc)
        return
    assert data[:2] == b"\0\0"
    assert arr.ndim == data[3]
    assert 4 + 4 * arr.ndim + arr.nbytes == len(data)
    assert format_idx(arr) == data  # what decodes, encodes back to the same bytes


@given(data=mutated_idx(), cut=st.integers(0, 40))
def test_read_idx_fuzz_on_mutated_gzip_streams(data, cut, scratch):
    gz = bytearray(gzip.compress(data, mtime=0))
    if cut:
        gz[len(gz) - cut :] = b""  # a truncated stream (or only the magic left)
    path = scratch / "fuzz.gz"
    path.write_bytes(bytes(gz))
    try:
        D.read_idx(path)
    except D.DataError as exc:
        assert "fuzz.gz" in str(exc)


# --------------------------------------------------------------------------------------
# The four MNIST files: checksums, search order, download
# --------------------------------------------------------------------------------------


def populate(directory, names=tuple(D.MNIST_FILES)):
    """Symlink the real MNIST files into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).symlink_to(MNIST_DIR / name)
    return directory


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Every search place pinned to an empty temporary directory; returns a dict of them."""
    p = {
        "explicit": tmp_path / "explicit",
        "env": tmp_path / "env",
        "cwd": tmp_path / "work" / "data" / "mnist",
        "source": tmp_path / "checkout" / "data" / "mnist",
        "cache": tmp_path / "xdg" / "scratchvae" / "mnist",
    }
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("SCRATCHVAE_DATA", str(p["env"]))
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(D, "SOURCE_DATA_DIR", p["source"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(D, "MIRRORS", ("file:///nonexistent/",))  # never touch the network
    return p


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert D.default_cache_dir() == tmp_path / "x" / "scratchvae" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.default_cache_dir() == tmp_path / "home" / ".cache" / "scratchvae" / "mnist"


ORDER = ["explicit", "env", "cwd", "source", "cache"]


@pytest.mark.parametrize("first", ORDER)
def test_search_order(places, first):
    """Every place from ``first`` on holds the files; the first of them wins."""
    for name in ORDER[ORDER.index(first) :]:
        populate(places[name])
    explicit = places["explicit"] if first == "explicit" else None
    found = D.find_mnist(explicit)
    assert found.resolve() == places[first].resolve()


def test_real_source_checkout_is_found_from_anywhere(places, monkeypatch):
    monkeypatch.setattr(D, "SOURCE_DATA_DIR", SOURCE_DATA_DIR)
    monkeypatch.delenv("SCRATCHVAE_DATA")
    assert D.find_mnist().resolve() == MNIST_DIR.resolve()


def test_incomplete_places_are_skipped_and_uncompressed_files_count(places):
    populate(places["env"], list(D.MNIST_FILES)[:3])  # one file short
    cwd = places["cwd"]
    cwd.mkdir(parents=True)
    for name in D.MNIST_FILES:  # only the names matter to the search
        (cwd / name.removesuffix(".gz")).touch()
    populate(places["cache"])
    assert D.find_mnist() == cwd


def test_explicit_dir_without_the_files_is_an_error_not_a_fallback(places):
    for name in ORDER[1:]:
        populate(places[name])
    populate(places["explicit"], ["t10k-images-idx3-ubyte.gz"])
    with pytest.raises(D.DataError) as excinfo:
        D.find_mnist(places["explicit"])
    one_line_error(excinfo, places["explicit"], "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(D.DataError) as excinfo:
        D.load_mnist(places["explicit"] / "typo")
    one_line_error(excinfo, "typo", "does not exist")


def test_nowhere_without_download_lists_files_and_places(places):
    with pytest.raises(D.DataError) as excinfo:
        D.load_mnist(download=False)
    one_line_error(
        excinfo, *D.MNIST_FILES, *[places[k] for k in ORDER[1:]], "--data-dir", "SCRATCHVAE_DATA"
    )


def test_nowhere_and_offline_gives_one_message(places):
    with pytest.raises(D.DataError) as excinfo:
        D.load_mnist()
    msg = one_line_error(excinfo, *D.MNIST_FILES, places["cache"], "--data-dir", "SCRATCHVAE_DATA", "download")
    assert "file:///nonexistent/t10k-images-idx3-ubyte.gz" in msg
    assert not list(places["cache"].glob("*"))  # no partial files left behind


def test_download_moves_past_failing_and_bad_mirrors(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in D.MNIST_FILES:  # right names, wrong contents
        write_idx(bad / name, np.zeros((1, 28, 28), np.uint8))
    dest = tmp_path / "cache" / "mnist"
    mirrors = ("file:///nonexistent/", bad.as_uri(), MNIST_DIR.as_uri() + "/")
    assert D.download_mnist(dest, mirrors=mirrors) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(D.MNIST_FILES)
    for name in D.MNIST_FILES:
        assert (dest / name).read_bytes() == (MNIST_DIR / name).read_bytes()


def test_download_with_only_a_bad_mirror_reports_the_checksum(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    name = next(iter(D.MNIST_FILES))
    write_idx(bad / name, np.zeros((1, 28, 28), np.uint8))
    dest = tmp_path / "dest"
    with pytest.raises(D.DataError) as excinfo:
        D.download_mnist(dest, mirrors=[bad.as_uri()])
    one_line_error(excinfo, name, "MD5", D.MNIST_FILES[name].md5)
    assert list(dest.iterdir()) == []  # the temporary file is gone


def test_load_downloads_into_the_cache_when_the_files_are_nowhere(places, monkeypatch):
    monkeypatch.setattr(D, "MIRRORS", ("file:///nonexistent/", MNIST_DIR.as_uri()))
    mnist = D.load_mnist()
    assert sorted(p.name for p in places["cache"].iterdir()) == sorted(D.MNIST_FILES)
    assert mnist.test_images.shape == (10000, 784)
    assert D.find_mnist() == places["cache"]


def test_checksum_mismatch_names_file_and_both_md5s(tmp_path):
    """A tampered (uncompressed) label file among real ones is caught by its MD5 alone."""
    name = "t10k-labels-idx1-ubyte.gz"
    populate(tmp_path, [n for n in D.MNIST_FILES if n != name])
    raw = bytearray(gzip.decompress((MNIST_DIR / name).read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # still a well-formed file with labels in 0..9
    tampered = tmp_path / name.removesuffix(".gz")
    tampered.write_bytes(bytes(raw))
    with pytest.raises(D.DataError) as excinfo:
        D.load_mnist(tmp_path)
    one_line_error(excinfo, tampered, D.MNIST_FILES[name].md5, hashlib.md5(raw).hexdigest())
    mnist = D.load_mnist(tmp_path, verify=False)  # well-formed, so it loads unchecked
    assert mnist.test_labels[-1] == raw[-1]


def write_fake_mnist(directory, n_train=5, n_test=3, image_shape=(28, 28), labels=None):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, *image_shape), np.uint8))
        lab = rng.integers(0, 10, n, np.uint8) if labels is None else np.full(n, labels, np.uint8)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", lab)
    return directory


def test_unverified_load_still_checks_shapes(tmp_path):
    mnist = D.load_mnist(write_fake_mnist(tmp_path / "ok"), verify=False)
    assert mnist.train_images.shape == (5, 784) and mnist.test_labels.shape == (3,)
    first = D.read_idx(tmp_path / "ok" / "train-images-idx3-ubyte.gz")[0]
    np.testing.assert_array_equal(mnist.train_images[0].reshape(28, 28), first)  # rows are flattened images

    cases = [
        (write_fake_mnist(tmp_path / "dims", image_shape=(27, 28)), "27x28"),
        (write_fake_mnist(tmp_path / "labels", labels=10), "label 10"),
    ]
    counts = write_fake_mnist(tmp_path / "counts")
    write_idx(counts / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    cases.append((counts, "5 images but"))
    for directory, fragment in cases:
        with pytest.raises(D.DataError) as excinfo:
            D.load_mnist(directory, verify=False)
        one_line_error(excinfo, directory, fragment)
    with pytest.raises(D.DataError) as excinfo:  # and with verification, the MD5 catches them first
        D.load_mnist(tmp_path / "ok")
    one_line_error(excinfo, "MD5")


# --------------------------------------------------------------------------------------
# The real MNIST
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    """Real MNIST from the repository, loaded once, recording which files had their MD5 checked."""
    checked = []
    real_check = D._check

    def spy(name, path, data):
        real_check(name, path, data)
        checked.append(name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "_check", spy)
        data = D.load_mnist(MNIST_DIR)
    return data, checked


def test_real_mnist(mnist):
    data, checked = mnist
    assert sorted(checked) == sorted(D.MNIST_FILES)  # the real checksum path ran for every file
    assert [a.shape for a in data] == [(60000, 784), (60000,), (10000, 784), (10000,)]
    assert all(a.dtype == np.uint8 for a in data)
    for labels in (data.train_labels, data.test_labels):
        assert labels.max() == 9 and np.bincount(labels, minlength=10).min() > 800
    np.testing.assert_array_equal(data.train_labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    assert abs(data.train_images.mean() / 255 - 0.1307) < 1e-4  # the well-known pixel mean


# --------------------------------------------------------------------------------------
# Binarization
# --------------------------------------------------------------------------------------


@pytest.fixture
def grey(xp):
    """Every grey level 0..255, plus random pixels: a (8, 784) uint8 batch."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 784), dtype=np.uint8)
    x[0, :256] = np.arange(256)
    return xp.asarray(x)


@given(x=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=10)))
def test_none_is_exactly_x_over_255(x):
    for dtype in (np.float32, np.float64):
        y = D.to_float_batch(x, "none", None, dtype=dtype)
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, x.astype(dtype) / dtype(255))


def test_static_gives_only_zero_and_one(xp, dtype, grey):
    s = D.static_binarize(grey)
    assert s.dtype == np.uint8
    np.testing.assert_array_equal(to_numpy(s), np.where(to_numpy(grey) > 127, 255, 0))
    y = to_numpy(D.to_float_batch(s, "static", None, dtype=dtype))
    np.testing.assert_array_equal(y, to_numpy(s) / 255)  # exactly "none" on the thresholded set
    assert set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(to_numpy(D.to_float_batch(grey, "static", None, dtype=dtype)), y)


def test_dynamic_is_a_fresh_bernoulli_sample_with_mean_x_over_255(backend, dtype, grey):
    xp = get_xp(backend)
    rng = Generator(0, xp)
    n = 2000
    out = xp.empty(grey.shape, dtype=dtype)
    total = np.zeros(grey.shape)
    first = None
    for _ in range(n):
        y = D.to_float_batch(grey, "dynamic", rng, dtype=dtype, out=out)
        assert y is out
        y = to_numpy(y)
        first = y.copy() if first is None else first
        total += y
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert not np.array_equal(first, y)  # each call draws anew
    p = to_numpy(grey) / 255
    se = np.sqrt(p * (1 - p) / n)
    # 5 standard errors per pixel; pixels 0 and 255 are exactly never / always on
    assert np.all(np.abs(total / n - p) <= 5 * se), np.abs(total / n - p).max()
    # same seed, same draws
    a = to_numpy(D.to_float_batch(grey, "dynamic", Generator(1, xp), dtype=dtype))
    b = to_numpy(D.to_float_batch(grey, "dynamic", Generator(1, xp), dtype=dtype))
    np.testing.assert_array_equal(a, b)


def test_binarize_argument_errors():
    grey = np.zeros((8, 784), np.uint8)
    with pytest.raises(ValueError, match="none, dynamic, static"):
        D.to_float_batch(grey, "otsu", Generator(0))
    with pytest.raises(ValueError, match="uint8"):
        D.to_float_batch(grey.astype(np.float32), "none", None)
    with pytest.raises(ValueError, match="uint8"):
        D.static_binarize(grey.astype(np.int16))
    for binarize in ("dynamic", "dequantize"):
        with pytest.raises(ValueError, match="needs a random generator"):
            D.to_float_batch(grey, binarize, None)
    with pytest.raises(ValueError, match="shape"):
        D.to_float_batch(grey, "none", None, out=np.empty((8, 783), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        D.to_float_batch(grey, "none", None, dtype=np.float64, out=np.empty(grey.shape, np.float32))
    assert D.BINARIZE == ("none", "dynamic", "static", "dequantize")



def test_dequantize_spreads_each_grey_level_uniformly_over_its_bin():
    from scratchvae.rng import Generator

    u = np.repeat(np.array([0, 1, 127, 254, 255], np.uint8)[:, None], 20000, axis=1)
    x = D.to_float_batch(u, "dequantize", Generator(0), np.float64)
    lo, hi = u / 256, (u.astype(np.float64) + 1) / 256
    assert ((x >= lo) & (x < hi)).all()
    width = 1 / 256  # mean (u + 1/2)/256 and variance width^2/12 of a uniform draw in the bin
    np.testing.assert_allclose(x.mean(axis=1), (u[:, 0] + 0.5) / 256, atol=4 * width / np.sqrt(12 * 20000))
    np.testing.assert_allclose(x.var(axis=1), np.full(5, width**2 / 12), rtol=0.05)
    again = D.to_float_batch(u, "dequantize", Generator(0), np.float64)
    assert np.array_equal(again, x) and not np.array_equal(D.to_float_batch(u, "dequantize", Generator(1)), x)
