r"""The IWAE objective and the KL weight with its warm-up: in the model, the trainer, the CLI and the benchmark.

* The IWAE gradient against float64 central differences along the whole flat
  parameter buffer, with the helpers and the floor rule of
  ``test_gradients.py`` (every likelihood, ReLU and tanh, K = 1..5).
* With K = 1 the objective is the single-sample ELBO estimate
  :math:`\log p(x|z) + \log p(z) - \log q(z|x)`: the value and the gradient
  equal it draw by draw (the gradient rebuilt here from the reconstruction
  gradient of ``VAE.loss_and_grad`` and a closed-form Monte Carlo KL
  gradient), and its mean over many draws equals the analytic-KL ELBO of
  ``VAE.loss_and_grad`` within standard errors.
* The loss is minus the evaluation bound :func:`~scratchvae.evaluate.iwae_bound`
  for the same noise.
* The trainer: the KL weight of every step (the warm-up ramp), its effect on
  the gradient, the IWAE step, metrics, checkpoints, exact resume; the
  command-line flags; the 784-200-200-50 tanh model; ``benchmarks/quality.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gradients import arrays, assume_regular, build_vae, check_model, perturb, vae_cases

from scratchvae import VAE
from scratchvae import losses as L
from scratchvae.backend import to_device, to_numpy
from scratchvae.rng import Generator
from scratchvae.checkpoint import CheckpointError, build_model, load_checkpoint
from scratchvae.cli import main
from scratchvae.evaluate import iwae_bound, log_weights
from scratchvae.model import LIKELIHOODS
from scratchvae.objectives import iwae_loss_and_grad
from scratchvae.evaluate import evaluate_elbo
from scratchvae.train import CHECKPOINT, METRICS, Run, TrainConfig

REPO = Path(__file__).resolve().parents[1]


class IWAEObjective:
    """The IWAE loss of ``model`` with ``k`` samples, shaped like a model for ``test_gradients``' helpers."""

    def __init__(self, model, k):
        self.model, self.k = model, k
        self.params, self.grads = model.params, model.grads
        self.encoder, self.decoder = model.encoder, model.decoder

    def loss_and_grad(self, x, eps):
        return iwae_loss_and_grad(self.model, x, self.k, eps)


def small_model(backend, likelihood="bernoulli", seed=4, dtype="float64"):
    model = perturb(VAE(6, (5,), 2, likelihood=likelihood, activation="tanh", backend=backend, dtype=dtype, seed=seed), seed)
    r = np.random.default_rng(seed)
    x = r.random((3, 6)) if likelihood == "bernoulli" else r.standard_normal((3, 6))
    return model, to_device(x, model.xp, model.dtype)


# --------------------------------------------------------------------------------------
# The IWAE loss and its gradient.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@settings(max_examples=12)
@given(data=st.data(), k=st.integers(1, 5))
def test_iwae_loss_gradient_wrt_all_parameters(backend, record_gradcheck, likelihood, activation, data, k):
    case = data.draw(vae_cases(likelihood))
    model, x, _ = build_vae(case, activation, backend)
    eps = to_device(data.draw(arrays((k, x.shape[0], model.latent_dim), -3, 3)), model.xp)
    objective = IWAEObjective(model, k)
    assume_regular(objective, x, eps)
    check_model(record_gradcheck, f"IWAE {likelihood}/{activation}", objective, x, eps, seed=case["perturb_seed"])


