"""Your own data: data sets from arrays and files, the estimator (fit, transform, save, load), and the
command line's ``train --data``, ``evaluate`` and ``sample`` on every kind of checkpoint.

The real second data set is scikit-learn's ``load_digits`` (1,797 8x8 images
with values 0-16, shipped inside scikit-learn: no download); the continuous
one is a synthetic 10-d set from a 2-d latent code.
"""

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scratchvae as sv
from scratchvae import datasets
from scratchvae import train as T
from scratchvae.checkpoint import load_checkpoint, save_checkpoint
from scratchvae.data import DataError
from scratchvae.images import image_grid

from idx_writer import format_idx
from png_reader import read_png

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "scratchvae", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)  # fmt: skip


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchvae: error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def continuous(n=2000, seed=0):
    """10 standardised features from a 2-d latent code: ``tanh(z A + b)`` plus a little noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    x = np.tanh(z @ rng.normal(size=(2, 10)) + rng.normal(size=10)) + 0.05 * rng.normal(size=(n, 10))
    return (x - x.mean(0)) / x.std(0)


@pytest.fixture(scope="module")
def digits():
    """``load_digits`` as images in [0, 1] ``(1797, 8, 8)`` and labels."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (the test extra) has load_digits")
    d = sklearn_datasets.load_digits()
    return d.images / 16.0, d.target


# ------------------------------------------------------------------------------------------
# Data sets.
# ------------------------------------------------------------------------------------------


