"""The ``gpu`` engine: its kernels compile (NVRTC, no GPU needed), its noise generator matches Philox's published
test vectors, it refuses what it cannot run, its Python side (and the trainer's, with an interruption and a
resume) matches the reference step with each kernel transcribed in NumPy and with the CUDA source itself compiled
for the CPU (``cuda_on_cpu``), and, where a GPU is present, the kernels on the GPU match the reference step and
resume bitwise.

Without a GPU the cupy cases are left out; ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

import re

import cuda_on_cpu
import numpy as np
import pytest

import scratchvae as sv
from scratchvae.backend import to_device, to_numpy
from scratchvae.engines import make_engine
from scratchvae.engines.gpu_kernels import ELEMENT_TYPES, KERNELS, SOURCE
from scratchvae.losses import LOG_VAR_BOUND
from scratchvae.rng import STREAM_NOISE

# ------------------------------------------------------------------------------------------
# Philox4x32-10 in NumPy: the kernel's generator, for the published test vectors and the GPU comparison.
# ------------------------------------------------------------------------------------------


def philox4x32_10(counters, key):
    """Philox4x32-10 of counters ``(n, 4)`` uint32 under ``key`` (two uint32): ``(n, 4)`` uint32."""
    mask = np.uint64(0xFFFFFFFF)
    c = np.asarray(counters, np.uint64).reshape(-1, 4)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[:, 0], np.uint64(0xCD9E8D57) * c[:, 2]
        c = np.stack([(p1 >> np.uint64(32)) ^ c[:, 1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[:, 3] ^ k1, p0 & mask], 1)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c.astype(np.uint32)


def philox_normal(n, seed, t, stream):
    """What the ``philox_normal`` kernel draws for ``n`` elements at step ``t`` (float64)."""
    blocks = -(-n // 4)
    counters = np.stack([np.arange(blocks), np.full(blocks, t), np.full(blocks, stream), np.zeros(blocks)], 1)
    w = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.float64)
    u = (w + 0.5) * 2.0**-32
    radius, angle = np.sqrt(-2.0 * np.log(u[:, 0::2])), 2 * np.pi * u[:, 1::2]
    pairs = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 2)  # (blocks, 2 pairs, 2)
    return pairs.reshape(-1)[:n]


@pytest.mark.parametrize(
    "counter,key,expected",
    [  # Salmon et al. (2011), Random123's known-answer tests for philox4x32 with 10 rounds
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ],
    ids=["zeros", "ones", "pi"],
)  # fmt: skip
def test_the_philox_mirror_gives_the_published_answers(counter, key, expected):
    assert philox4x32_10(counter, key)[0].tolist() == expected


def test_the_noise_is_standard_normal_and_a_function_of_seed_stream_and_step():
    eps = philox_normal(200_000, seed=3, t=5, stream=STREAM_NOISE)
    assert abs(eps.mean()) < 0.01 and abs(eps.var() - 1) < 0.01
    assert np.array_equal(eps[:10], philox_normal(10, 3, 5, STREAM_NOISE))  # element i depends on i alone
    assert not np.array_equal(eps[:10], philox_normal(10, 3, 6, STREAM_NOISE))
    assert not np.array_equal(eps[:10], philox_normal(10, 4, 5, STREAM_NOISE))


# ------------------------------------------------------------------------------------------
# The kernels compile for Hopper (sm_90) with NVRTC; no GPU is needed.
# ------------------------------------------------------------------------------------------


def test_every_kernel_of_the_source_is_listed():
    assert sorted(re.findall(r'extern "C" __global__ void (\w+)\(', SOURCE)) == sorted(KERNELS)


@pytest.mark.parametrize("dtype", sorted(ELEMENT_TYPES))
def test_the_kernels_compile_for_sm_90(dtype):
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="needs the cuda-bindings and nvidia-cuda-nvrtc wheels "
                                "(the test extra, Linux x86-64)")  # fmt: skip
    try:
        err, prog = nvrtc.nvrtcCreateProgram(SOURCE.encode(), b"gpu_kernels.cu", 0, [], [])
    except Exception as exc:  # cuda-bindings without the NVRTC library it loads
        pytest.skip(f"NVRTC is not usable here: {type(exc).__name__}: {exc}")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    options = [b"--gpu-architecture=sm_90", f"-DSCRATCHVAE_REAL={ELEMENT_TYPES[dtype]}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.rstrip(b"\0").decode(errors="replace")
    _, cubin_size = nvrtc.nvrtcGetCUBINSize(prog)
    assert cubin_size > 0


# ------------------------------------------------------------------------------------------
# What it refuses.
# ------------------------------------------------------------------------------------------


def test_on_numpy_the_gpu_engine_is_refused_in_one_line():
    model = sv.VAE(6, (4,), 2)
    with pytest.raises(ValueError, match="engine 'gpu' runs on CuPy arrays, and this model is on numpy"):
        make_engine("gpu", model, sv.Adam(model))
    assert make_engine("auto", model, sv.Adam(model)).name == "cpu"  # auto never picks the gpu engine


@pytest.mark.parametrize("kind", ["autoencoder", "iwae"])
def test_what_the_gpu_engine_does_not_compute_is_refused_in_one_line(kind):
    model = sv.Autoencoder(6, (4,), 2) if kind == "autoencoder" else sv.VAE(6, (4,), 2)
    what = "an autoencoder" if kind == "autoencoder" else "objective 'iwae' with 'bernoulli'"
    args = {"objective": "iwae", "k": 2} if kind == "iwae" else {}
    with pytest.raises(ValueError, match=f"engine 'gpu' runs the ELBO of a VAE .*, not {what}; use engine 'reference'"):
        make_engine("gpu", model, sv.Adam(model), **args)


def test_the_command_line_refuses_engine_gpu_on_numpy(tmp_path, capsys):
    from scratchvae.cli import main

    status = main(["train", "--engine", "gpu", "--train-size", "64", "--test-size", "16", "--hidden", "8",
                   "--latent", "2", "--epochs", "1", "--progress", "off", "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "engine 'gpu' runs on CuPy arrays" in err, err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------
# On a GPU: the engine against the reference step, and exact resume.
# ------------------------------------------------------------------------------------------


# The gpu engine runs on CuPy: these run only as the cupy case (left out, and counted, where cupy is missing).
on_gpu = pytest.mark.parametrize("backend", ["cupy"])


def data(xp, likelihood, shape=(64, 20)):
    x = np.random.default_rng(0).random(shape)
    if likelihood == "bernoulli":
        x = (x > 0.5).astype(float)
    return to_device(x, xp, "float32")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "gaussian_learned"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "softplus"])
@on_gpu
def test_the_gpu_engine_matches_the_reference_step(backend, xp, dtype, likelihood, optimizer, activation):
    """In float64 to rounding, with and without the log-variance bound (both branches of every kernel); in float32,
    what runs by default, the losses and the parameters after 20 steps to float32 rounding (tolerances as the
    CUDA source compiled for the CPU is checked, below)."""
    rtol, atol = CPU_TOL[dtype]
    for bound in (None, 2.0) if dtype == "float64" else (LOG_VAR_BOUND,):

        def build():
            m = sv.VAE(20, (16, 12), 3, likelihood=likelihood, activation=activation, log_var_bound=bound,
                       backend=backend, dtype=dtype, seed=1)  # fmt: skip
            return m, {"adam": sv.Adam, "sgd": sv.SGD}[optimizer](m, lr=LR[dtype])

        ref, ref_opt = build()
        model, opt = build()
        x = data(xp, likelihood).astype(dtype)
        with make_engine("gpu", model, opt) as engine:
            for t in range(20):
                beta = 0.5 if t % 2 else 1.0
                eps = to_device(philox_normal(64 * 3, model.seed, t, STREAM_NOISE).reshape(64, 3), xp, dtype)
                expected = ref.loss_and_grad(x, eps=eps, beta=beta)
                ref_opt.step()
                got = engine.step(x, beta)
                for a, b in zip(got, expected):
                    np.testing.assert_allclose(float(a), float(b), rtol=rtol, atol=atol)
                if dtype == "float64":
                    scale = float(abs(ref.grads).max())
                    np.testing.assert_allclose(to_numpy(model.grads), to_numpy(ref.grads), rtol=0, atol=rtol * scale)
        scale = float(abs(ref.params).max())
        np.testing.assert_allclose(to_numpy(model.params), to_numpy(ref.params), rtol=0, atol=rtol * scale)


@on_gpu
def test_the_gpu_noise_kernel_is_the_philox_mirror(backend, xp):
    model = sv.VAE(20, (8,), 3, backend=backend, seed=12345678901)
    engine = make_engine("gpu", model, sv.Adam(model))
    out = xp.empty(1001, dtype=model.dtype)
    seed = model.seed
    engine._launch("philox_normal", 251, out, np.int64(1001), np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32),
                   np.uint32(7), np.uint32(STREAM_NOISE))  # fmt: skip
    np.testing.assert_allclose(to_numpy(out), philox_normal(1001, seed, 7, STREAM_NOISE), rtol=1e-6, atol=1e-6)


@on_gpu
def test_a_resumed_gpu_run_is_bitwise_an_uninterrupted_one(backend, xp):
    x = data(xp, "bernoulli")

    def run(steps, state=None):
        m = sv.VAE(20, (16,), 3, backend=backend, seed=4)
        opt = sv.Adam(m, lr=1e-2)
        if state is not None:  # what a checkpoint restores: parameters and the optimiser's state
            m.params[...] = state[0]
            opt.load_state_dict(state[1])
        with make_engine("gpu", m, opt) as engine:
            for _ in range(steps):
                engine.step(x, check_input=False)
        return m, opt

    whole, _ = run(10)
    half, opt = run(4)
    state = (half.params.copy(), {k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state_dict().items()})
    resumed, _ = run(6, state)
    assert bool((resumed.params == whole.params).all())


@pytest.mark.parametrize("binarize", ["none", "dynamic"])
def test_an_interrupted_run_of_the_gpu_engine_resumes_bitwise(backend, binarize, tmp_path, monkeypatch):
    """The trainer with the gpu engine, stopped inside an epoch (as a signal stops it) and resumed from its
    checkpoint: the parameters of an uninterrupted run, bit for bit. On NumPy the kernels are their NumPy
    transcriptions (below), which checks the trainer's side of it without a GPU."""
    from scratchvae import train as T
    from scratchvae.engines import gpu as G

    if backend == "numpy":
        monkeypatch.setattr(G, "compile_kernels", lambda xp, dtype: _numpy_kernels())
        monkeypatch.setattr(G, "check_gpu_model", lambda *args: None)
    monkeypatch.setattr(T.Run, "pictures", lambda self: [])  # (the pictures take most of the time here)

    def config(out, **kw):
        return T.TrainConfig(epochs=2, batch_size=64, train_size=256, test_size=64, hidden=(32,), latent_dim=4,
                             backend=backend, engine="gpu", binarize=binarize, out=str(tmp_path / out), **kw)  # fmt: skip

    straight = T.Run(config("whole"), log=lambda *_: None)
    straight.run()
    run = T.Run(config("split"), log=lambda *_: None)
    run.out.mkdir(parents=True)
    calls = []
    with pytest.raises(T._Interrupted):  # the third step's interruption check stops it, with a checkpoint
        run.train_epoch(lambda: calls.append(1) or len(calls) == 3)
    assert run.engine.name == "gpu" and run.opt.t == 3
    resumed = T.Run(config("split", resume=True), log=lambda *_: None)
    resumed.run()
    assert bool((resumed.model.params == straight.model.params).all())
    assert not bool((run.model.params == straight.model.params).all())  # it did train on after the checkpoint