def mc_kl_gradient(model, x, eps):
    r"""Gradient of :math:`\frac1B\sum_b[\log q(z_b|x_b) - \log p(z_b)]`, derived in closed form.

    With :math:`z = \mu + \sigma\epsilon` and the noise fixed,
    :math:`\log q - \log p(z) = \tfrac12\sum_j(z_j^2 - \log\sigma_j^2 - \epsilon_j^2)`, so
    :math:`\partial/\partial\mu = z` and
    :math:`\partial/\partial\log\sigma^2 = \tfrac12(z\,\epsilon\,\sigma - 1)`.
    """
    xp, J, B, c = model.xp, model.latent_dim, x.shape[0], model.log_var_bound
    h = model.encoder.forward(x)
    mu, log_var = h[:, :J], L.bound_log_var(h[:, J:], c)
    sigma = xp.exp(0.5 * log_var)
    z = mu + sigma * eps
    d_log_var = 0.5 * (z * eps * sigma - 1.0) / B
    d_h = xp.concatenate([z / B, L.bound_log_var_backward(d_log_var, log_var, c)], axis=1)
    model.grads[...] = 0
    model.encoder.backward(d_h)
    return to_numpy(model.grads).copy()


@settings(max_examples=15)
@given(data=st.data(), likelihood=st.sampled_from(LIKELIHOODS), activation=st.sampled_from(["relu", "tanh"]))
def test_iwae_with_one_sample_is_the_single_sample_elbo_estimate(backend, data, likelihood, activation):
    case = data.draw(vae_cases(likelihood))
    model, x, eps = build_vae(case, activation, backend)  # eps (batch, J): one sample
    assume_regular(model, x, eps)
    out = iwae_loss_and_grad(model, x, 1, eps[None])
    loss, recon, kl = (float(v) for v in out)
    g_iwae = to_numpy(model.grads).copy()

    log_w = to_numpy(log_weights(model, x, eps[None]))[0]  # log p(x|z) + log p(z) - log q(z|x)
    assert loss == pytest.approx(-log_w.mean(), rel=1e-12, abs=1e-12)
    assert recon == pytest.approx(float(to_numpy(model.loss_parts(x, eps)[0]).mean()), rel=1e-12, abs=1e-12)
    assert loss == pytest.approx(recon + kl, rel=1e-12, abs=1e-12)

    model.loss_and_grad(x, eps, 0.0)  # the same z: the gradient of the reconstruction term alone
    g_recon = to_numpy(model.grads).copy()
    g_kl = mc_kl_gradient(model, x, eps)
    scale = np.linalg.norm(g_recon) + np.linalg.norm(g_kl)
    assert np.linalg.norm(g_iwae - (g_recon + g_kl)) <= 1e-12 * scale + 1e-300


def test_iwae_with_one_sample_equals_the_analytic_kl_elbo_in_expectation(backend):
    """Over many draws, one-sample IWAE minus ``VAE.loss_and_grad`` (the same noise) has mean 0, value and gradient.

    Per draw they differ by the Monte Carlo KL minus the analytic KL (the
    reconstruction terms, and so the decoder's gradients, are the same).
    """
    model, x = small_model(backend, seed=4)
    n, (B, J) = 1000, (x.shape[0], model.latent_dim)
    n_enc = sum(d.size for d in model.encoder.dense)
    noise = np.random.default_rng(5).standard_normal((n, B, J))
    d_loss, d_grad = np.empty(n), np.empty((n, model.n_params))
    for i in range(n):
        eps = to_device(noise[i], model.xp)
        a = float(iwae_loss_and_grad(model, x, 1, eps[None]).loss)
        g = to_numpy(model.grads).copy()
        d_loss[i] = a - float(model.loss_and_grad(x, eps).loss)
        d_grad[i] = g - to_numpy(model.grads)
    assert d_loss.std() > 0.05  # they differ draw by draw ...
    se = d_loss.std(ddof=1) / math.sqrt(n)
    assert abs(d_loss.mean()) <= 4.5 * se, (d_loss.mean(), se)  # ... and agree in expectation
    enc = d_grad[:, :n_enc]
    z = enc.mean(axis=0) / (enc.std(axis=0, ddof=1) / math.sqrt(n))
    assert np.abs(z).max() <= 4.5, z
    assert (enc.std(axis=0) > 0).all()
    np.testing.assert_allclose(d_grad[:, n_enc:], 0, atol=1e-12)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_iwae_loss_is_minus_the_evaluation_bound_for_the_same_noise(backend, likelihood, k):
    model, x = small_model(backend, likelihood, seed=k)
    B, J = x.shape[0], model.latent_dim
    bound = to_numpy(iwae_bound(model, x, k, rng=Generator(9, model.xp)))
    eps = Generator(9, model.xp).normal((k, B, J), model.dtype)  # the draw iwae_bound made
    loss, recon, kl = (float(v) for v in iwae_loss_and_grad(model, x, k, eps))
    assert loss == pytest.approx(-bound.mean(), rel=1e-12)
    # recon + kl are the weighted means of -log w: loss - (log K - H(w~)), the entropy of the normalised weights
    log_w = to_numpy(log_weights(model, x, eps))
    w = np.exp(log_w - log_w.max(axis=0))
    w /= w.sum(axis=0)
    entropy = -(w * np.log(w)).sum(axis=0).mean()
    assert recon + kl == pytest.approx(loss - (math.log(k) - entropy), rel=1e-12)
    assert recon + kl <= loss + 1e-12