def test_a_held_out_split_is_disjoint_seeded_and_keeps_labels_with_their_rows():
    x = np.arange(50, dtype=np.float64).reshape(25, 2)
    y = np.arange(25) % 10
    ds = datasets.from_arrays(x, validation=0.2, seed=3, train_labels=y)
    assert (len(ds.train), len(ds.test)) == (20, 5)  # ceil(0.2 * 25)
    rows = sorted(ds.train[:, 0].tolist() + ds.test[:, 0].tolist())
    assert rows == x[:, 0].tolist()  # every row once, in one part or the other
    assert np.array_equal(ds.train_labels, (ds.train[:, 0] // 2).astype(int) % 10)
    assert np.array_equal(ds.test_labels, (ds.test[:, 0] // 2).astype(int) % 10)
    again = datasets.from_arrays(x, validation=0.2, seed=3)
    other = datasets.from_arrays(x, validation=0.2, seed=4)
    assert np.array_equal(again.test, ds.test) and not np.array_equal(other.test, ds.test)
    assert "held out" in ds.split and "seed 3" in ds.split
    assert len(datasets.from_arrays(x[:2], validation=0.01).test) == 1  # at least one row
    assert len(datasets.from_arrays(x[:2], validation=0.99).train) == 1  # and one left to train on


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda: np.array([["a", "b"]]), "must be numbers"),
        (lambda: np.zeros(5), "must have shape (n_examples, n_features)"),
        (lambda: np.zeros((0, 3)), "n_examples >= 1"),
        (lambda: np.array([[0.0, 1.0], [np.nan, 2.0], [np.inf, 0.0]]), "2 NaN or inf values (the first in row 1, column 0)"),
        (lambda: np.zeros((1, 3)), "1 example cannot be split"),
    ],
    ids=["strings", "1-d", "empty", "nan", "one row"],
)
def test_bad_arrays_are_one_line(make, fragment):
    with pytest.raises(DataError) as info:
        datasets.from_arrays(make())
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_shapes_dtypes_and_what_counts_as_images():
    u8 = np.zeros((10, 5, 7), np.uint8)
    ds = datasets.from_arrays(u8)
    assert ds.train.dtype == np.uint8 and ds.dim == 35 and ds.image_shape == (5, 7)
    assert datasets.from_arrays(np.zeros((10, 64))).image_shape == (8, 8)  # square, values in [0, 1]
    assert datasets.from_arrays(np.full((10, 64), 2.0)).image_shape is None  # square, but not grey levels
    assert datasets.from_arrays(np.zeros((10, 9))).image_shape is None  # 3x3 is too small to be a picture
    assert datasets.from_arrays(np.zeros((10, 12)), image_shape=(3, 4)).image_shape == (3, 4)
    with pytest.raises(DataError, match=r"image shape \(5, 5\) does not fit 12"):
        datasets.from_arrays(np.zeros((10, 12)), image_shape=(5, 5))
    assert datasets.from_arrays(np.ones((4, 3), dtype=np.int16)).train.dtype == np.float64
    with pytest.raises(DataError, match="the test data have 4 features, the training data 3"):
        datasets.from_arrays(np.zeros((4, 3)), np.zeros((2, 4)))


def test_the_bernoulli_likelihood_refuses_data_outside_0_1_and_static_thresholds_floats():
    ds = datasets.from_arrays(continuous(100))
    with pytest.raises(DataError, match=r"values run from -\d.* but the bernoulli likelihood needs values in \[0, 1\]"):
        datasets.prepare(ds, likelihood="bernoulli", binarize="none")
    kept = datasets.prepare(ds, likelihood="gaussian", binarize="none").train
    assert np.shares_memory(kept, ds.train) and np.array_equal(kept, ds.train)  # no copy
    with pytest.raises(DataError, match="binarize=dequantize spreads uint8 grey levels over their bins"):
        datasets.prepare(ds, likelihood="gaussian", binarize="dequantize")
    grey = datasets.from_arrays(np.array([[0.2, 0.7], [0.5, 0.51], [1.0, 0.0]]), np.array([[0.6, 0.4]]))
    static = datasets.prepare(grey, likelihood="bernoulli", binarize="static")
    assert static.train.tolist() == [[0, 1], [0, 1], [1, 0]] and static.test.tolist() == [[1, 0]]


@pytest.mark.parametrize("form", ["npy", "npz train/test", "npz x_train/x_test", "npz train only", "npz one array"])
def test_files_of_each_form_load(form, tmp_path):
    x, t = continuous(40), continuous(8, seed=1)
    y = np.arange(40) % 10
    path = tmp_path / ("d.npy" if form == "npy" else "d.npz")
    if form == "npy":
        np.save(path, x)
    elif form == "npz train/test":
        np.savez(path, train=x, test=t, y_train=y, y_test=np.arange(8))
    elif form == "npz x_train/x_test":
        np.savez(path, x_train=x, x_test=t)
    elif form == "npz train only":
        np.savez(path, train=x)
    else:
        np.savez(path, whatever=x)
    ds = datasets.load_file(path, validation=0.25, seed=0)
    given = form in ("npz train/test", "npz x_train/x_test")
    assert (len(ds.train), len(ds.test)) == ((40, 8) if given else (30, 10))
    assert ds.dim == 10 and ds.image_shape is None and ds.source == str(path)
    if form == "npz train/test":
        assert np.array_equal(ds.train_labels, y) and np.array_equal(ds.test, t)


def test_an_npz_image_shape_and_bad_files_are_one_line(tmp_path):
    np.savez(tmp_path / "shaped.npz", train=np.zeros((6, 12)), image_shape=np.array([3, 4]))
    assert datasets.load_file(tmp_path / "shaped.npz").image_shape == (3, 4)
    np.savez(tmp_path / "other.npz", a=np.zeros(3), b=np.zeros(3))
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object))
    (tmp_path / "text.npy").write_text("1,2,3\n")
    for name, fragment in [("other.npz", "expected arrays named train and test (or x_train and x_test), found a, b"),
                           ("objects.npy", "holds Python objects, which scratchvae never loads"),
                           ("text.npy", "is a text file, not a .npy or .npz file"),
                           ("missing.npy", "no such file or folder")]:  # fmt: skip
        with pytest.raises(DataError) as info:
            datasets.load_file(tmp_path / name)
        said = str(info.value)
        assert fragment in said and "\n" not in said and "pickle" not in said, said


