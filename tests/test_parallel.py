"""The training step split over threads (scratchvae.parallel) and the pieces it stands on.

The split step must give the serial step's numbers: the same loss, gradient
and update up to the order in which rows are summed. Checked in float64,
where that order changes only the last bits, for every likelihood, both
objectives, uneven splits and more threads than CPUs.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchvae as sv
from scratchvae import backend as B
from scratchvae import losses as L
from scratchvae.layers import ReLU
from scratchvae.model import LIKELIHOODS
from scratchvae.parallel import MIN_ROWS, ParallelStep, default_threads, step_threads


def pair(likelihood="bernoulli", dtype="float64", opt=sv.Adam, **kw):
    """Two identical (model, optimiser) pairs."""
    out = []
    for _ in range(2):
        m = sv.VAE(12, (10, 6), 3, likelihood, "tanh", dtype=dtype, seed=3, **kw)
        out.append((m, opt(m, lr=1e-2)))
    return out


def batch(n, seed=1, dim=12, dtype=np.float64):
    return np.random.default_rng(seed).random((n, dim)).astype(dtype)


def assert_close(a, b, what):
    scale = max(np.abs(b).max(), 1e-300)
    assert np.abs(a - b).max() <= 1e-12 * scale, (what, np.abs(a - b).max(), scale)


# --------------------------------------------------------------------------------------
# The split step is the serial step.
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    threads=st.integers(2, 5),
    likelihood=st.sampled_from(LIKELIHOODS),
    objective=st.sampled_from(["elbo", "iwae"]),
    beta=st.floats(0.0, 3.0),
)
def test_split_step_equals_the_serial_step(rows, threads, likelihood, objective, beta):
    (m1, o1), (m2, o2) = pair(likelihood)
    k = 3 if objective == "iwae" else 1
    serial = ParallelStep(m1, o1, threads=1, objective=objective, k=k)
    with ParallelStep(m2, o2, threads=threads, objective=objective, k=k, min_rows=1) as split:
        assert split.n_parts(rows) == min(threads, rows)
        for step in range(3):  # the moments and parameters keep agreeing over several updates
            x = batch(rows, seed=step)
            b = beta if objective == "elbo" else 1.0
            l1, l2 = serial(x, b), split(x, b)
            for a, c, what in zip(l2, l1, ("loss", "recon", "kl")):
                assert abs(float(a) - float(c)) <= 1e-12 * max(abs(float(c)), 1.0), (what, step)
            assert_close(m2.grads, m1.grads, ("grads", step))
            assert_close(o2.m, o1.m, ("m", step))
            assert_close(m2.params, m1.params, ("params", step))
    assert o1.t == o2.t == 3


def test_split_step_with_sgd_and_float32_matches_the_serial_step():
    (m1, o1), (m2, o2) = pair(dtype="float32", opt=sv.SGD)
    x = batch(64, dtype=np.float32)
    with ParallelStep(m1, o1, threads=1) as serial, ParallelStep(m2, o2, threads=2) as split:
        assert split.n_parts(64) == 2
        for _ in range(3):
            serial(x)
            split(x)
    np.testing.assert_allclose(m2.params, m1.params, rtol=0, atol=1e-6)


def test_split_step_is_reproducible_bit_for_bit():
    (m1, o1), (m2, o2) = pair()
    for m, o in ((m1, o1), (m2, o2)):
        with ParallelStep(m, o, threads=3, min_rows=4) as step:
            for i in range(4):
                step(batch(30, seed=i))
    np.testing.assert_array_equal(m1.params, m2.params)
    np.testing.assert_array_equal(o1.v, o2.v)


def test_the_gradient_of_the_split_step_passes_gradcheck():
    """The summed gradient of the replicas is the derivative of the summed loss (central differences)."""
    (m, o), _ = pair()
    x, eps = batch(9), np.random.default_rng(5).standard_normal((9, 3))
    step = ParallelStep(m, o, threads=3, min_rows=1)

    def loss_and_grad(params):
        m.params[...] = params
        m.rng = FixedNoise(eps)
        o.lr = 1e-300  # the update must not move the point being checked
        loss = float(step(x, 0.7).loss)
        m.params[...] = params
        return loss, m.grads.copy()

    p0 = m.params.copy()
    with step:
        _, g = loss_and_grad(p0)
        rng = np.random.default_rng(0)
        for _ in range(5):
            d = rng.standard_normal(p0.size)
            h = 1e-6
            fd = (loss_and_grad(p0 + h * d)[0] - loss_and_grad(p0 - h * d)[0]) / (2 * h)
            assert fd == pytest.approx(g @ d, rel=1e-6, abs=1e-9)


class FixedNoise:
    """A stand-in generator that always returns the same noise (for finite differences)."""

    def __init__(self, eps):
        self.eps = eps

    def normal(self, shape, dtype):
        assert shape == self.eps.shape
        return self.eps.astype(dtype)


# --------------------------------------------------------------------------------------
# How batches are split, and what the step promises around it.
# --------------------------------------------------------------------------------------


def test_parts_follow_rows_threads_and_samples():
    (m, o), _ = pair()
    step = ParallelStep(m, o, threads=4)
    assert [step.n_parts(b) for b in (1, MIN_ROWS - 1, MIN_ROWS, 2 * MIN_ROWS, 10 * MIN_ROWS)] == [1, 1, 1, 2, 4]
    iwae = ParallelStep(m, o, threads=4, objective="iwae", k=8)
    assert iwae.n_parts(MIN_ROWS // 4) == 2  # K samples per example: K times the decoder rows
    assert ParallelStep(m, o, threads=4, objective="iwae", k=4 * MIN_ROWS).n_parts(3) == 3  # at most one per example
    assert ParallelStep(m, o, threads=1).n_parts(10_000) == 1


def test_one_part_is_the_serial_step_exactly():
    (m1, o1), (m2, o2) = pair()
    x = batch(5)
    m1.loss_and_grad(x)
    o1.step()
    ParallelStep(m2, o2, threads=4)(x)  # 5 rows: one part
    np.testing.assert_array_equal(m2.params, m1.params)


def test_inputs_and_arguments_are_checked():
    (m, o), (m2, _) = pair()
    with ParallelStep(m, o, threads=2, min_rows=1) as step:
        with pytest.raises(ValueError, match="NaN or inf"):
            step(np.full((4, 12), np.nan))
        with pytest.raises(ValueError, match="shape"):
            step(batch(4, dim=11))
        with pytest.raises(ValueError, match="beta"):
            step(batch(4), beta=-1)
    assert o.t == 0  # nothing was updated
    for kw, fragment in [
        (dict(threads=0), "threads must be a positive int"),
        (dict(threads=True), "threads must be a positive int"),
        (dict(threads=2.0), "threads must be a positive int"),
        (dict(min_rows=0), "min_rows"),
        (dict(objective="vae"), "unknown objective"),
        (dict(k=2), "needs objective 'iwae'"),
        (dict(objective="iwae", k=0), "k must be"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            ParallelStep(m, o, **kw)
    with pytest.raises(ValueError, match="optimizer must be built on model"):
        ParallelStep(m2, o)


def test_a_failing_thread_raises_its_error_and_the_step_can_go_on(monkeypatch):
    (m1, o1), (m2, o2) = pair()
    x = batch(8)
    ParallelStep(m1, o1, threads=1)(x)  # the serial run to compare the recovered one with
    with ParallelStep(m2, o2, threads=2, min_rows=1) as step:
        assert step.replicas == [m2]  # replicas are made when a batch first needs them
        step(x)
        assert len(step.replicas) == 2
        before = m2.params.copy()
        replica = step.replicas[1]
        original = replica._loss_and_grad

        def broken(*args, **kw):
            raise RuntimeError("replica failed")

        monkeypatch.setattr(replica, "_loss_and_grad", broken)
        with pytest.raises(RuntimeError, match="replica failed"):  # not the broken barrier it leaves behind
            step(x)
        np.testing.assert_array_equal(m2.params, before)
        assert o2.t == 1
        monkeypatch.setattr(replica, "_loss_and_grad", original)
        m2.rng = m1.rng = FixedNoise(np.random.default_rng(0).standard_normal((8, 3)))
        step(x)  # the barrier was reset: the next step runs
    ParallelStep(m1, o1, threads=1)(x)
    assert_close(m2.params, m1.params, "params after recovery")


@pytest.mark.parametrize("where", ["calling thread", "helper after the barrier"])
def test_failures_elsewhere_in_the_step_surface_without_hanging(where, monkeypatch):
    (m, o), _ = pair()
    x = batch(8)
    with ParallelStep(m, o, threads=2, min_rows=1) as step:
        step(x)
        if where == "calling thread":
            monkeypatch.setattr(m, "_loss_and_grad", lambda *a, **k: 1 / 0)
        else:
            update = o.update
            monkeypatch.setattr(o, "update", lambda part: 1 / 0 if part.start else update(part))
        with pytest.raises(ZeroDivisionError):
            step(x)
        assert all(h.finished == h.handed for h in step._helpers)  # nothing still running
        monkeypatch.undo()
        out = step(x)  # and the step goes on
    assert np.isfinite(float(out.loss))


def test_an_interrupted_wait_still_lets_the_helpers_finish(monkeypatch):
    """Ctrl-C while the caller waits for a helper: the step waits on, then raises; later steps are exact."""
    from scratchvae.parallel import _Helper

    (m1, o1), (m2, o2) = pair()
    x = batch(8)
    real_wait, calls = _Helper.wait, []

    def interrupted_once(self):
        calls.append(self)
        if len(calls) == 2:  # the step's second wait: the one after the work was handed over
            raise KeyboardInterrupt
        return real_wait(self)

    noise = FixedNoise(np.random.default_rng(0).standard_normal((8, 3)))
    m1.rng = m2.rng = noise
    with ParallelStep(m2, o2, threads=2, min_rows=1) as step:
        step(x)
        update = o2.update

        def slowly(part):  # the helper is still updating its half when the interrupt comes
            if part.start:
                time.sleep(0.2)
            update(part)

        monkeypatch.setattr(o2, "update", slowly)
        monkeypatch.setattr(_Helper, "wait", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            step(x)
        assert all(h.finished == h.handed for h in step._helpers)  # the helper had finished its update
        monkeypatch.undo()
        step(x)
    serial = ParallelStep(m1, o1, threads=1)
    for _ in range(3):  # the interrupted step had completed: three updates in all
        serial(x)
    assert o2.t == o1.t == 3
    assert_close(m2.params, m1.params, "params")


def test_an_interrupt_while_handing_over_work_does_not_hang():
    """Ctrl-C between two hand-overs: the helper already started must not wait for the others forever."""
    from scratchvae.parallel import _Helper

    (m, o), _ = pair()
    x = batch(9)
    step = ParallelStep(m, o, threads=3, min_rows=1).open()
    step(x)
    second = step._helpers[1]

    def interrupted(task):
        raise KeyboardInterrupt

    second.run = interrupted
    outcome = []

    def call():
        try:
            step(x)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=20)
    assert not caller.is_alive(), "the step hangs"
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
    del second.run  # back to _Helper.run
    assert np.isfinite(float(step(x).loss))
    step.close()
    assert isinstance(second, _Helper)


def test_helpers_compute_under_the_callers_floating_point_error_state():
    """``np.errstate`` is per thread context: the helpers run in a copy of the caller's."""
    (m, o), _ = pair(likelihood="gaussian_learned")
    x = batch(8)
    x[4:] *= 1e200  # only the helper's rows overflow
    with ParallelStep(m, o, threads=2, min_rows=1) as step:
        assert step.n_parts(8) == 2
        with np.errstate(over="raise", invalid="raise"), pytest.raises(FloatingPointError):
            step(x)
        with np.errstate(all="ignore"):
            out = step(x)
    assert not np.isfinite(float(out.loss))


