"""The trainer, checkpoints and evaluation on a small slice of real MNIST."""

import json
import warnings

import numpy as np
import pytest

from scratchvae.checkpoint import CheckpointError, load_checkpoint, restore_model, save_checkpoint
from scratchvae.model import VAE
from scratchvae import evaluate as E
from scratchvae.evaluate import evaluate_elbo, evaluate_nll
from scratchvae.train import CHECKPOINT, METRICS, Run, TrainConfig, train


def small_config(tmp_path, **kw):
    base = dict(epochs=2, batch_size=64, train_size=512, test_size=128, hidden=(32,), latent_dim=4,
                out=str(tmp_path / "run"))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def quiet(*_):
    pass


def test_short_run_writes_metrics_checkpoint_and_pictures(tmp_path):
    cfg = small_config(tmp_path, epochs=3)
    history = train(cfg, log=quiet)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("epoch", "train_loss", "test_loss", "test_recon", "test_kl", "seconds", "examples_per_s"):
        assert all(key in r for r in rows), key
    assert rows == history
    # the loss falls over three epochs on real digits, and the parts add up
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 20
    for r in rows:
        assert r["test_loss"] == pytest.approx(r["test_recon"] + r["test_kl"], rel=1e-9)
        assert r["test_kl"] > 0
    for name in ("checkpoint.npz", "samples.png", "reconstructions.png", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "manifold.png").exists()  # only for a 2-d latent space


def test_two_dimensional_latent_adds_manifold_and_latent_pictures(tmp_path):
    train(small_config(tmp_path, epochs=1, latent_dim=2), log=quiet)
    out = tmp_path / "run"
    assert (out / "manifold.png").stat().st_size > 0
    assert (out / "latent.png").stat().st_size > 0


def test_checkpoint_restores_a_model_that_evaluates_identically(tmp_path):
    cfg = small_config(tmp_path, epochs=1)
    run = Run(cfg, log=quiet)
    run.run()
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    model = restore_model(ckpt)
    np.testing.assert_array_equal(model.params, run.model.params)
    a = evaluate_elbo(run.model, run.test_x, "none", seed=3)
    b = evaluate_elbo(model, run.test_x, "none", seed=3)
    assert a == b
    assert ckpt.meta["epoch"] == 2 and ckpt.meta["step"] == 0
    assert ckpt.meta["train"]["hidden"] == [32]
    assert ckpt.meta["model"]["latent_dim"] == 4
    assert ckpt.meta["version"] == 3
    for key in ("opt_m", "opt_v"):
        assert ckpt.arrays[key].shape == model.params.shape


def test_evaluations_draw_noise_and_binarization_from_streams_of_their_own(monkeypatch):
    """On NumPy two generators of one seed and stream give the same bits: noise drawn from the
    binarization's stream would depend on the binarized images. Both evaluations binarize alike."""
    made = []

    class Recording(E.Generator):
        def __init__(self, seed, xp=np, stream=0):
            super().__init__(seed, xp, stream)
            made.append(stream)

    monkeypatch.setattr(E, "Generator", Recording)
    model = VAE(784, (16,), 3, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (20, 784), dtype=np.uint8)
    streams = {}
    for name, evaluate in [("elbo", lambda: evaluate_elbo(model, images, "dynamic", seed=1, batch_size=8)),
                           ("nll", lambda: evaluate_nll(model, images, "dynamic", seed=1, k=3, batch_size=8))]:  # fmt: skip
        made.clear()
        evaluate()
        streams[name] = data, noise = tuple(made)  # the data generator is made first
        assert data != noise, name
    assert streams["elbo"][0] == streams["nll"][0]  # the same binarized test set
    assert len({streams["elbo"][1], streams["nll"][1], streams["elbo"][0]}) == 3


def test_resume_continues_to_identical_parameters(tmp_path):
    straight = Run(small_config(tmp_path, epochs=3, out=str(tmp_path / "a")), log=quiet)
    straight.run()
    first = Run(small_config(tmp_path, epochs=1, out=str(tmp_path / "b")), log=quiet)
    first.run()
    second = Run(small_config(tmp_path, epochs=3, out=str(tmp_path / "b"), resume=True), log=quiet)
    second.run()
    np.testing.assert_array_equal(second.model.params, straight.model.params)
    assert [r["train_loss"] for r in second.history] == [r["train_loss"] for r in straight.history]