@pytest.mark.parametrize("names", [("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                                    "train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
                                   ("emnist-letters-train-images-idx3-ubyte", "emnist-letters-test-images-idx3-ubyte",
                                    "emnist-letters-train-labels-idx1-ubyte", None)],
                         ids=["fashion-mnist names", "emnist names"])  # fmt: skip
def test_a_folder_of_idx_files_loads_with_its_test_set_and_labels(names, tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 6, 5), dtype=np.uint8), rng.integers(0, 256, (4, 6, 5), dtype=np.uint8),
              rng.integers(0, 27, 12, dtype=np.uint8), rng.integers(0, 10, 4, dtype=np.uint8)]  # fmt: skip
    for name, a in zip(names, arrays):
        if name is not None:
            data = format_idx(a)
            (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    ds = datasets.load_file(tmp_path)
    assert ds.image_shape == (6, 5) and ds.train.dtype == np.uint8
    assert np.array_equal(ds.train, arrays[0].reshape(12, 30)) and np.array_equal(ds.test, arrays[1].reshape(4, 30))
    assert np.array_equal(ds.train_labels, arrays[2])
    assert (ds.test_labels is None) == (names[3] is None)
    (tmp_path / names[0]).unlink()
    with pytest.raises(DataError, match="no IDX file of training images"):
        datasets.load_file(tmp_path)


# ------------------------------------------------------------------------------------------
# The estimator.
# ------------------------------------------------------------------------------------------


def test_fit_transform_save_load_gives_the_same_codes_bit_for_bit(tmp_path):
    x = continuous()
    vae = sv.VAEEstimator(hidden=(32,), latent_dim=2, likelihood="gaussian", epochs=3, seed=1)
    assert vae.fit(x) is vae  # scikit-learn's convention
    assert [r["epoch"] for r in vae.history_] == [1, 2, 3]
    assert {"train_loss", "test_loss", "test_recon", "test_kl"} <= set(vae.history_[0])
    codes = vae.transform(x)
    assert codes.shape == (2000, 2) and codes.dtype == np.float32
    assert np.array_equal(vae.encode(x), codes)
    assert vae.reconstruct(x[:7]).shape == (7, 10) and vae.sample(5).shape == (5, 10)
    assert math.isfinite(vae.score(x))
    path = vae.save(tmp_path / "vae.npz")
    again = sv.load(path)
    assert np.array_equal(again.transform(x), codes)
    assert again.history_ == vae.history_ and again.n_features_in_ == 10 and again.image_shape_ is None
    with pytest.raises(ValueError, match="X has 9 features, but the model was fitted to 10"):
        vae.transform(x[:, :9])
    with pytest.raises(ValueError, match="not fitted yet"):
        sv.VAEEstimator().transform(x)


def test_fit_writes_a_run_folder_when_asked_and_resumes_it_exactly(tmp_path):
    x = continuous(600)
    kw = dict(hidden=(16,), latent_dim=2, likelihood="gaussian", batch_size=50, seed=2, out=tmp_path / "run")
    whole = sv.VAEEstimator(epochs=3, **kw).fit(x)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != ".lock") == [
        "checkpoint.npz", "latent.png", "loss.png", "metrics.jsonl", "reconstructions.npy", "samples.npy"]
    with pytest.raises(T.RunFolderUsed):
        sv.VAEEstimator(epochs=3, **kw).fit(x)
    kw["out"] = tmp_path / "split"
    sv.VAEEstimator(epochs=2, **kw).fit(x)
    resumed = sv.VAEEstimator(epochs=3, resume=True, **kw).fit(x)
    assert np.array_equal(resumed.model_.params, whole.model_.params)
    with pytest.raises(Exception, match="trained on other data"):  # the data's fingerprint is checked
        sv.VAEEstimator(epochs=4, resume=True, **kw).fit(x[::-1])
    loaded = sv.load(tmp_path / "split")  # a run folder loads too
    assert np.array_equal(loaded.transform(x), resumed.transform(x))


def test_a_fresh_seed_is_drawn_and_recorded_when_none_is_given():
    a, b = sv.VAE(4, (3,), 2, seed=None), sv.VAE(4, (3,), 2, seed=None)
    assert isinstance(a.seed, int) and a.config()["seed"] == a.seed and a.seed != b.seed
    assert np.array_equal(sv.VAE(4, (3,), 2, seed=a.seed).params, a.params)
    est = sv.VAEEstimator(hidden=(4,), latent_dim=2, likelihood="gaussian", epochs=1, seed=None).fit(continuous(50))
    assert isinstance(est.seed_, int) and est.model_.seed == est.seed_