@settings(max_examples=10)
@given(data=st.data(), likelihood=st.sampled_from(LIKELIHOODS), k=st.integers(1, 4))
def test_iwae_gradient_in_each_dtype_matches_float64_reference(backend, xp, dtype, dtype_rtol, data, likelihood, k):
    case = data.draw(vae_cases(likelihood))
    reference, x_ref, _ = build_vae(case, "tanh", "numpy")
    eps_ref = data.draw(arrays((k, x_ref.shape[0], reference.latent_dim), -3, 3))
    model = VAE(**case["config"], activation="tanh", backend=backend, dtype=dtype)
    model.params[...] = to_device(reference.params, xp, model.dtype)
    reference.params[...] = to_numpy(model.params)  # both hold the dtype-rounded values
    x, eps = (to_device(a, xp, model.dtype) for a in (case["x"], eps_ref))
    ref = iwae_loss_and_grad(reference, to_numpy(x).astype(np.float64), k, to_numpy(eps).astype(np.float64))
    out = iwae_loss_and_grad(model, x, k, eps)
    assert model.grads.dtype == np.dtype(dtype)
    g_ref, g = reference.grads, to_numpy(model.grads).astype(np.float64)
    assert np.linalg.norm(g - g_ref) <= dtype_rtol * max(np.linalg.norm(g_ref), 1e-300)
    scale = abs(float(ref.recon)) + abs(float(ref.kl)) + 1.0
    assert abs(float(out.loss) - float(ref.loss)) <= dtype_rtol * scale


def test_iwae_rejects_bad_k_and_noise_of_the_wrong_shape(backend):
    model, x = small_model(backend)
    for k in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            iwae_loss_and_grad(model, x, k)
    with pytest.raises(ValueError, match=r"eps must have shape \(3, 3, 2\)"):
        iwae_loss_and_grad(model, x, 3, np.zeros((3, 2)))
    out = iwae_loss_and_grad(model, x, np.int64(4))  # noise from the model's generator
    assert np.isfinite(float(out.loss))


# --------------------------------------------------------------------------------------
# The trainer: KL weight, warm-up, IWAE steps.
# --------------------------------------------------------------------------------------


def small_config(tmp_path, name="run", **kw):
    """256 images in batches of 64: 4 steps an epoch."""
    base = dict(epochs=2, batch_size=64, train_size=256, test_size=64, hidden=(32,), latent_dim=4,
                out=str(tmp_path / name))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def quiet(*_):
    pass


def spy_on_steps(run):
    """Record every training step's ``(params, x, eps, beta, loss, grads)`` of a run's engine."""
    model, engine, calls, drawn = run.model, run.engine, [], []
    step, normal = engine.step, model.rng.normal

    def recorded_normal(shape, dtype):  # the noise the engine draws for its step
        drawn.append(normal(shape, dtype))
        return drawn[-1]

    def recorded_step(xb, beta=1.0, **kw):
        params = to_numpy(model.params).copy()
        out = step(xb, beta, **kw)
        calls.append((params, to_numpy(xb).copy(), to_numpy(drawn[-1]).copy(), beta, float(out.loss), to_numpy(model.grads).copy()))
        return out

    model.rng.normal, engine.step = recorded_normal, recorded_step
    return calls