@pytest.mark.parametrize("binarize", ["none", "static"])
def test_batches_gathered_on_the_device_are_the_host_paths(binarize, tmp_path):
    """What the trainer does for the gpu engine (data copied once, batches gathered where the model lives), run
    with NumPy standing in for the device: the same floats as the host path, batch for batch."""
    from scratchvae import data as D
    from scratchvae import train as T

    run = T.Run(T.TrainConfig(train_size=300, test_size=50, hidden=(8,), latent_dim=2, binarize=binarize,
                              out=str(tmp_path / "r")), log=lambda *_: None)  # fmt: skip
    run.perm = np.random.default_rng(0).permutation(300)
    for start, stop in [(0, 128), (128, 256), (256, 300)]:
        host = D.rows_to_float(run.train_x[run.perm[start:stop]], binarize, None, run.model.dtype)
        assert np.array_equal(run.device_batch(start, stop), host)
    run.perm = run.perm[::-1].copy()  # a new epoch's order is copied over once
    assert np.array_equal(run.device_batch(0, 10), D.rows_to_float(run.train_x[run.perm[:10]], binarize))
    assert not run.data_on_device  # on NumPy the cpu engine converts on the host


def test_a_run_on_device_batches_is_the_run_on_host_batches(tmp_path, monkeypatch):
    """The trainer's whole loop with batches gathered "on the device" (NumPy standing in) ends bitwise where the
    host path ends: the wiring the gpu engine's runs use, checked without a GPU."""
    from scratchvae import train as T

    def final_params(out, on_device):
        monkeypatch.setattr(T.Run, "data_on_device", property(lambda self: on_device))
        run = T.Run(T.TrainConfig(train_size=300, test_size=50, hidden=(8,), latent_dim=2, batch_size=64, epochs=2,
                                  binarize="static", out=str(out)), log=lambda *_: None)  # fmt: skip
        run.run()
        return run.model.params.copy(), run.history

    host, host_history = final_params(tmp_path / "host", False)
    device, device_history = final_params(tmp_path / "device", True)
    assert np.array_equal(host, device)
    assert [r["train_loss"] for r in host_history] == [r["train_loss"] for r in device_history]


