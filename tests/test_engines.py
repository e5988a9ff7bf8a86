"""Every engine against the reference step, and the pieces of the cpu engine (fused arithmetic, threads, BLAS).

The reference step is the textbook: ``model.loss_and_grad(x)`` (or
``iwae_loss_and_grad``) and then ``optimizer.step()``, written out in
:func:`reference_step` below. Every engine must give its numbers: the same
losses, the same gradient and the same parameters after several steps, for
every likelihood, both objectives, the autoencoder, both optimisers, both
dtypes, one thread and several.

The tolerance, ``max |engine - reference| / max |reference|`` over each
array, is :data:`TOL`. The engines differ from the reference only in the
order of additions (the sums over rows, split over threads, are added
thread by thread) and in how a formula is grouped (Adam's bias corrections
folded into two scalars, ``m + (1 - b1)(g - m)`` for ``b1 m + (1 - b1) g``),
each a few units of rounding. Measured over five steps of the models below:
at most 1.9e-15 in float64 and 1.3e-6 in float32 (the gradient, whose
largest element is a sum over 100 rows); the tolerances leave a margin of
500 and 15 times, and a real error (a dropped term, a wrong sign) is of
order 1e-2 or more.
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
from scratchvae import losses as L
from scratchvae.engines import ENGINES, CPUEngine, ReferenceEngine, engine_name, make_engine
from scratchvae.engines import blas as B
from scratchvae.engines import fused
from scratchvae.engines.cpu import MIN_ROWS, Helper, default_threads
from scratchvae.layers import ACTIVATIONS, make_activation
from scratchvae.model import LIKELIHOODS
from scratchvae.objectives import iwae_loss_and_grad

TOL = {"float32": 2e-5, "float64": 1e-12}
KINDS = [*LIKELIHOODS, "autoencoder"]


def make_model(kind="bernoulli", activation="tanh", dtype="float64", seed=3, dim=20, **kw):
    if kind == "autoencoder":
        return sv.Autoencoder(dim, (16, 8), 3, activation, dtype=dtype, seed=seed, **kw)
    return sv.VAE(dim, (16, 8), 3, kind, activation, dtype=dtype, seed=seed, **kw)


def make_optimizer(name, model):
    return sv.Adam(model, lr=1e-2) if name == "adam" else sv.SGD(model, lr=1e-2)


def reference_step(model, opt, x, objective="elbo", k=1, beta=1.0):
    """The textbook step: loss and gradient, then the optimiser's update."""
    if isinstance(model, sv.Autoencoder):
        loss = model.loss_and_grad(x)
    elif objective == "iwae":
        loss = iwae_loss_and_grad(model, x, k)
    else:
        loss = model.loss_and_grad(x, beta=beta)
    opt.step()
    return loss


def batch(n, seed=1, dim=20, dtype=np.float64):
    return np.random.default_rng(seed).random((n, dim)).astype(dtype)


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def assert_close(a, b, tol, what):
    assert rel_diff(a, b) <= tol, (what, rel_diff(a, b), tol)