def helper_threads():
    return sum(t.name.startswith("scratchvae-step-") for t in threading.enumerate())


def test_open_close_start_and_stop_helpers_and_hold_blas_to_one_thread():
    (m, o), _ = pair()
    before_blas = B.blas_threads()
    step = ParallelStep(m, o, threads=3)
    assert helper_threads() == 0  # nothing runs until the step is opened
    with step:
        assert helper_threads() == 2
        if before_blas is not None:
            assert B.blas_threads() == 1
    assert helper_threads() == 0
    assert B.blas_threads() == before_blas
    step(batch(200))  # a call opens it
    assert helper_threads() == 2
    step.close()
    step.close()  # twice is harmless
    assert helper_threads() == 0 and B.blas_threads() == before_blas


def test_a_dropped_open_step_stops_its_threads_and_restores_blas():
    (m, o), _ = pair()
    before_blas = B.blas_threads()
    step = ParallelStep(m, o, threads=3).open()
    step(batch(200))
    assert helper_threads() == 2
    del step
    gc.collect()
    assert helper_threads() == 0 and B.blas_threads() == before_blas


def test_overlapping_open_steps_restore_blas_when_the_last_one_closes():
    (m1, o1), (m2, o2) = pair()
    before = B.blas_threads()
    a, b = ParallelStep(m1, o1, threads=2).open(), ParallelStep(m2, o2, threads=2).open()
    a.close()
    assert B.blas_threads() == (None if before is None else 1)  # b still runs
    b.close()
    assert B.blas_threads() == before