# ------------------------------------------------------------------------------------------
# Without a GPU: the engine's Python side (buffers, argument order, which kernel when) run on NumPy, with each
# kernel replaced by a NumPy transcription of its CUDA source.
# ------------------------------------------------------------------------------------------


def _act(a, code):
    return [a, np.maximum(a, 0), np.tanh(a), 0.5 * (np.tanh(0.5 * a) + 1), np.maximum(a, 0) + np.log1p(np.exp(-abs(a)))][code]


def _slope(y, code):
    return [np.ones_like(y), (y > 0).astype(y.dtype), 1 - y * y, y * (1 - y), -np.expm1(-y)][code]


def _numpy_kernels():
    """Each kernel of gpu_kernels.SOURCE, line for line in NumPy; called as CuPy calls a kernel: (grid, block, args)."""

    def bias_activation(y, b, rows, cols, code):
        y[...] = _act(y + b, code)

    def activation_backward(d, y, n, code):
        d *= _slope(y, code)

    def reparameterize_kl(enc_out, eps, z, log_var, sigma, kl_terms, rows, J, c):
        mu, h = enc_out[:, :J], enc_out[:, J:]
        log_var[...] = c * np.tanh(h / c) if c > 0 else h
        sigma[...] = np.exp(0.5 * log_var)
        z[...] = mu + sigma * eps
        kl_terms[...] = -0.5 * (1 + log_var - mu * mu - sigma * sigma)

    def bernoulli_nll(logits, x, nll_terms, d_logits, n, scale):
        nll_terms[...] = np.maximum(logits, 0) - x * logits + np.log1p(np.exp(-abs(logits)))
        d_logits[...] = scale * (0.5 * (np.tanh(0.5 * logits) + 1) - x)

    def gaussian_nll(mean, x, nll_terms, d_mean, n, lv, scale):
        diff = mean - x
        nll_terms[...] = 0.5 * (1.8378770664093453 + lv + diff * diff * np.exp(-lv))
        d_mean[...] = scale * diff * np.exp(-lv)

    def gaussian_learned_nll(dec_out, x, nll_terms, d_dec_out, rows, D, c, scale):
        mean, h = dec_out[:, :D], dec_out[:, D:]
        lv = c * np.tanh(h / c) if c > 0 else h
        diff, inv_var = mean - x, np.exp(-lv)
        nll_terms[...] = 0.5 * (1.8378770664093453 + lv + diff * diff * inv_var)
        d_dec_out[:, :D] = scale * diff * inv_var
        d_lv = scale * 0.5 * (1 - diff * diff * inv_var)
        d_dec_out[:, D:] = d_lv * (1 - (lv / c) ** 2) if c > 0 else d_lv

    def batch_means(nll_sum, kl_sum, parts, B, beta):
        recon, kl = nll_sum / B, kl_sum / B
        parts[...] = [recon + beta * kl, recon, kl]

    def reparameterize_kl_backward(d_z, enc_out, eps, log_var, sigma, d_enc_out, rows, J, beta_b, c):
        d_lv = d_z * eps * sigma * 0.5 + beta_b * 0.5 * (sigma * sigma - 1)
        d_enc_out[:, :J] = d_z + beta_b * enc_out[:, :J]
        d_enc_out[:, J:] = d_lv * (1 - (log_var / c) ** 2) if c > 0 else d_lv

    def adam_update(p, grad, m, v, n, lr, b1, b2, eps, wd, bc1, bc2):
        g = grad + wd * p
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        p -= lr * (m / bc1) / (np.sqrt(v / bc2) + eps)

    def sgd_update(p, grad, velocity, n, lr, momentum, wd):
        velocity[...] = momentum * velocity + grad + wd * p
        p -= lr * velocity

    def philox(out, n, seed_lo, seed_hi, t, stream):
        out[...] = philox_normal(int(n), int(seed_lo) | int(seed_hi) << 32, int(t), int(stream)).reshape(out.shape)

    table = {f.__name__: f for f in (bias_activation, activation_backward, reparameterize_kl, bernoulli_nll,
                                     gaussian_nll, gaussian_learned_nll, batch_means, reparameterize_kl_backward,
                                     adam_update, sgd_update)}  # fmt: skip
    table["philox_normal"] = philox
    assert sorted(table) == sorted(KERNELS)

    def launcher(f):
        return lambda grid, block, args: f(*args)

    return {name: launcher(f) for name, f in table.items()}