# --------------------------------------------------------------------------------------
# Every engine gives the reference step's numbers.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("engine", ["reference", "cpu"])
def test_engine_matches_the_reference_step(engine, dtype, kind, objective, optimizer, threads):
    if kind == "autoencoder" and objective == "iwae":
        pytest.skip("an autoencoder has no importance-weighted bound")
    if engine == "reference" and threads > 1:
        pytest.skip("the reference engine runs on one thread")
    k = 3 if objective == "iwae" else 1
    beta = 0.7 if objective == "elbo" and kind != "autoencoder" else 1.0
    m1, m2 = make_model(kind, dtype=dtype), make_model(kind, dtype=dtype)
    o1, o2 = make_optimizer(optimizer, m1), make_optimizer(optimizer, m2)
    runs = make_engine(engine, m2, o2, objective=objective, k=k, threads=threads if engine == "cpu" else None)
    with runs:
        if engine == "cpu":
            assert runs.n_parts(100) == threads  # 100 rows: three parts of at least MIN_ROWS
        for step in range(5):  # the moments and parameters keep agreeing over several updates
            x = batch(100, seed=step, dtype=dtype)
            expected = reference_step(m1, o1, x, objective, k, beta)
            got = runs.step(x, beta)
            for a, b, what in zip(got, expected, ("loss", "recon", "kl")):
                assert abs(float(a) - float(b)) <= TOL[dtype] * max(abs(float(expected.loss)), 1.0), (what, step)
            assert_close(m2.grads, m1.grads, TOL[dtype], ("grads", step))
            assert_close(m2.params, m1.params, TOL[dtype], ("params", step))
    assert o1.t == o2.t == 5
    for name in ("m", "v") if optimizer == "adam" else ("velocity",):
        assert_close(getattr(o2, name), getattr(o1, name), TOL[dtype], name)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    threads=st.integers(2, 5),
    likelihood=st.sampled_from(LIKELIHOODS),
    activation=st.sampled_from(sorted(set(ACTIVATIONS) - {"identity"})),
    objective=st.sampled_from(["elbo", "iwae"]),
    beta=st.floats(0.0, 3.0),
)
def test_any_split_of_any_batch_is_the_reference_step(rows, threads, likelihood, activation, objective, beta):
    """Uneven splits, one row per thread, more threads than rows: the cpu engine's numbers are the reference's."""
    k = 3 if objective == "iwae" else 1
    beta = beta if objective == "elbo" else 1.0
    m1, m2 = make_model(likelihood, activation, dim=12), make_model(likelihood, activation, dim=12)
    o1, o2 = sv.Adam(m1, lr=1e-2), sv.Adam(m2, lr=1e-2)
    with CPUEngine(m2, o2, objective=objective, k=k, threads=threads, min_rows=1) as engine:
        assert engine.n_parts(rows) == min(threads, rows)
        for step in range(3):
            x = batch(rows, seed=step, dim=12)
            expected, got = reference_step(m1, o1, x, objective, k, beta), engine.step(x, beta)
            assert abs(float(got.loss) - float(expected.loss)) <= 1e-12 * max(abs(float(expected.loss)), 1.0)
            assert_close(m2.grads, m1.grads, 1e-12, ("grads", step))
            assert_close(m2.params, m1.params, 1e-12, ("params", step))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_model_of_many_update_chunks_matches_the_reference_step(optimizer, threads):
    """The 784-400-20 VAE: on one thread its 652,824 parameters are updated in ten cache-sized chunks."""
    m1, m2 = (sv.VAE(784, (400,), 20, dtype="float64", seed=0) for _ in range(2))
    o1, o2 = make_optimizer(optimizer, m1), make_optimizer(optimizer, m2)
    assert len(fused.chunks(slice(0, m1.n_params))) == 10
    with CPUEngine(m2, o2, threads=threads) as engine:
        for step in range(2):
            x = batch(64, seed=step, dim=784)
            expected, got = reference_step(m1, o1, x), engine.step(x)
            assert abs(float(got.loss) - float(expected.loss)) <= 1e-12 * abs(float(expected.loss))
            assert_close(m2.params, m1.params, 1e-12, ("params", step))