@pytest.mark.parametrize("version", [1, 2])
def test_resume_from_a_checkpoint_of_an_earlier_format(tmp_path, version):
    """Formats 1 and 2 name the latent size "latent"; format 2 stores Adam's moments over (1 - beta) as
    opt_m_sum, opt_v_sum (format 1 as opt_m, opt_v). Both resume, equal to an uninterrupted run up to rounding."""
    straight = Run(small_config(tmp_path, epochs=2, out=str(tmp_path / "a")), log=quiet)
    straight.run()
    first = Run(small_config(tmp_path, epochs=1, out=str(tmp_path / "b")), log=quiet)
    first.run()
    path = first.out / CHECKPOINT
    ckpt = load_checkpoint(path)
    b1, b2 = first.opt.beta1, first.opt.beta2
    arrays = {k: v for k, v in ckpt.arrays.items() if not k.startswith("opt_")}
    if version == 2:
        arrays.update(opt_m_sum=ckpt.arrays["opt_m"] / (1 - b1), opt_v_sum=ckpt.arrays["opt_v"] / (1 - b2))
    else:
        arrays.update(opt_m=ckpt.arrays["opt_m"], opt_v=ckpt.arrays["opt_v"])
    train_cfg = {("latent" if k == "latent_dim" else k): v for k, v in ckpt.meta["train"].items()}
    meta = {**{k: v for k, v in ckpt.meta.items() if k != "format"}, "version": version, "train": train_cfg}
    save_checkpoint(path, ckpt.params, meta, arrays)
    assert load_checkpoint(path).meta["version"] == version
    second = Run(small_config(tmp_path, epochs=2, out=str(tmp_path / "b"), resume=True), log=quiet)
    second.run()
    np.testing.assert_allclose(second.model.params, straight.model.params, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(second.model.params, first.model.params)  # it did train on


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path):
    """Stop inside an epoch (as SIGINT does) and resume: the same parameters as an uninterrupted run."""
    straight = Run(small_config(tmp_path, epochs=2, binarize="dynamic", out=str(tmp_path / "a")), log=quiet)
    straight.run()
    cfg = small_config(tmp_path, epochs=2, binarize="dynamic", out=str(tmp_path / "b"))
    run = Run(cfg, log=quiet)
    run.cfg.out = cfg.out
    run.out.mkdir(parents=True)
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) == 3

    from scratchvae import train as T

    with pytest.raises(T._Interrupted):
        run.train_epoch(stop_after_three)
    ckpt = load_checkpoint(run.out / CHECKPOINT)
    assert (ckpt.meta["epoch"], ckpt.meta["step"]) == (1, 3)
    assert ckpt.arrays["perm"].shape == (512,)
    resumed = Run(small_config(tmp_path, epochs=2, binarize="dynamic", out=cfg.out, resume=True), log=quiet)
    resumed.run()
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)


def test_resume_with_a_different_configuration_is_refused(tmp_path):
    train(small_config(tmp_path, epochs=1), log=quiet)
    with pytest.raises(CheckpointError, match="hidden"):
        Run(small_config(tmp_path, epochs=2, hidden=(16,), resume=True), log=quiet).run()