def test_kl_warmup_ramps_beta_per_step_and_the_gradient_follows(tmp_path):
    cfg = small_config(tmp_path, epochs=3, beta=0.5, kl_warmup=2, threads=1)  # 8 warm-up steps
    run = Run(cfg, log=quiet)
    calls = spy_on_steps(run)
    history = run.run()
    betas = [c[3] for c in calls]
    assert betas == [0.5 * min(1.0, t / 8) for t in range(12)]
    assert betas[0] == 0.0 and betas[7] < 0.5 and betas[8:] == [0.5] * 4
    # metrics: the KL weight of each epoch's last step; the train loss is the objective optimised
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert [r["beta"] for r in rows] == [0.5 * 3 / 8, 0.5 * 7 / 8, 0.5] and rows == history
    for e in range(3):
        assert rows[e]["train_loss"] == pytest.approx(np.mean([c[4] for c in calls[4 * e : 4 * e + 4]]), rel=1e-9)
        assert rows[e]["test_loss"] == pytest.approx(rows[e]["test_recon"] + rows[e]["test_kl"], rel=1e-9)  # test: the ELBO
    meta = load_checkpoint(tmp_path / "run" / CHECKPOINT).meta["train"]
    assert (meta["objective"], meta["k"], meta["beta"], meta["kl_warmup"]) == ("elbo", 1, 0.5, 2)
    # the gradient of step t is that of recon + beta_t * KL: the KL's share is absent at t = 0
    model = build_model(run.model.config())  # the run's model, without the recording step
    for t in (0, 5, 11):
        params, xb, eps, beta, _, grads = calls[t]
        model.params[...] = params
        model.loss_and_grad(xb, eps, 0.0)
        g_recon = to_numpy(model.grads).copy()
        model.loss_and_grad(xb, eps, 1.0)
        g_kl = to_numpy(model.grads) - g_recon
        assert np.linalg.norm(g_kl) > 1e-3 * np.linalg.norm(g_recon)
        err = np.linalg.norm(grads - (g_recon + beta * g_kl))
        assert err <= 1e-5 * (np.linalg.norm(g_recon) + np.linalg.norm(g_kl)), (t, err)


def test_beta_scales_the_kl_term_of_the_training_step(tmp_path):
    """A constant beta: every step gets it; beta = 0 trains on the reconstruction term alone."""
    for beta in (0.0, 2.5):
        run = Run(small_config(tmp_path, name=f"b{beta}", epochs=1, beta=beta, threads=1), log=quiet)
        calls = spy_on_steps(run)
        (row,) = run.run()
        assert [c[3] for c in calls] == [beta] * 4 and row["beta"] == beta
        assert row["train_loss"] == pytest.approx(row["train_recon"] + beta * row["train_kl"], rel=1e-6)


def test_iwae_objective_in_the_trainer(tmp_path):
    run = Run(small_config(tmp_path, epochs=1, objective="iwae", k=3, threads=1), log=quiet)
    seen, step = [], run.engine.step

    def recorded_step(xb, beta=1.0, **kw):
        out = step(xb, beta, **kw)
        seen.append((run.engine.k, xb.shape[0], float(out.loss)))
        return out

    run.engine.step = recorded_step
    (row,) = run.run()
    assert [s[:2] for s in seen] == [(3, 64)] * 4
    assert row["train_loss"] == pytest.approx(np.mean([s[2] for s in seen]), rel=1e-9)  # the objective optimised
    assert row["beta"] == 1.0
    test = evaluate_elbo(run.model, run.test_x, "none", 0)  # the test loss stays the ELBO
    assert row["test_loss"] == pytest.approx(test["loss"], rel=1e-12)
    meta = load_checkpoint(tmp_path / "run" / CHECKPOINT).meta["train"]
    assert (meta["objective"], meta["k"]) == ("iwae", 3)
    with pytest.raises(CheckpointError, match="k: checkpoint 3 vs now 5"):
        Run(small_config(tmp_path, epochs=2, objective="iwae", k=5, resume=True), log=quiet).run()