def test_chunks_cut_a_slice_into_consecutive_pieces():
    assert fused.chunks(slice(0, 10), 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert fused.chunks(slice(3, 11), 4) == [slice(3, 7), slice(7, 11)]
    assert fused.chunks(slice(5, 5), 4) == []


class FixedNoise:
    """A stand-in generator that always returns the same noise (for finite differences)."""

    def __init__(self, eps):
        self.eps = eps

    def normal(self, shape, dtype):
        assert shape == self.eps.shape
        return self.eps.astype(dtype)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("engine", ["reference", "cpu"])
def test_the_gradient_an_engine_leaves_passes_gradcheck(engine, objective):
    """The gradient in ``model.grads`` after a step is the derivative of the step's loss (central differences)."""
    k = 2 if objective == "iwae" else 1
    m, x = make_model("gaussian_learned", dim=12), batch(9, dim=12)
    o = sv.SGD(m, lr=1e-300)  # the update must not move the point being checked
    m.rng = FixedNoise(np.random.default_rng(5).standard_normal((9, 3) if k == 1 else (k, 9, 3)))
    kw = dict(threads=3) if engine == "cpu" else {}
    runs = make_engine(engine, m, o, objective=objective, k=k, **kw)
    if engine == "cpu":
        runs.min_rows = 1
    beta = 0.7 if objective == "elbo" else 1.0

    def loss_and_grad(params):
        m.params[...] = params
        loss = float(runs.step(x, beta).loss)
        m.params[...] = params
        return loss, m.grads.copy()

    p0 = m.params.copy()
    with runs:
        _, g = loss_and_grad(p0)
        rng = np.random.default_rng(0)
        for _ in range(5):
            d = rng.standard_normal(p0.size)
            h = 1e-6
            fd = (loss_and_grad(p0 + h * d)[0] - loss_and_grad(p0 - h * d)[0]) / (2 * h)
            assert fd == pytest.approx(g @ d, rel=1e-6, abs=1e-9)


def test_the_split_step_is_reproducible_bit_for_bit():
    params = []
    for _ in range(2):
        m = make_model()
        o = sv.Adam(m, lr=1e-2)
        with CPUEngine(m, o, threads=3, min_rows=4) as engine:
            for i in range(4):
                engine.step(batch(30, seed=i))
        params.append(m.params)
    np.testing.assert_array_equal(params[0], params[1])


@pytest.mark.parametrize(
    ("rows", "wide"),
    [(2, {"decoder2", "decoder4", "encoder2"}), (5, set()), (64, set())],  # 4 rows per unit of both sizes
)
def test_column_major_input_gradients_where_layers_are_wide_and_rows_few(rows, wide):
    """``d_x`` is written column-major for a layer with at least 4 x rows inputs and outputs; the gradient is exact."""
    m1, m2 = make_model("bernoulli", "relu", seed=rows), make_model("bernoulli", "relu", seed=rows)
    o1, o2 = sv.SGD(m1, lr=1e-2), sv.SGD(m2, lr=1e-2)
    x = batch(rows)
    reference_step(m1, o1, x)
    engine = CPUEngine(m2, o2, threads=1)
    engine.step(x)
    assert_close(m2.grads, m1.grads, TOL["float64"], "grads")
    buffers = engine.lanes[0].ws.buffers  # encoder 20-16-8-6, decoder 3-8-16-20; the encoder's input needs no d_x
    orders = {f"{key[0]}{key[2]}": "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
              for key, a in buffers.items() if isinstance(key, tuple) and key[1] == "d_x"}  # fmt: skip
    assert sorted(orders) == ["decoder0", "decoder2", "decoder4", "encoder2", "encoder4"]
    assert {name for name, order in orders.items() if order == "F"} == wide


# --------------------------------------------------------------------------------------
# Choosing an engine, and what each refuses.
# --------------------------------------------------------------------------------------


def test_auto_is_the_cpu_engine_on_numpy():
    m = make_model()
    assert ENGINES == ("auto", "reference", "cpu", "gpu")  # gpu: CuPy only, never chosen by auto
    assert engine_name("auto", m) == "cpu"
    assert isinstance(make_engine("auto", m, sv.Adam(m)), CPUEngine)
    assert isinstance(make_engine("reference", m, sv.Adam(m)), ReferenceEngine)
    assert make_engine("reference", m, sv.Adam(m), threads=1).threads == 1


def test_on_the_gpu_auto_is_the_reference_engine_and_cpu_is_refused(backend):
    m = sv.VAE(12, (10,), 3, backend=backend, dtype="float32")
    assert engine_name("auto", m) == ("cpu" if backend == "numpy" else "reference")
    if backend != "numpy":
        with pytest.raises(ValueError, match="engine 'cpu' runs NumPy models"):
            make_engine("cpu", m, sv.Adam(m))


@pytest.mark.parametrize("engine", ["reference", "cpu"])
def test_engines_refuse_what_they_cannot_run(engine):
    m, m2, ae = make_model(), make_model(), make_model("autoencoder")
    o = sv.Adam(m)
    for kw, fragment in [
        (dict(objective="vae"), "unknown objective"),
        (dict(k=2), "needs objective 'iwae'"),
        (dict(objective="iwae", k=0), "k must be"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            make_engine(engine, m, o, **kw)
    with pytest.raises(ValueError, match="optimizer must be built on model"):
        make_engine(engine, m2, o)
    with pytest.raises(ValueError, match="autoencoder trains on its squared error"):
        make_engine(engine, ae, sv.Adam(ae), objective="iwae", k=2)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("tpu", m, o)
    runs = make_engine(engine, ae, sv.Adam(ae))
    with pytest.raises(ValueError, match="beta"):
        runs.step(batch(4), beta=0.5)
    runs = make_engine(engine, m, o)
    with pytest.raises(ValueError, match="NaN or inf"):
        runs.step(np.full((4, 20), np.nan))
    with pytest.raises(ValueError, match="shape"):
        runs.step(batch(4, dim=11))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        runs.step(batch(4) + 1)
    with pytest.raises(ValueError, match="beta"):
        runs.step(batch(4), beta=-1)
    assert o.t == 0  # nothing was updated


def test_cpu_engine_arguments_are_checked():
    m = make_model()
    o = sv.Adam(m)
    for kw, fragment in [
        (dict(threads=0), "threads must be a positive int"),
        (dict(threads=True), "threads must be a positive int"),
        (dict(threads=2.0), "threads must be a positive int"),
        (dict(min_rows=0), "min_rows"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            CPUEngine(m, o, **kw)
    with pytest.raises(ValueError, match="threads .* apply to engine 'cpu'"):
        make_engine("reference", m, o, threads=2)

    class Momentumless:
        params, grads = m.params, m.grads

    with pytest.raises(ValueError, match="Adam or SGD"):
        CPUEngine(m, Momentumless())
    m.encoder.layers[1] = type("Swish", (sv.layers.Activation,), {"name": "swish"})()
    with pytest.raises(ValueError, match="no in-place form of \\['swish'\\]"):
        CPUEngine(m, o)


def test_check_input_false_skips_the_checks_of_the_cpu_engine_only():
    m = make_model()
    x = batch(4)
    x[0, 0] = 2.0  # outside [0, 1]: refused when checked
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CPUEngine(m, sv.Adam(m)).step(x)
    assert np.isfinite(float(CPUEngine(m, sv.Adam(m)).step(x, check_input=False).loss))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # the reference's checks are part of loss_and_grad
        ReferenceEngine(m, sv.Adam(m)).step(x, check_input=False)


# --------------------------------------------------------------------------------------
# The cpu engine's fused arithmetic, piece by piece.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_bernoulli_loss_and_gradient_are_the_reference_numbers(dtype):
    r = np.random.default_rng(0)
    logits = (r.standard_normal((7, 50)) * np.array([0.1, 3, 30, 300, 3e4, 1e6, 1e30])[:, None]).astype(dtype)
    x = r.random((7, 50)).astype(dtype)
    out, tmp = np.empty_like(logits), np.empty_like(logits)
    nll, grad = fused.bernoulli_nll_and_grad(logits, x, out, tmp)
    assert grad is out
    np.testing.assert_array_equal(nll, L.bernoulli_nll(logits, x))
    np.testing.assert_array_equal(grad, L.bernoulli_nll_backward(1.0, logits, x))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_in_place_are_the_reference_numbers(name):
    r = np.random.default_rng(0)
    a, d_y = r.standard_normal((6, 5)) * 4, r.standard_normal((6, 5))
    act = make_activation(name)
    y_ref = act.forward(a.copy())
    d_a_ref = act.backward(d_y.copy())
    ws = fused.Workspace()
    y, saved = fused.activate(name, a.copy(), ws, ("t",))
    np.testing.assert_allclose(y, y_ref, rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(fused.differentiate(name, d_y.copy(), saved, ws, ("t",)), d_a_ref, rtol=1e-15, atol=1e-300)
    kept = dict(ws.buffers)
    y, saved = fused.activate(name, a.copy(), ws, ("t",))
    fused.differentiate(name, d_y.copy(), saved, ws, ("t",))
    assert all(ws.buffers[key] is buffer for key, buffer in kept.items())  # the same buffers, step after step


@pytest.mark.parametrize("make", [lambda m: sv.Adam(m, lr=1e-2, weight_decay=0.1), lambda m: sv.Adam(m, lr=1e-2),
                                  lambda m: sv.SGD(m, lr=1e-2, weight_decay=0.1), lambda m: sv.SGD(m, lr=1e-2)])  # fmt: skip
def test_the_fused_update_of_slices_is_the_reference_update(make):
    """Slices compose to the whole update bit for bit, and the whole update is the optimiser's step to rounding."""
    m1, m2, m3 = make_model(), make_model(), make_model()
    o1, o2, o3 = make(m1), make(m2), make(m3)
    update = fused.adam_update if isinstance(o1, sv.Adam) else fused.sgd_update
    g = np.random.default_rng(0).standard_normal(m1.params.size)
    n, tmp = m1.params.size, np.empty_like(m1.params)
    for _ in range(3):
        m1.grads[...] = m2.grads[...] = m3.grads[...] = g
        o1.step()
        o2.t += 1
        update(o2, slice(None), tmp)
        o3.t += 1
        for part in (slice(0, n // 3), slice(n // 3, n - 5), slice(n - 5, n)):
            update(o3, part, tmp)
    np.testing.assert_array_equal(m3.params, m2.params)
    assert_close(m2.params, m1.params, 1e-14, "params")


# --------------------------------------------------------------------------------------
# The cpu engine's threads: failures, interrupts, opening and closing, BLAS.
# --------------------------------------------------------------------------------------


def pair(**kw):
    """Two identical (model, Adam) pairs of a small tanh VAE."""
    out = []
    for _ in range(2):
        m = make_model(**kw)
        out.append((m, sv.Adam(m, lr=1e-2)))
    return out


def test_a_failing_thread_raises_its_error_and_the_step_can_go_on(monkeypatch):
    (m1, o1), (m2, o2) = pair()
    x = batch(8)
    noise = FixedNoise(np.random.default_rng(0).standard_normal((8, 3)))
    m1.rng = m2.rng = noise
    reference_step(m1, o1, x)  # the run to compare the recovered one with
    with CPUEngine(m2, o2, threads=2, min_rows=1) as engine:
        assert len(engine.lanes) == 1  # lanes are made when a batch first needs them
        engine.step(x)
        assert len(engine.lanes) == 2
        before = m2.params.copy()

        def broken(*args, **kw):
            raise RuntimeError("lane failed")

        monkeypatch.setattr(engine.lanes[1], "elbo", broken)
        with pytest.raises(RuntimeError, match="lane failed"):  # not the broken barrier it leaves behind
            engine.step(x)
        np.testing.assert_array_equal(m2.params, before)
        assert o2.t == 1
        monkeypatch.undo()
        engine.step(x)  # the barrier was reset: the next step runs
    reference_step(m1, o1, x)
    assert_close(m2.params, m1.params, 1e-12, "params after recovery")


@pytest.mark.parametrize("where", ["calling thread", "helper after the barrier"])
def test_failures_elsewhere_in_the_step_surface_without_hanging(where, monkeypatch):
    (m, o), _ = pair()
    x = batch(8)
    with CPUEngine(m, o, threads=2, min_rows=1) as engine:
        engine.step(x)
        if where == "calling thread":
            monkeypatch.setattr(engine.lanes[0], "elbo", lambda *a, **k: 1 / 0)
        else:
            update = engine.update
            monkeypatch.setattr(engine, "update", lambda opt, part, tmp: 1 / 0 if part.start else update(opt, part, tmp))
        with pytest.raises(ZeroDivisionError):
            engine.step(x)
        assert all(h.finished == h.handed for h in engine.helpers)  # nothing still running
        monkeypatch.undo()
        out = engine.step(x)  # and the step goes on
    assert np.isfinite(float(out.loss))


def test_an_interrupted_wait_still_lets_the_helpers_finish(monkeypatch):
    """Ctrl-C while the caller waits for a helper: the step waits on, then raises; later steps are right."""
    (m1, o1), (m2, o2) = pair()
    x = batch(8)
    real_wait, calls = Helper.wait, []

    def interrupted_once(self):
        calls.append(self)
        if len(calls) == 2:  # the step's second wait: the one after the work was handed over
            raise KeyboardInterrupt
        return real_wait(self)

    m1.rng = m2.rng = FixedNoise(np.random.default_rng(0).standard_normal((8, 3)))
    with CPUEngine(m2, o2, threads=2, min_rows=1) as engine:
        engine.step(x)
        update = engine.update

        def slowly(opt, part, tmp):  # the helper is still updating its half when the interrupt comes
            if part.start:
                time.sleep(0.2)
            update(opt, part, tmp)

        monkeypatch.setattr(engine, "update", slowly)
        monkeypatch.setattr(Helper, "wait", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            engine.step(x)
        assert all(h.finished == h.handed for h in engine.helpers)  # the helper had finished its update
        monkeypatch.undo()
        engine.step(x)
    for _ in range(3):  # the interrupted step had completed: three updates in all
        reference_step(m1, o1, x)
    assert o2.t == o1.t == 3
    assert_close(m2.params, m1.params, 1e-12, "params")


def test_an_interrupt_while_handing_over_work_does_not_hang():
    """Ctrl-C between two hand-overs: the helper already started must not wait for the others forever."""
    (m, o), _ = pair()
    x = batch(9)
    engine = CPUEngine(m, o, threads=3, min_rows=1).open()
    engine.step(x)
    second = engine.helpers[1]

    def interrupted(task):
        raise KeyboardInterrupt

    second.run = interrupted
    outcome = []

    def call():
        try:
            engine.step(x)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=20)
    assert not caller.is_alive(), "the step hangs"
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
    del second.run  # back to Helper.run
    assert np.isfinite(float(engine.step(x).loss))
    engine.close()
    assert isinstance(second, Helper)


def test_helpers_compute_under_the_callers_floating_point_error_state():
    """``np.errstate`` is per thread context: the helpers run in a copy of the caller's."""
    (m, o), _ = pair(kind="gaussian_learned")
    x = batch(8)
    x[4:] *= 1e200  # only the helper's rows overflow
    with CPUEngine(m, o, threads=2, min_rows=1) as engine:
        assert engine.n_parts(8) == 2
        with np.errstate(over="raise", invalid="raise"), pytest.raises(FloatingPointError):
            engine.step(x)
        with np.errstate(all="ignore"):
            out = engine.step(x)
    assert not np.isfinite(float(out.loss))


def helper_threads():
    return sum(t.name.startswith("scratchvae-step-") for t in threading.enumerate())


def test_parts_follow_rows_threads_and_samples():
    (m, o), _ = pair()
    engine = CPUEngine(m, o, threads=4)
    assert [engine.n_parts(b) for b in (1, MIN_ROWS - 1, MIN_ROWS, 2 * MIN_ROWS, 10 * MIN_ROWS)] == [1, 1, 1, 2, 4]
    iwae = CPUEngine(m, o, threads=4, objective="iwae", k=8)
    assert iwae.n_parts(MIN_ROWS // 4) == 2  # K samples per example: K times the decoder rows
    assert CPUEngine(m, o, threads=4, objective="iwae", k=4 * MIN_ROWS).n_parts(3) == 3  # at most one per example
    assert CPUEngine(m, o, threads=1).n_parts(10_000) == 1


def test_one_part_starts_no_thread_and_leaves_blas_alone():
    (m, o), _ = pair()
    before = B.blas_threads()
    engine = CPUEngine(m, o, threads=4)
    engine.step(batch(5))  # 5 rows: one part
    assert helper_threads() == 0 and engine.helpers == [] and B.blas_threads() == before
    assert o.t == 1


def test_open_close_start_and_stop_helpers_and_hold_blas_to_one_thread():
    (m, o), _ = pair()
    before_blas = B.blas_threads()
    engine = CPUEngine(m, o, threads=3)
    assert helper_threads() == 0  # nothing runs until the engine is opened
    with engine:
        assert helper_threads() == 2
        if before_blas is not None:
            assert B.blas_threads() == 1
    assert helper_threads() == 0
    assert B.blas_threads() == before_blas
    engine.step(batch(200))  # a step opens it
    assert helper_threads() == 2
    engine.close()
    engine.close()  # twice is harmless
    assert helper_threads() == 0 and B.blas_threads() == before_blas


def test_a_dropped_open_engine_stops_its_threads_and_restores_blas():
    (m, o), _ = pair()
    before_blas = B.blas_threads()
    engine = CPUEngine(m, o, threads=3).open()
    engine.step(batch(200))
    assert helper_threads() == 2
    del engine
    gc.collect()
    assert helper_threads() == 0 and B.blas_threads() == before_blas


def test_overlapping_open_engines_restore_blas_when_the_last_one_closes():
    (m1, o1), (m2, o2) = pair()
    before = B.blas_threads()
    a, b = CPUEngine(m1, o1, threads=2).open(), CPUEngine(m2, o2, threads=2).open()
    a.close()
    assert B.blas_threads() == (None if before is None else 1)  # b still runs
    b.close()
    assert B.blas_threads() == before


def test_default_threads():
    (m, o), _ = pair()
    expected = 1 if B.blas_threads() is None else min(B.cpu_count(), 8)
    assert default_threads() == expected == CPUEngine(m, o).threads == make_engine("auto", m, o).threads


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
    monkeypatch.setattr(B, "thread_functions", lambda: None)  # a BLAS that cannot be controlled
    assert B.blas_threads() is None
    with B.limit_blas_threads(1) as applied:
        assert applied is False


def test_numpy_wheels_blas_thread_count_is_found():
    """NumPy's wheels on Linux bundle OpenBLAS: its thread count must be readable there."""
    if not B.loaded_libraries():
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

    base = dict(epochs=1, train_size=256, test_size=64, hidden=(32,), latent_dim=4, out=str(out))
    return TrainConfig(**{**base, **kw})


def test_the_trainer_gives_the_same_run_on_every_engine_and_thread_count(tmp_path):
    from scratchvae.train import Run

    runs, blas = {}, B.blas_threads()
    for name, threads in (("reference", None), ("cpu", 1), ("cpu", 2)):
        cfg = trainer_config(tmp_path / f"{name}{threads}", batch_size=64, dtype="float64", engine=name, threads=threads)
        runs[name, threads] = Run(cfg, log=lambda *_: None)
        runs[name, threads].run()
    reference = runs["reference", None]
    assert runs["cpu", 1].engine.n_parts(64) == 1 and runs["cpu", 2].engine.n_parts(64) == 2
    for key in (("cpu", 1), ("cpu", 2)):
        assert runs[key].opt.t == reference.opt.t == 4
        assert_close(runs[key].model.params, reference.model.params, 1e-12, key)
        assert runs[key].history[0]["test_loss"] == pytest.approx(reference.history[0]["test_loss"], rel=1e-12)
    assert B.blas_threads() == blas  # restored when the epoch ended


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(tmp_path):
    from scratchvae.train import Run

    def config(**kw):
        return trainer_config(tmp_path / "run", batch_size=128, **kw)

    Run(config(threads=3), log=lambda *_: None).run()
    logs = []
    resumed = Run(config(epochs=2, resume=True), log=logs.append)
    resumed.run()
    assert resumed.engine.threads == 3 and any("steps on 3 threads" in line for line in logs)
    again = Run(config(epochs=3, resume=True, threads=1), log=lambda *_: None)  # an explicit count wins
    again.run()
    assert again.engine.threads == 1
    on_reference = Run(config(epochs=4, resume=True, engine="reference"), log=lambda *_: None)
    on_reference.run()  # the checkpoint's count is for the cpu engine: the reference engine runs on one
    assert on_reference.engine.threads == 1 and on_reference.epoch == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_trainer_refuses_a_bad_thread_count(bad, tmp_path):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        trainer_config(tmp_path, threads=bad).validate()


def test_trainer_refuses_an_unknown_engine_and_threads_for_the_reference_engine(tmp_path):
    from scratchvae.train import Run

    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        trainer_config(tmp_path, engine="fast").validate()
    with pytest.raises(ValueError, match="apply to engine 'cpu'"):
        Run(trainer_config(tmp_path / "r", engine="reference", threads=2), log=lambda *_: None)
    assert not (tmp_path / "r").exists()


def test_command_line_engine_and_threads_flags():
    from scratchvae.cli import UsageError, build_parser

    assert build_parser().parse_args(["train", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["train"]).threads is None
    assert build_parser().parse_args(["train"]).engine == "auto"
    assert build_parser().parse_args(["train", "--engine", "reference"]).engine == "reference"
    with pytest.raises(UsageError, match="threads"):
        build_parser().parse_args(["train", "--threads", "0"])
    with pytest.raises(UsageError, match="engine"):
        build_parser().parse_args(["train", "--engine", "fast"])