def kernels_on_the_cpu(how, dtype):
    """The gpu engine's kernels on the CPU: their NumPy transcriptions (above), or their CUDA source itself,
    compiled as C++ (``cuda_on_cpu``: each thread run after the other)."""
    if how == "transcribed":
        return _numpy_kernels()
    if cuda_on_cpu.compiler() is None:
        pytest.skip("no C++ compiler here to build the CUDA source for the CPU")
    return cuda_on_cpu.cpu_kernels(dtype)


# Tolerances against the reference step: float64 to rounding; float32 to float32 rounding.
CPU_TOL = {"float64": (1e-12, 1e-12), "float32": (2e-5, 1e-6)}  # (relative, absolute for the losses)
# Learning rates of those comparisons. In float32 the default (1e-3): at 1e-2 the KL falls to a few hundredths
# within ten steps and Adam turns gradients at rounding level into whole steps of the learning rate, so two
# float32 computations of the same 20 steps drift apart by more than float32 rounding (with the kernels compiled
# for the CPU: up to 1.2 times these tolerances at 1e-2, at most 0.3 times at 1e-3).
LR = {"float64": 1e-2, "float32": 1e-3}


@pytest.mark.parametrize("kernels,dtype",
                         [("transcribed", "float64"), ("compiled", "float64"), ("compiled", "float32")])  # fmt: skip