def test_digits_from_python_learn_and_their_pictures_are_8x8_grids(digits, tmp_path):
    images, labels = digits
    vae = sv.VAEEstimator(hidden=(64,), latent_dim=2, epochs=8, seed=0, out=tmp_path / "run").fit(images, labels)
    first, last = vae.history_[0]["test_loss"], vae.history_[-1]["test_loss"]
    assert last < first - 5, (first, last)  # nats per example, on 180 held-out digits
    assert vae.image_shape_ == (8, 8)
    expected = image_grid(np.zeros((100, 64)), ncols=10, shape=(8, 8)).shape
    assert read_png(tmp_path / "run" / "samples.png").shape[:2] == expected
    assert read_png(tmp_path / "run" / "manifold.png").shape[:2] == image_grid(np.zeros((400, 64)), ncols=20,
                                                                                 shape=(8, 8)).shape  # fmt: skip


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian_learned"])
def test_the_gaussian_likelihoods_learn_continuous_data(likelihood):
    x = continuous(3000)
    vae = sv.VAEEstimator(hidden=(64,), latent_dim=2, likelihood=likelihood, epochs=25, seed=0)
    vae.fit(x[:2500], validation=x[2500:])
    mse = float(((vae.reconstruct(x[2500:]) - x[2500:]) ** 2).mean())
    assert mse < 0.35, mse  # the features have variance 1: the mean alone gives 1
    assert vae.history_[-1]["test_loss"] < vae.history_[0]["test_loss"]


# ------------------------------------------------------------------------------------------
# The command line on your own data, and on every kind of checkpoint.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """Checkpoints of each kind: train --data on digits and on 10-d data, VAEEstimator.save, an autoencoder."""
    d = tmp_path_factory.mktemp("own")
    images, labels = digits
    np.savez(d / "digits.npz", train=images, y_train=labels)
    np.save(d / "ten.npy", continuous(1000))
    out = {}
    for name, flags in (("digits", ["--data", "digits.npz", "--hidden", 64, "--epochs", 6]),
                        ("ten", ["--data", "ten.npy", "--likelihood", "gaussian", "--hidden", 32, "--epochs", 3])):  # fmt: skip
        proc = cli("train", *flags, "--latent", 2, "--progress", "off", "--out", name, cwd=d)
        assert proc.returncode == 0, proc.stderr
        out[name] = (d / name, proc.stdout)
    sv.VAEEstimator(hidden=(8,), latent_dim=2, likelihood="gaussian", epochs=1).fit(continuous(100)).save(d / "lib.npz")
    ae = sv.Autoencoder(10, (8,), 2)
    save_checkpoint(d / "ae.npz", ae.params, {"model": ae.config()})
    return d, out


def test_train_data_digits_end_to_end(runs):
    d, out = runs
    folder, stdout = out["digits"]
    assert "digits.npz: 1,617 8x8 examples for training, 180 for testing (no test set was given: a random 10%" in stdout
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] - 5
    assert read_png(folder / "samples.png").shape[:2] == image_grid(np.zeros((100, 64)), ncols=10, shape=(8, 8)).shape
    assert (folder / "reconstructions.png").exists() and not (folder / "samples.npy").exists()
    meta = load_checkpoint(folder / "checkpoint.npz").meta
    assert meta["data"]["image_shape"] == [8, 8] and meta["data"]["path"] == str(d / "digits.npz")


def test_train_data_of_ten_features_writes_arrays_and_says_so(runs):
    _, out = runs
    folder, stdout = out["ten"]
    assert "the data are not images: samples and reconstructions are arrays in" in stdout
    assert np.load(folder / "samples.npy").shape == (100, 10)
    pairs = np.load(folder / "reconstructions.npy")
    assert pairs.shape == (2, 40, 10) and np.isfinite(pairs).all()
    assert not (folder / "samples.png").exists() and (folder / "loss.png").exists()


@pytest.mark.parametrize("kind", ["digits", "ten", "lib.npz", "ae.npz"])
def test_evaluate_and_sample_on_every_kind_of_checkpoint(kind, runs):
    d, _ = runs
    target = kind if kind.endswith(".npz") else d / kind  # run folders are accepted as well as files
    evaluate = cli("evaluate", target, "--iwae-k", 5, "--json", cwd=d)
    sample = cli("sample", target, "--n", 4, cwd=d)
    if kind == "ae.npz":
        one_line_error(evaluate, "holds a plain autoencoder, which has no ELBO")
        one_line_error(sample, "holds a plain autoencoder, which has no prior p(z) to sample from")
        return
    if kind == "lib.npz":  # saved from Python: no data file recorded
        one_line_error(evaluate, "holds a model of 10-d data and names no data file", "give --data FILE")
        evaluate = cli("evaluate", target, "--iwae-k", 5, "--json", "--data", "ten.npy", cwd=d)
    assert evaluate.returncode == 0, evaluate.stderr
    result = json.loads(evaluate.stdout)
    assert math.isfinite(result["nll"]) and result["n_test"] == (180 if kind == "digits" else 100)
    assert sample.returncode == 0, sample.stderr
    if kind == "digits":
        assert read_png(d / "samples.png").shape[:2] == image_grid(np.zeros((4, 64)), ncols=4, shape=(8, 8)).shape
        assert cli("sample", target, "--n", 4, "--out", "s.npy", cwd=d).returncode == 0
        assert np.load(d / "s.npy").shape == (4, 64)
    else:
        assert np.load(d / "samples.npy").shape == (4, 10)
        one_line_error(cli("sample", target, "--out", "s.png", cwd=d), "10-d data that are not images",
                       "--out samples.npy")  # fmt: skip