def test_corrupt_and_truncated_checkpoints_give_one_clear_error(tmp_path):
    model = VAE(6, hidden=(3,), latent_dim=2, dtype="float64")
    path = save_checkpoint(tmp_path / "c.npz", model.params, {"model": model.config()})
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    other = VAE(6, hidden=(5,), latent_dim=2, dtype="float64")
    bad = save_checkpoint(tmp_path / "bad.npz", other.params, {"model": model.config()})
    with pytest.raises(CheckpointError, match="parameters"):
        restore_model(load_checkpoint(bad))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint intact and no temporary file behind."""
    model = VAE(6, hidden=(3,), latent_dim=2, dtype="float64")
    path = save_checkpoint(tmp_path / "c.npz", model.params, {"model": model.config(), "tag": "old"})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model.params * 2, {"model": model.config(), "tag": "new"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]
    assert load_checkpoint(path).meta["tag"] == "old"


def test_divergence_stops_with_epoch_and_step(tmp_path):
    from scratchvae.train import TrainingDiverged

    cfg = small_config(tmp_path, epochs=2, lr=1e6, likelihood="gaussian_learned")
    with pytest.raises(TrainingDiverged, match=r"epoch \d+, step \d+"):
        train(cfg, log=quiet)


@pytest.mark.parametrize(
    "field,value",
    [("epochs", 0), ("batch_size", -1), ("lr", 0.0), ("lr", float("nan")), ("binarize", "sometimes"),
     ("optimizer", "rmsprop"), ("train_size", 0), ("seed", -1)],
)  # fmt: skip
def test_impossible_configuration_values_are_refused(tmp_path, field, value):
    cfg = small_config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate()


@pytest.mark.parametrize("init", ["fan_in_uniform", "he", "glorot"])
def test_init_choice_reaches_the_model_and_its_checkpoint(tmp_path, init):
    run = Run(small_config(tmp_path, epochs=1, init=init), log=quiet)
    assert run.model.config()["init"] == init
    first = run.model.encoder.dense[0]
    bound = {"fan_in_uniform": 1 / np.sqrt(784), "glorot": np.sqrt(6 / (784 + 32))}.get(init)
    if bound is None:  # he: normal with std sqrt(2 / n_in)
        assert np.std(first.W) == pytest.approx(np.sqrt(2 / 784), rel=0.05)
    else:
        assert np.abs(first.W).max() <= bound and np.abs(first.W).max() > 0.95 * bound
    assert (np.abs(first.b).max() > 0) == (init == "fan_in_uniform")
    run.run()
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT).meta["model"]["init"] == init


def test_evaluate_elbo_is_the_mean_over_examples_of_the_models_own_loss_parts():
    """Recomputed by hand with the same two streams, over batches of 8, 8, 8 and a short one of 1."""
    from scratchvae.data import to_float_batch
    from scratchvae.rng import STREAM_EVAL_DATA, STREAM_EVAL_ELBO, Generator

    model = VAE(784, (16,), 3, dtype="float64", seed=0)
    images = np.random.default_rng(0).integers(0, 256, (25, 784), dtype=np.uint8)
    got = evaluate_elbo(model, images, "dynamic", seed=4, batch_size=8)
    rng_data, rng_eps = Generator(4, np, STREAM_EVAL_DATA), Generator(4, np, STREAM_EVAL_ELBO)
    recon, kl = [], []
    for start in range(0, 25, 8):
        x = to_float_batch(images[start : start + 8], "dynamic", rng_data, np.float64)
        r, k = model.loss_parts(x, rng_eps.normal((len(x), 3), np.float64))
        recon.append(r)
        kl.append(k)
    recon, kl = np.concatenate(recon), np.concatenate(kl)
    assert got == pytest.approx({"loss": (recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}, rel=1e-12)


def test_evaluate_nll_is_the_mean_and_standard_error_of_the_bound_and_reports_progress():
    from scratchvae.data import to_float_batch
    from scratchvae.evaluate import iwae_bound
    from scratchvae.rng import STREAM_EVAL_DATA, STREAM_EVAL_IWAE, Generator

    model = VAE(784, (16,), 3, dtype="float64", seed=0)
    images = np.random.default_rng(1).integers(0, 256, (7, 784), dtype=np.uint8)
    seen = []
    nll, se = evaluate_nll(model, images, "none", seed=2, k=4, batch_size=3, progress=lambda *a: seen.append(a))
    assert seen == [(3, 7), (6, 7), (7, 7)]
    rng_data, rng_eps = Generator(2, np, STREAM_EVAL_DATA), Generator(2, np, STREAM_EVAL_IWAE)
    bounds = np.concatenate([
        iwae_bound(model, to_float_batch(images[s : s + 3], "none", rng_data, np.float64), 4, rng=rng_eps)
        for s in range(0, 7, 3)
    ])  # fmt: skip
    assert nll == pytest.approx(-bounds.mean(), rel=1e-12)
    assert se == pytest.approx(bounds.std(ddof=1) / np.sqrt(7), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and says so without numpy's warning about zero degrees of freedom
        one, one_se = evaluate_nll(model, images[:1], "none", seed=2, k=4)
    assert np.isfinite(one) and np.isnan(one_se)  # one example has no spread to report
    two = evaluate_nll(model, images[:2], "none", seed=2, k=4)[1]
    assert np.isfinite(two) and two > 0


def test_the_evaluations_default_settings():
    """The numbers the documentation gives: K = 5000 in batches of 100 for the NLL, batches of 1000 for the ELBO."""
    import inspect

    from scratchvae.evaluate import iwae_bound

    defaults = {f.__name__: {k: p.default for k, p in inspect.signature(f).parameters.items()}
                for f in (iwae_bound, evaluate_elbo, evaluate_nll)}  # fmt: skip
    assert (defaults["iwae_bound"]["k"], defaults["iwae_bound"]["max_elements"]) == (5000, 1 << 23)
    assert defaults["evaluate_elbo"]["batch_size"] == 1000
    assert (defaults["evaluate_nll"]["k"], defaults["evaluate_nll"]["batch_size"]) == (5000, 100)