@pytest.mark.parametrize("likelihood,optimizer,activation,bound",
                         [("bernoulli", "adam", "relu", 30.0), ("gaussian", "sgd", "tanh", 30.0),
                          ("bernoulli", "adam", "softplus", None), ("gaussian", "adam", "sigmoid", 2.0),
                          ("gaussian_learned", "adam", "relu", 2.0), ("gaussian_learned", "sgd", "tanh", None)])  # fmt: skip
def test_the_gpu_engine_on_the_cpu_matches_the_reference_step(likelihood, optimizer, activation, bound, kernels,
                                                              dtype, monkeypatch):  # fmt: skip
    """The engine's Python side (buffers, argument order, which kernel when) with its kernels run on the CPU."""
    from scratchvae.engines import gpu as G

    table = kernels_on_the_cpu(kernels, dtype)
    monkeypatch.setattr(G, "compile_kernels", lambda xp, dtype: table)
    monkeypatch.setattr(G, "check_gpu_model", lambda *args: None)  # (it refuses NumPy models)

    def build():
        m = sv.VAE(20, (16, 12), 3, likelihood=likelihood, activation=activation, log_var_bound=bound,
                   dtype=dtype, seed=1)  # fmt: skip
        return m, {"adam": sv.Adam, "sgd": sv.SGD}[optimizer](m, lr=LR[dtype])

    rtol, atol = CPU_TOL[dtype]
    ref, ref_opt = build()
    model, opt = build()
    x = data(np, likelihood).astype(dtype)
    engine = G.GPUEngine(model, opt)
    for t in range(20):
        beta = 0.5 if t % 2 else 1.0
        eps = philox_normal(64 * 3, model.seed, t, STREAM_NOISE).reshape(64, 3)
        expected = ref.loss_and_grad(x, eps=eps, beta=beta)
        ref_opt.step()
        got = engine.step(x, beta)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(float(a), float(b), rtol=rtol, atol=atol)
        if dtype == "float64":  # in float32, as on the GPU, the losses and the final parameters (rounding grows)
            np.testing.assert_allclose(model.grads, ref.grads, rtol=0, atol=rtol * abs(ref.grads).max())
    np.testing.assert_allclose(model.params, ref.params, rtol=0, atol=rtol * abs(ref.params).max())
    assert opt.t == ref_opt.t == 20