def test_resuming_on_other_data_and_a_model_of_another_size_are_one_line(runs):
    d, _ = runs
    np.save(d / "other.npy", continuous(1000, seed=5))
    one_line_error(cli("train", "--data", "other.npy", "--likelihood", "gaussian", "--hidden", 32, "--epochs", 4,
                       "--latent", 2, "--out", "ten", "--resume", cwd=d), "trained on other data")  # fmt: skip
    one_line_error(cli("evaluate", "lib.npz", "--data", "digits.npz", cwd=d),
                   "has 64 features per example, but the model in lib.npz takes 10")  # fmt: skip
    one_line_error(cli("train", "--data", "ten.npy", "--out", "b", cwd=d), "the bernoulli likelihood needs values in [0, 1]",
                   "--likelihood gaussian")  # fmt: skip
    one_line_error(cli("train", "--data", "ten.npy", "--data-dir", d, "--out", "b", cwd=d), "give one of them, not both")
    one_line_error(cli("train", "--validation", 0.2, "--out", "b", cwd=d), "MNIST has a test set of its own")
    assert not (d / "b").exists()


def test_a_run_on_a_data_file_goes_to_a_folder_named_after_it(runs):
    d, _ = runs
    proc = cli("train", "--data", "ten.npy", "--likelihood", "gaussian", "--hidden", 8, "--epochs", 1, cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert "out runs/ten" in proc.stdout and (d / "runs" / "ten" / "checkpoint.npz").exists()


def test_old_metric_names_are_read_as_the_new_ones():
    assert T.renamed_test_keys({"epoch": 1, "recon": 2.0, "kl": 3.0}) == {"epoch": 1, "test_recon": 2.0, "test_kl": 3.0}
    assert T.renamed_test_keys({"test_recon": 1.0, "recon": 9.0}) == {"test_recon": 1.0, "recon": 9.0}


# ------------------------------------------------------------------------------------------
# Found by a review: each once went wrong without a word.
# ------------------------------------------------------------------------------------------


def test_a_784_feature_model_of_other_data_is_never_evaluated_on_mnist(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    sv.VAEEstimator(hidden=(8,), latent_dim=2, epochs=1, out=tmp_path / "f784").fit(images)
    one_line_error(cli("evaluate", tmp_path / "f784", "--iwae-k", 2, cwd=tmp_path),
                   "names no data file to evaluate it on (it was trained on array)", "give --data FILE")  # fmt: skip
    np.save(tmp_path / "imgs.npy", images)
    one_line_error(cli("evaluate", tmp_path / "f784", "--data", "imgs.npy", "--data-dir", tmp_path, cwd=tmp_path),
                   "give one of them, not both")  # fmt: skip


def test_the_printed_evaluate_command_works_for_a_small_data_set(runs):
    d, out = runs
    _, stdout = out["ten"]
    (line,) = [x for x in stdout.splitlines() if x.startswith("evaluate with: ")]
    assert "--n-test" not in line  # 2000 would be more than the 100 test rows


def test_floats_beyond_0_1_are_refused_by_a_bernoulli_model_fitted_to_grey_levels():
    images = np.random.default_rng(0).integers(0, 256, (100, 8, 8), dtype=np.uint8)
    vae = sv.VAEEstimator(hidden=(8,), latent_dim=2, epochs=1).fit(images)
    np.testing.assert_array_equal(vae.transform(images), vae.transform(images / 255.0))  # the same inputs
    with pytest.raises(ValueError, match=r"X has values from 0 to 255, but .* takes values in \[0, 1\]"):
        vae.transform(images.astype(float))


def test_a_fresh_seed_run_resumes_with_its_own_seed_and_hidden_may_be_one_int(tmp_path):
    x = continuous(200)
    kw = dict(hidden=16, latent_dim=2, likelihood="gaussian", seed=None, out=tmp_path / "r")
    first = sv.VAEEstimator(epochs=1, **kw).fit(x)
    again = sv.VAEEstimator(epochs=2, resume=True, **kw).fit(x)
    assert again.seed_ == first.seed_ and [r["epoch"] for r in again.history_] == [1, 2]
    assert len(sv.VAEEstimator(hidden=8, latent_dim=2, likelihood="gaussian", epochs=1).fit(x, validation=0.25)
               .history_) == 1  # fmt: skip


def test_a_negative_image_shape_is_refused_before_training():
    with pytest.raises(DataError, match=r"image shape \(-2, -2\) does not fit 4"):
        datasets.from_arrays(np.zeros((10, 4)), image_shape=(-2, -2))


def test_resume_without_a_checkpoint_keeps_the_metrics_of_the_run(tmp_path):
    out = tmp_path / "r"
    kw = dict(hidden=(8,), latent_dim=2, likelihood="gaussian", epochs=1, out=out)
    sv.VAEEstimator(**kw).fit(continuous(100))
    (out / "checkpoint.npz").unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(T.RunFolderUsed, match="but no checkpoint.npz to resume from"):
        sv.VAEEstimator(resume=True, **kw).fit(continuous(100))
    assert (out / "metrics.jsonl").read_bytes() == metrics


def test_a_signal_before_the_first_step_saves_what_the_message_says(tmp_path):
    run = T.Run(T.TrainConfig(train_size=64, test_size=16, hidden=(8,), latent_dim=2, out=str(tmp_path / "r")),
                log=lambda *_: None)  # fmt: skip
    run.out.mkdir()
    with pytest.raises(T.Interrupted) as info:
        run._train([2])  # SIGINT arrived before the first step
    assert (info.value.epoch, info.value.step) == (1, 0)
    assert load_checkpoint(info.value.checkpoint).meta["step"] == 0


def test_sample_into_a_missing_folder_is_one_line(runs):
    d, _ = runs
    one_line_error(cli("sample", "ten", "--out", d / "nowhere" / "s.npy", cwd=d), "nowhere does not exist")
    assert not (d / "nowhere").exists()


def test_evaluate_refuses_a_data_file_that_changed_since_training(runs, tmp_path):
    d, _ = runs
    run = tmp_path / "changed"
    np.save(tmp_path / "d.npy", continuous(300))
    assert cli("train", "--data", "d.npy", "--likelihood", "gaussian", "--hidden", 8, "--epochs", 1, "--out", run,
               cwd=tmp_path).returncode == 0  # fmt: skip
    assert cli("evaluate", run, "--iwae-k", 2, cwd=tmp_path).returncode == 0
    np.save(tmp_path / "d.npy", continuous(300, seed=9))  # regenerated: other rows, so another split
    one_line_error(cli("evaluate", run, "--iwae-k", 2, cwd=tmp_path), "is not the data", "trained on")


def test_a_saved_estimator_keeps_how_it_was_trained(tmp_path):
    x = continuous(400)
    np.save(tmp_path / "x.npy", x)
    vae = sv.VAEEstimator(hidden=(8,), latent_dim=2, likelihood="gaussian", epochs=2, lr=2e-3, seed=7,
                          validation=0.3).fit(x)  # fmt: skip
    vae.save(tmp_path / "e.npz")
    again = sv.load(tmp_path / "e.npz")
    assert (again.epochs, again.lr, again.validation, again.seed) == (2, 2e-3, 0.3, 7)
    proc = cli("evaluate", "e.npz", "--data", "x.npy", "--iwae-k", 2, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_test"] == 120  # the 30% held out with seed 7, as in fit
    assert len(sv.VAEEstimator(hidden=(8,), latent_dim=2, likelihood="gaussian", epochs=1,
                               validation=np.float32(0.2)).fit(x).history_) == 1  # fmt: skip


def test_an_npz_with_only_a_test_array_is_refused(tmp_path):
    np.savez(tmp_path / "t.npz", test=continuous(20))
    with pytest.raises(DataError, match="expected arrays named train and test"):
        datasets.load_file(tmp_path / "t.npz")