@pytest.mark.parametrize("objective", [dict(beta=0.5, kl_warmup=2), dict(objective="iwae", k=2)], ids=["warmup", "iwae"])
def test_resume_continues_the_objective_exactly(tmp_path, objective):
    straight = Run(small_config(tmp_path, name="a", epochs=2, **objective), log=quiet)
    straight.run()
    Run(small_config(tmp_path, name="b", epochs=1, **objective), log=quiet).run()
    resumed = Run(small_config(tmp_path, name="b", epochs=2, resume=True, **objective), log=quiet)
    resumed.run()
    np.testing.assert_array_equal(resumed.model.params, straight.model.params)
    assert resumed.history == [{**r, "seconds": s["seconds"], "examples_per_s": s["examples_per_s"]}
                               for r, s in zip(straight.history, resumed.history)]  # fmt: skip


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(objective="vae"), "unknown objective"),
        (dict(objective="iwae", k=0), "k must be a positive integer"),
        (dict(beta=-0.5), "beta must be a number >= 0"),
        (dict(beta=float("nan")), "beta must be a number >= 0"),
        (dict(kl_warmup=-1), "kl_warmup must be an integer >= 0"),
        (dict(kl_warmup=1.5), "kl_warmup must be an integer >= 0"),
        (dict(k=5), "needs --objective iwae"),
        (dict(objective="iwae", k=5, beta=0.5), "beta must be 1"),
        (dict(objective="iwae", kl_warmup=3), "kl_warmup 0"),
    ],
)
def test_impossible_objective_settings_are_refused(tmp_path, kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        small_config(tmp_path, **kw).validate()


@pytest.mark.parametrize("objective", [dict(), dict(objective="iwae", k=5)], ids=["elbo", "iwae"])
def test_784_200_200_50_tanh_model_trains(tmp_path, objective):
    """The IWAE paper's one-stochastic-layer architecture: two tanh layers of 200, a 50-d latent, Glorot init."""
    cfg = small_config(tmp_path, epochs=3, batch_size=20, train_size=100, test_size=20, hidden=(200, 200),
                       latent_dim=50, activation="tanh", init="glorot", binarize="dynamic", **objective)  # fmt: skip
    run = Run(cfg, log=quiet)
    assert [(d.n_in, d.n_out) for d in run.model.encoder.dense] == [(784, 200), (200, 200), (200, 100)]
    assert [(d.n_in, d.n_out) for d in run.model.decoder.dense] == [(50, 200), (200, 200), (200, 784)]
    history = run.run()
    losses = [r["train_loss"] for r in history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[0] - 50, losses  # 15 Adam steps from ~540 nats


# --------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------

SMALL = ["--train-size", "256", "--test-size", "64", "--hidden", "32", "--latent", "4", "--batch-size", "64",
         "--progress", "off"]  # fmt: skip


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "scratchvae", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_cli_objective_flags_reach_the_run(tmp_path):
    proc = cli("train", "--epochs", "1", *SMALL, "--objective", "iwae", "--k", "3", "--out", tmp_path / "i")
    assert proc.returncode == 0, proc.stderr
    assert "iwae k=3" in proc.stdout
    meta = load_checkpoint(tmp_path / "i" / CHECKPOINT).meta["train"]
    assert (meta["objective"], meta["k"], meta["beta"], meta["kl_warmup"]) == ("iwae", 3, 1.0, 0)

    proc = cli("train", "--epochs", "2", *SMALL, "--beta", "0.5", "--kl-warmup", "1", "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    meta = load_checkpoint(tmp_path / "w" / CHECKPOINT).meta["train"]
    assert (meta["objective"], meta["k"], meta["beta"], meta["kl_warmup"]) == ("elbo", 1, 0.5, 1)
    rows = [json.loads(line) for line in (tmp_path / "w" / METRICS).read_text().splitlines()]
    assert [r["beta"] for r in rows] == [0.5 * 3 / 4, 0.5]  # 4 steps an epoch: the ramp's last step, then beta


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--objective", "vae"], "--objective"),
        (["--k", "0"], "--k"),
        (["--beta", "-1"], "--beta"),
        (["--beta", "inf"], "--beta"),
        (["--kl-warmup", "-2"], "--kl-warmup"),
        (["--kl-warmup", "0.5"], "--kl-warmup"),
        (["--objective", "iwae", "--beta", "0.5"], "--beta"),
        (["--objective", "iwae", "--kl-warmup", "1"], "--kl-warmup"),
        (["--k", "5"], "--objective iwae"),
    ],
)
def test_cli_impossible_objective_flags_get_one_line_and_status_2(tmp_path, capsys, args, fragment):
    assert main(["train", *SMALL, *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scratchvae: error:") and fragment in err[0], err
    assert not (tmp_path / "r").exists()


def test_cli_help_explains_the_objective_flags():
    proc = cli("train", "--help")
    assert proc.returncode == 0
    for flag in ("--objective", "--k", "--beta", "--kl-warmup"):
        assert flag in proc.stdout, flag


# --------------------------------------------------------------------------------------
# benchmarks/quality.py: the schedule, and a resumed run continuing it exactly.
# --------------------------------------------------------------------------------------


def test_quality_schedule_is_burda_et_al():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import quality
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    stages = quality.schedule()
    assert [s[2] for s in stages] == [1, 4, 13, 40, 121, 364, 1093, 3280] and quality.TOTAL_PASSES == 3280
    assert [s[2] - s[1] + 1 for s in stages] == [3**i for i in range(8)]
    np.testing.assert_allclose([s[3] for s in stages], [1e-3 * 10 ** (-i / 7) for i in range(8)], rtol=1e-15)
    assert quality.stage_of(2)[0] == 1 and quality.stage_of(3280)[0] == 7
    assert quality.ADAM == dict(betas=(0.9, 0.999), eps=1e-4) and quality.BATCH_SIZE == 20


def test_quality_benchmark_resumes_the_schedule_exactly(tmp_path):
    def bench(out, passes, *extra):
        proc = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--objective", "iwae", "--k", "2",
             "--train-size", "60", "--n-test", "10", "--eval-k", "4", "--max-passes", str(passes),
             "--out", str(out), "--results-dir", str(out), "--progress", "off", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return proc

    straight = bench(tmp_path / "a", 2)
    assert straight.returncode == 0, straight.stderr
    assert "stage 0 done after 1 passes: test NLL" in straight.stdout and "paper 85.54" not in straight.stdout
    assert bench(tmp_path / "b", 1).returncode == 0
    resumed = bench(tmp_path / "b", 2)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in "ab")
    np.testing.assert_array_equal(a.params, b.params)
    assert (a.meta["train"]["objective"], a.meta["train"]["k"], a.meta["train"]["batch_size"]) == ("iwae", 2, 20)
    assert [r["lr"] for r in a.meta["history"]] == [1e-3, 1e-3 * 10 ** (-1 / 7)]
    rows = [json.loads(line) for line in (tmp_path / "b" / "quality-iwae-k2.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["passes"], r["eval_k"], r["n_test"]) for r in rows] == [(0, 1, 4, 10)]
    assert rows[0]["test_nll"] > 0 and rows[0]["wall_s"] > 0
    assert "| 0 | 1 |" in (tmp_path / "b" / "quality-iwae-k2.md").read_text()
    other = bench(tmp_path / "b", 3, "--seed", "1")  # a different configuration: one line, status 2
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "seed" in other.stderr