def test_a_step_of_the_default_model_is_eleven_products_and_twelve_kernels(monkeypatch):
    """The launches engines/gpu.py's docstring counts (its six sums are CuPy's, uncounted here)."""
    from scratchvae.engines import gpu as G

    launched = []

    def counted(name, kernel):
        return lambda *args: launched.append(name) or kernel(*args)

    kernels = {name: counted(name, kernel) for name, kernel in _numpy_kernels().items()}
    monkeypatch.setattr(G, "compile_kernels", lambda xp, dtype: kernels)
    monkeypatch.setattr(G, "check_gpu_model", lambda *args: None)
    model = sv.VAE(784, (400,), 20)
    engine = G.GPUEngine(model, sv.Adam(model))
    x = data(np, "bernoulli", (128, 784))
    engine.step(x, check_input=False)  # (buffers made)
    launched.clear()
    products = []
    monkeypatch.setattr(np, "matmul", lambda a, b, out: products.append(out.shape) or out.__setitem__(..., a @ b))
    engine.step(x, check_input=False)
    assert len(products) == 11 and len(launched) == 12, (products, launched)
    assert launched.count("bias_activation") == 4 and launched.count("activation_backward") == 2


@pytest.mark.parametrize("dtype", sorted(ELEMENT_TYPES))
def test_the_noise_kernels_source_compiled_for_the_cpu_is_the_philox_mirror(dtype):
    table = kernels_on_the_cpu("compiled", dtype)
    seed, n = 12345678901, 1001
    out = np.empty(n, dtype=dtype)
    threads = -(-n // 4)  # one per four numbers
    key = (np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32))
    args = (out, np.int64(n), *key, np.uint32(7), np.uint32(STREAM_NOISE))
    table["philox_normal"]((-(-threads // 256),), (256,), args)
    expected = philox_normal(n, seed, 7, STREAM_NOISE)
    np.testing.assert_allclose(out, expected, rtol=1e-14 if dtype == "float64" else 1e-7, atol=0)