def test_default_threads():
    (m, o), _ = pair()
    expected = 1 if B.blas_threads() is None else min(B.cpu_count(), 8)
    assert default_threads(m) == expected == ParallelStep(m, o).threads == step_threads(m)


def test_on_the_gpu_the_step_uses_one_thread(backend):
    m = sv.VAE(12, (10,), 3, backend=backend, dtype="float32")
    step = ParallelStep(m, sv.Adam(m), threads=4)
    assert step.threads == step_threads(m, 4) == (4 if backend == "numpy" else 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_step_threads_rejects_what_the_step_rejects(bad):
    (m, o), _ = pair()
    with pytest.raises((TypeError, ValueError)) as step_err:
        ParallelStep(m, o, threads=bad)
    with pytest.raises(type(step_err.value), match="threads"):
        step_threads(m, bad)


# --------------------------------------------------------------------------------------
# The pieces: replicas, slice updates, the fused Bernoulli loss, ReLU's kept mask, BLAS threads.
# --------------------------------------------------------------------------------------


def test_a_replica_shares_the_parameters_and_has_its_own_gradients():
    for model in (sv.VAE(12, (10,), 3, seed=0), sv.Autoencoder(12, (10,), 3, seed=0)):
        r = model._replica()
        assert r.params is model.params and r.grads is not model.grads
        x = batch(4)
        model.loss_and_grad(x)
        expected = model.grads.copy()
        r.grads[...] = 0
        r._loss_and_grad(x, *(() if isinstance(model, sv.Autoencoder) else (model.rng.normal((4, 3), np.float64),)))
        np.testing.assert_array_equal(model.grads, expected)  # the replica wrote only its own buffer
        assert np.abs(r.grads).max() > 0
        r.encoder.dense[0].W[0, 0] = 123.0
        assert model.params[0] == 123.0


@pytest.mark.parametrize("make", [lambda m: sv.Adam(m, lr=1e-2, weight_decay=0.1), lambda m: sv.SGD(m, lr=1e-2)])
def test_optimiser_updates_of_slices_compose_to_the_whole_step(make):
    (m1, _), (m2, _) = pair()
    o1, o2 = make(m1), make(m2)
    g = np.random.default_rng(0).standard_normal(m1.params.size)
    n = m1.params.size
    for _ in range(3):
        m1.grads[...] = m2.grads[...] = g
        o1.step()
        o2.t += 1
        for part in (slice(0, n // 3), slice(n // 3, n - 5), slice(n - 5, n)):
            o2.update(part)
    np.testing.assert_array_equal(m2.params, m1.params)


def test_adam_update_needs_a_step_count():
    (m, o), _ = pair()
    with pytest.raises(ValueError, match="t >= 1"):
        o.update(slice(None))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_bernoulli_loss_and_gradient_are_the_reference_numbers(dtype):
    r = np.random.default_rng(0)
    logits = (r.standard_normal((7, 50)) * np.array([0.1, 3, 30, 300, 3e4, 1e6, 1e30])[:, None]).astype(dtype)
    x = r.random((7, 50)).astype(dtype)
    nll, grad = L.bernoulli_nll_and_grad(logits, x)
    np.testing.assert_array_equal(nll, L.bernoulli_nll(logits, x))
    np.testing.assert_array_equal(grad, L.bernoulli_nll_backward(logits, x, 1.0))
    out, tmp = np.empty_like(logits), np.empty_like(logits)
    nll2, grad2 = L.bernoulli_nll_and_grad(logits, x, out=out, tmp=tmp)
    assert grad2 is out
    np.testing.assert_array_equal(nll2, nll)
    np.testing.assert_array_equal(out, grad)


def test_relu_in_place_keeps_a_mask_buffer_and_gives_the_same_gradient():
    r = np.random.default_rng(0)
    h, d = r.standard_normal((6, 5)), r.standard_normal((6, 5))
    plain, inplace = ReLU(), ReLU()
    expected = plain.backward(d) if plain.forward(h) is not None else None
    inplace.forward(h.copy(), inplace=True)
    got = inplace.backward(d.copy(), inplace=True)
    np.testing.assert_array_equal(got, expected)
    mask = inplace._mask
    inplace.forward(h.copy(), inplace=True)
    inplace.backward(d.copy(), inplace=True)
    assert inplace._mask is mask  # kept across calls of the same shape
    inplace.forward(h[:3].copy(), inplace=True)
    np.testing.assert_array_equal(inplace.backward(d[:3].copy(), inplace=True), expected[:3])


def test_blas_thread_limit_is_applied_and_restored(monkeypatch):
    before = B.blas_threads()
    with B.limit_blas_threads(1) as applied:
        assert applied == (before is not None)
        assert B.blas_threads() == (None if before is None else 1)
    assert B.blas_threads() == before
    with B.limit_blas_threads(10_000):
        assert B.blas_threads() == before  # a limit above the count changes nothing
    with pytest.raises(ValueError, match=">= 1"):
        with B.limit_blas_threads(0):
            pass
    monkeypatch.setattr(B, "_blas_thread_functions", lambda: None)  # a BLAS that cannot be controlled
    assert B.blas_threads() is None
    with B.limit_blas_threads(1) as applied:
        assert applied is False


def test_numpy_wheels_blas_thread_count_is_found():
    """NumPy's wheels on Linux bundle OpenBLAS: its thread count must be readable there."""
    if not B._loaded_libraries():
        pytest.skip("no /proc/self/maps: loaded libraries cannot be listed on this system")
    try:
        cfg = np.show_config(mode="dicts")
    except TypeError:  # NumPy before 1.25 prints its configuration only
        pytest.skip("this NumPy cannot report its BLAS as data")
    blas = (cfg.get("Build Dependencies", {}).get("blas", {}) or {}).get("name", "")
    if "openblas" not in blas.lower():
        pytest.skip(f"numpy is built against {blas or 'an unknown BLAS'}, not OpenBLAS")
    assert B.blas_threads() is not None and B.blas_threads() >= 1


# --------------------------------------------------------------------------------------
# The trainer and the command line.
# --------------------------------------------------------------------------------------


def trainer_config(out, **kw):
    """A small run of the trainer in ``out``: one epoch of 256 images."""
    from scratchvae.train import TrainConfig

    base = dict(epochs=1, train_size=256, test_size=64, hidden=(32,), latent=4, out=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def test_the_trainer_splits_its_steps_and_agrees_with_one_thread(tmp_path):
    from scratchvae.train import Run

    runs, blas = {}, B.blas_threads()
    for t in (1, 2):
        cfg = trainer_config(tmp_path / f"t{t}", batch_size=64, dtype="float64", threads=t)
        runs[t] = Run(cfg, log=lambda *_: None)
        runs[t].run()
    assert runs[1].step_fn.n_parts(64) == 1 and runs[2].step_fn.n_parts(64) == 2
    assert runs[2].opt.t == runs[1].opt.t == 4
    np.testing.assert_allclose(runs[2].model.params, runs[1].model.params, rtol=0, atol=1e-9)
    assert runs[2].history[0]["test_loss"] == pytest.approx(runs[1].history[0]["test_loss"], rel=1e-9)
    assert B.blas_threads() == blas  # restored when the epoch ended


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(tmp_path):
    from scratchvae.train import Run

    def config(**kw):
        return trainer_config(tmp_path / "run", batch_size=128, **kw)

    Run(config(threads=3), log=lambda *_: None).run()
    logs = []
    resumed = Run(config(epochs=2, resume=True), log=logs.append)
    resumed.run()
    assert resumed.step_fn.threads == 3 and any("steps on 3 threads" in line for line in logs)
    again = Run(config(epochs=3, resume=True, threads=1), log=lambda *_: None)  # an explicit count wins
    again.run()
    assert again.step_fn.threads == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_trainer_refuses_a_bad_thread_count(bad, tmp_path):
    from scratchvae.train import TrainConfig

    with pytest.raises(ValueError, match="threads must be a positive integer"):
        TrainConfig(out=str(tmp_path), threads=bad).validate()


def test_command_line_threads_flag():
    from scratchvae.cli import UsageError, build_parser

    assert build_parser().parse_args(["train", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["train"]).threads is None
    with pytest.raises(UsageError, match="threads"):
        build_parser().parse_args(["train", "--threads", "0"])
