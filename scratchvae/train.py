"""Training a VAE on MNIST: minibatches, per-epoch metrics, checkpoints, pictures, exact resume.

:func:`train` is what ``scratchvae train`` runs. One epoch is one pass over
the training images in an order drawn from the run's data generator; each
minibatch is converted from ``uint8`` to floats (and binarized) on its own,
so no float copy of the data set is ever held.

Everything random has its own generator stream derived from ``seed``: the
initial parameters, the reparameterization noise, the data order and
dynamic binarization, and the evaluation noise. The checkpoint stores all of
their states, the optimiser state and the position in the current epoch's
data order, so a resumed run continues exactly where the first one stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data as D
from . import images
from ._files import atomic_write, remove_orphans
from .backend import STREAM_DATA, STREAM_EVAL_DATA, STREAM_EVAL_ELBO, STREAM_EVAL_IWAE, STREAM_PICTURES
from .backend import Generator, backend_name, get_xp, to_device, to_numpy
from .checkpoint import CheckpointError, load_checkpoint, restore_model, save_checkpoint
from .evaluate import check_k, check_positive_int, iwae_bound
from .layers import Workspace
from .model import VAE
from .optim import OPTIMIZERS
from .parallel import ParallelStep

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
OBJECTIVES = ("elbo", "iwae")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the epoch and step."""


@dataclass
class TrainConfig:
    r"""Everything that defines a training run (the CLI's ``train`` flags).

    The objective minimised at each step:

    * ``objective="elbo"``: :math:`\frac1B\sum_b[-\log p(x_b|z_b) + \beta_t\,\mathrm{KL}_b]`
      (:meth:`VAE.loss_and_grad <scratchvae.model.VAE.loss_and_grad>`, one
      sample, analytic KL), with the KL weight :math:`\beta_t` of
      :meth:`beta_at`: ``beta`` throughout, or, with ``kl_warmup = W > 0``
      epochs of ``S`` steps, a per-step linear ramp from 0,

      .. math:: \beta_t = \beta\,\min\!\Big(1, \frac{t}{W S}\Big),
          \qquad t = (\text{epoch} - 1)\,S + \text{step} = 0, 1, 2, \dots

      so the first step has :math:`\beta_0 = 0` and every step from the
      first of epoch :math:`W + 1` on has :math:`\beta_t = \beta`.
    * ``objective="iwae"``: the negative importance-weighted bound with
      ``k`` samples (:func:`~scratchvae.objectives.iwae_loss_and_grad`). It
      has no separate KL term to weight, so it takes ``beta = 1`` and
      ``kl_warmup = 0`` only; ``k = 1`` is the one-sample ELBO with a Monte
      Carlo KL. The ELBO takes ``k = 1`` only.

    The train loss reported per epoch is the mean of this objective over the
    epoch's steps (with their :math:`\beta_t`); the test loss is always the
    negative ELBO (:math:`\beta = 1`).
    """

    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    hidden: tuple = (400,)
    latent: int = 20
    activation: str = "relu"
    init: str = "fan_in_uniform"  # the torch.nn.Linear default, as in the PyTorch VAE example
    likelihood: str = "bernoulli"
    binarize: str = "none"
    objective: str = "elbo"  # "elbo" or "iwae"
    k: int = 1  # importance samples of the iwae objective
    beta: float = 1.0  # KL weight of the elbo objective
    kl_warmup: int = 0  # epochs over which the KL weight ramps linearly from 0 to beta
    backend: str | None = None
    dtype: str = "float32"
    seed: int = 0
    out: str = "runs/mnist"
    resume: bool = False
    train_size: int | None = None
    test_size: int | None = None
    checkpoint_every: int = 0  # also save every N steps inside an epoch (0: only at epoch ends)
    progress: bool | None = None  # None: show a progress line when stderr is a terminal
    threads: int | None = None  # threads of the training step (None: one per CPU, at most 8, on numpy; see ParallelStep)

    # Fields that must agree between a run and its resumption.
    RESUME_KEYS = (
        "batch_size", "lr", "optimizer", "hidden", "latent", "activation", "init", "likelihood",
        "binarize", "dtype", "seed", "train_size", "test_size", "objective", "k", "beta", "kl_warmup",
    )  # fmt: skip

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible value."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "latent": self.latent}
        for name, v in positive.items():
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.binarize not in D.BINARIZE:
            raise ValueError(f"unknown binarize {self.binarize!r}; choose one of {', '.join(D.BINARIZE)}")
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.threads is not None:
            check_positive_int(self.threads, "threads")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        check_k(self.k)
        if isinstance(self.beta, bool) or not (
            isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0
        ):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
        if isinstance(self.kl_warmup, bool) or not isinstance(self.kl_warmup, (int, np.integer)) or self.kl_warmup < 0:
            raise ValueError(f"kl_warmup must be an integer >= 0, got {self.kl_warmup!r}")
        if self.objective == "elbo" and self.k != 1:
            raise ValueError(f"k = {self.k} (--k) needs --objective iwae; the elbo objective uses one sample")
        if self.objective == "iwae" and (self.beta != 1 or self.kl_warmup != 0):
            raise ValueError(
                "the iwae objective has no separate KL term to weight: beta must be 1 and kl_warmup 0 "
                f"(got beta {self.beta}, kl_warmup {self.kl_warmup}); use --objective elbo for --beta/--kl-warmup"
            )

    def beta_at(self, t: int, steps_per_epoch: int) -> float:
        """KL weight of the ``t``-th training step of the run (``t = 0, 1, ...``; see the class docstring)."""
        if self.kl_warmup == 0:
            return float(self.beta)
        return float(self.beta) * min(1.0, t / (self.kl_warmup * steps_per_epoch))


@dataclass
class EpochStats:
    """Running sums over an epoch's minibatches (per-example means come out at the end)."""

    n: int = 0
    loss: float = 0.0
    recon: float = 0.0
    kl: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def add(self, batch: int, loss: float, recon: float, kl: float) -> None:
        self.n += batch
        self.loss += batch * loss
        self.recon += batch * recon
        self.kl += batch * kl


def _whole(name, v, low, high=None):
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer in {low}..{'' if high is None else high}, got {v!r}")
    return v


def _real(name, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    return v


def training_state(meta: dict, n: int, batch_size: int):
    """``(epoch, step, stats, history)`` from a checkpoint's metadata, checked against the run.

    With ``n`` images in batches of ``batch_size`` an epoch has
    ``ceil(n / batch_size)`` steps; at step ``s`` of epoch ``e`` the running
    sums cover ``min(s * batch_size, n)`` images and the history holds one row
    for each of epochs ``1 .. e-1``. Raises ``KeyError``, ``TypeError`` or
    ``ValueError`` naming what does not fit.
    """
    n_steps = -(-n // batch_size)
    epoch = _whole("epoch", meta["epoch"], 1)
    step = _whole("step", meta["step"], 0, n_steps)
    _whole("optimizer t", meta["optimizer"]["t"], 0)
    stats = EpochStats(**meta["stats"])
    covered = min(step * batch_size, n)
    if _whole("stats n", stats.n, 0) != covered:
        raise ValueError(f"stats cover {stats.n} images, but step {step} in batches of {batch_size} means {covered}")
    for name in ("loss", "recon", "kl", "seconds"):
        _real(f"stats {name}", getattr(stats, name))
    history = meta["history"]
    if (
        not isinstance(history, list) or len(history) != epoch - 1
        or [row.get("epoch") if isinstance(row, dict) else row for row in history] != list(range(1, epoch))
    ):  # fmt: skip
        raise ValueError(f"history must hold one row for each of epochs 1..{epoch - 1}")
    for row in history:
        for key in ("train_loss", "test_loss"):
            _real(f"history {key}", row[key])
    return epoch, step, stats, history


def is_permutation(perm, n: int) -> bool:
    """Whether ``perm`` is an integer array holding each of ``0 .. n-1`` once."""
    return (
        isinstance(perm, np.ndarray) and perm.shape == (n,) and perm.dtype.kind in "iu"
        and np.array_equal(np.sort(perm), np.arange(n))
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Data: uint8 images -> float minibatches on the model's device.
# ------------------------------------------------------------------------------------------


def prepare_mnist(cfg: TrainConfig):
    """Load MNIST (uint8), slice to ``train_size``/``test_size``, threshold once for ``static``.

    A size larger than the set is a ``ValueError``, not silently the whole set.
    """
    mnist = D.load_mnist(cfg.data_dir)
    for name, size, images_u8, split in (("train_size", cfg.train_size, mnist.train_images, "training"),
                                         ("test_size", cfg.test_size, mnist.test_images, "test")):  # fmt: skip
        if size is not None and size > len(images_u8):
            raise ValueError(
                f"{name} {size} is more than the {len(images_u8)} {split} images; leave it out to use them all"
            )
    train_x, train_y = mnist.train_images[: cfg.train_size], mnist.train_labels[: cfg.train_size]
    test_x, test_y = mnist.test_images[: cfg.test_size], mnist.test_labels[: cfg.test_size]
    if cfg.binarize == "static":
        train_x, test_x = D.static_binarize(train_x), D.static_binarize(test_x)
    return train_x, train_y, test_x, test_y


def batches_of(images_u8, model, binarize, rng, batch_size):
    """Yield float minibatches of ``images_u8`` in order, on the model's device."""
    for start in range(0, len(images_u8), batch_size):
        xb = D.to_float_batch(images_u8[start : start + batch_size], binarize, rng, dtype=model.dtype)
        yield to_device(xb, model.xp)


def evaluate_elbo(model, images_u8, binarize, seed, batch_size=1000):
    """Per-example means of the negative ELBO and its parts over a data set (one noise sample each).

    The dynamic binarization and the noise come from two generators seeded
    by ``seed`` alone (streams of their own), so the number is the same
    whenever it is computed, and every evaluation binarizes the same way.
    """
    rng_data = Generator(seed, np, stream=STREAM_EVAL_DATA)
    rng_eps = Generator(seed, model.xp, stream=STREAM_EVAL_ELBO)
    stats = EpochStats()
    for xb in batches_of(images_u8, model, binarize, rng_data, batch_size):
        recon, kl = model._loss_parts(xb, rng_eps.normal((xb.shape[0], model.latent_dim), model.dtype))
        r, k = float(recon.mean()), float(kl.mean())
        stats.add(xb.shape[0], r + k, r, k)
    return {"loss": stats.loss / stats.n, "recon": stats.recon / stats.n, "kl": stats.kl / stats.n}


def evaluate_nll(model, images_u8, binarize, seed, k=5000, batch_size=100, progress=None):
    """Test negative log-likelihood in nats: :math:`-\\frac1N\\sum_n \\mathcal L_K(x_n)` (IWAE bound).

    Returns ``(mean, standard_error)`` over the examples.
    """
    rng_data = Generator(seed, np, stream=STREAM_EVAL_DATA)
    rng_eps = Generator(seed, model.xp, stream=STREAM_EVAL_IWAE)
    values = []
    n = len(images_u8)
    for i, xb in enumerate(batches_of(images_u8, model, binarize, rng_data, batch_size)):
        values.append(to_numpy(iwae_bound(model, xb, k, rng=rng_eps)))
        if progress:
            progress(min((i + 1) * batch_size, n), n)
    v = -np.concatenate(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


# ------------------------------------------------------------------------------------------
# Progress display.
# ------------------------------------------------------------------------------------------


class Progress:
    """A progress line on stderr: tqdm when installed, else a plain updating line; silent when off."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self._bar, self._last, self._t0 = None, 0.0, time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm  # optional

                self._bar = tqdm(total=total, desc=desc, unit="ex", leave=False, file=sys.stderr)
            except ImportError:
                pass

    def update(self, done: int, loss: float | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = done
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.2f}", refresh=False)
            self._bar.refresh()
            return
        now = time.perf_counter()
        if now - self._last < 0.25 and done < self.total:
            return
        self._last = now
        frac = done / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        rate = done / max(now - self._t0, 1e-9)
        tail = f" loss {loss:8.2f}" if loss is not None else ""
        sys.stderr.write(f"\r{self.desc} [{bar}] {100 * frac:5.1f}%{tail} {rate:8.0f} ex/s")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


# ------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


class Run:
    """A training run in a folder: model, optimiser, generators, position; saves and restores them."""

    def __init__(self, cfg: TrainConfig, log=print):
        cfg.validate()
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.xp = get_xp(cfg.backend)
        self.train_x, self.train_y, self.test_x, self.test_y = prepare_mnist(cfg)
        self.model = VAE(
            self.train_x.shape[1], hidden=cfg.hidden, latent_dim=cfg.latent, likelihood=cfg.likelihood,
            activation=cfg.activation, init=cfg.init, backend=backend_name(self.xp), dtype=cfg.dtype, seed=cfg.seed,
        )  # fmt: skip
        self.opt = OPTIMIZERS[cfg.optimizer](self.model, lr=cfg.lr)
        self._step_fn = None
        self._threads = cfg.threads  # None: the default, or on --resume the count the checkpoint was written with
        self.data_rng = Generator(cfg.seed, np, stream=STREAM_DATA)
        self.epoch, self.step = 1, 0  # next epoch to run (1-based) and next step within it
        self.perm = None
        self.stats = EpochStats()
        self.history = []
        self.notes = None  # how the last pictures were rendered (see write_pictures)
        self._batch_work = Workspace(np)  # the host float buffer each minibatch is converted into

    @property
    def step_fn(self) -> ParallelStep:
        """The training step: loss, gradient and update of ``opt`` (rebuilt if ``opt`` or the thread count changes)."""
        key = (self.opt, self._threads)
        if self._step_fn is None or self._step_key != key:
            cfg = self.cfg
            self._step_fn = ParallelStep(self.model, self.opt, threads=self._threads, objective=cfg.objective, k=cfg.k)
            self._step_key = key
        return self._step_fn

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write the checkpoint; NaN or inf in the parameters or the optimiser's state raise ``TrainingDiverged`` and keep the last good one.

        (Adam's second-moment sum overflows to inf when gradients pass about
        1e17 in float32; the parameters then stop moving but stay finite, so
        the loss alone would not show it.)
        """
        opt_state = {f"opt_{k}": v for k, v in self.opt.state_dict().items() if k != "t"}  # live arrays
        for what, checked in (("parameters", [self.model.params]), ("optimiser's state", opt_state.values())):
            if not all(bool(self.xp.isfinite(a).all()) for a in checked):
                raise TrainingDiverged(
                    f"the {what} became NaN or inf (checkpoint at epoch {self.epoch}, step {self.step} not written); "
                    f"try a smaller --lr (now {self.cfg.lr}); the last good checkpoint is kept"
                )
        meta = {
            "model": self.model.config(),
            "train": self.cfg.to_json(),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": {"name": self.cfg.optimizer, "t": self.opt.t},
            "step_threads": self.step_fn.threads,  # a resumed run splits its steps the same way
            "rng": {"noise": self.model.rng.get_state(), "data": self.data_rng.get_state()},
            "stats": dataclasses.asdict(self.stats),
            "history": self.history,
        }
        arrays = dict(opt_state)
        if self.perm is not None:
            arrays["perm"] = self.perm
        return save_checkpoint(self.out / CHECKPOINT, self.model.params, meta, arrays)

    def restore(self) -> None:
        path = self.out / CHECKPOINT
        ckpt = load_checkpoint(path)
        saved = ckpt.meta.get("train")
        if not isinstance(saved, dict):
            raise CheckpointError(f"cannot resume from {path}: it holds no training configuration")
        # a checkpoint from before the objective fields existed was trained with their defaults
        saved = {"objective": "elbo", "k": 1, "beta": 1.0, "kl_warmup": 0, **saved}
        now = self.cfg.to_json()
        diff = [k for k in TrainConfig.RESUME_KEYS if saved.get(k) != now.get(k)]
        if diff:
            pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume from {path}: the configuration differs ({pairs})")
        try:
            model = restore_model(ckpt, backend=backend_name(self.xp))
        except CheckpointError as exc:  # say which file: --out names it only implicitly
            raise CheckpointError(f"cannot resume from {path}: {exc}") from None
        if model.params.shape != self.model.params.shape:
            raise CheckpointError(f"cannot resume from {path}: the model has a different size")
        try:  # check everything before taking any of it
            epoch, step, stats, history = training_state(ckpt.meta, len(self.train_x), self.cfg.batch_size)
            state = {k[4:]: to_device(v, self.xp) for k, v in ckpt.arrays.items() if k.startswith("opt_")}
            for k, v in state.items():
                if v.shape != self.model.params.shape:
                    raise ValueError(f"optimiser array {k} has shape {v.shape}, not that of the parameters")
            state["t"] = ckpt.meta["optimizer"]["t"]
            self.opt.load_state_dict(state)
            self.model.rng.set_state(ckpt.meta["rng"]["noise"])
            self.data_rng.set_state(ckpt.meta["rng"]["data"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise CheckpointError(f"checkpoint {path} has missing or malformed training state ({exc})") from None
        perm = ckpt.arrays.get("perm")
        if step and not is_permutation(perm, len(self.train_x)):
            raise CheckpointError(f"checkpoint {path} has no usable data order for its mid-epoch position")
        self.model.params[...] = model.params
        self.epoch, self.step, self.perm, self.stats, self.history = epoch, step, perm, stats, history
        if self.cfg.threads is None:  # the same split as before the interruption: bitwise the same run
            with contextlib.suppress(ValueError):  # absent (written before steps were split) or not a count
                self._threads = min(check_positive_int(ckpt.meta.get("step_threads"), "step_threads"), 1024)

    # ---------------------------------------------------------------- training

    def train_epoch(self, stop) -> dict:
        """Run (the rest of) the current epoch; returns its metrics dict."""
        cfg, model = self.cfg, self.model
        n, bs = len(self.train_x), cfg.batch_size
        n_steps = -(-n // bs)
        if self.step == 0:
            self.perm = self.data_rng.permutation(n)
            self.stats = EpochStats()
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = Progress(n, f"epoch {self.epoch}/{cfg.epochs}", show)
        check_every = 1 if self.xp is np else 50  # host syncs on the GPU only every so often
        t0 = time.perf_counter()
        pending = []

        def flush():  # move losses to the host, check them, add them up
            for b, o in pending:
                loss = float(o.loss)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at epoch {self.epoch}, step {self.step + 1}; "
                        f"try a smaller --lr (now {cfg.lr}); the last good checkpoint is kept"
                    )
                self.stats.add(b, loss, float(o.recon), float(o.kl))
            pending.clear()
            bar.update(min(self.step * bs, n), self.stats.loss / max(self.stats.n, 1))

        step_fn = self.step_fn
        try:
            step_fn.open()  # helper threads, BLAS on one thread each, until the epoch ends
            while self.step < n_steps:
                idx = self.perm[self.step * bs : (self.step + 1) * bs]
                host = self._batch_work.get("x", (len(idx), self.train_x.shape[1]), model.dtype)  # reused
                xb = D.to_float_batch(self.train_x[idx], cfg.binarize, self.data_rng, model.dtype, out=host)
                xb = to_device(xb, self.xp)
                beta = cfg.beta_at((self.epoch - 1) * n_steps + self.step, n_steps)
                pending.append((len(idx), step_fn._step(xb, beta)))  # loss and gradient, then the update
                if len(pending) >= check_every or self.step == n_steps - 1:
                    flush()
                self.step += 1
                interrupted = stop()
                if interrupted or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    flush()
                    if self.step < n_steps:
                        self.stats.seconds += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        self.save()
                if interrupted:
                    raise _Interrupted
        finally:
            step_fn.close()
            self.stats.seconds += time.perf_counter() - t0
            bar.close()
        s = self.stats
        return {"train_loss": s.loss / s.n, "train_recon": s.recon / s.n, "train_kl": s.kl / s.n,
                "beta": cfg.beta_at(self.epoch * n_steps - 1, n_steps),  # the KL weight of the epoch's last step
                "seconds": s.seconds, "examples_per_s": s.n / max(s.seconds, 1e-9)}  # fmt: skip

    def run(self) -> list:
        """Train to ``cfg.epochs``; returns the per-epoch metrics."""
        cfg = self.cfg
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # it, or a folder above it, is a file
            raise OSError(f"cannot create the run folder {self.out} ({exc.strerror or exc})") from None
        orphans = remove_orphans(self.out, ours=lambda name: name in (CHECKPOINT, METRICS) or name.endswith(".png"))
        if orphans:
            self.log(f"removed what a killed write left behind in {self.out}: {', '.join(orphans)}")
        if cfg.resume:
            if (self.out / CHECKPOINT).exists():
                self.restore()
                self.log(f"resuming {self.out} at epoch {self.epoch}, step {self.step} "
                         f"(steps on {self.step_fn.threads} thread{'s' if self.step_fn.threads > 1 else ''})")
                if self.xp is not np:
                    self.log("note: on the GPU the noise generator restarts from the seed, so the resumed run "
                             "is equivalent but not bitwise identical to an uninterrupted one")  # fmt: skip
            else:
                self.log(f"no checkpoint in {self.out}; starting a new run")
        elif (self.out / CHECKPOINT).exists():
            self.log(f"note: {self.out / CHECKPOINT} exists and will be overwritten (use --resume to continue it)")
        self._write_metrics()
        objective = f"iwae k={cfg.k}" if cfg.objective == "iwae" else f"elbo beta={cfg.beta}"
        if cfg.kl_warmup:
            objective += f" after a {cfg.kl_warmup}-epoch warm-up from 0"
        self.log(
            f"training {self.model.n_params:,} parameters "
            f"({cfg.latent}-d latent, hidden {','.join(map(str, cfg.hidden))}, {cfg.activation}, {cfg.likelihood}) "
            f"on {len(self.train_x):,} images, {objective}, {backend_name(self.xp)}/{cfg.dtype}, out {self.out}"
        )
        interrupted = []
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            interrupted.append(True)

        try:
            signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            previous = None
        try:
            while self.epoch <= cfg.epochs:
                try:
                    # Overflow shows up as a non-finite loss, reported with its epoch and step.
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        metrics = self.train_epoch(lambda: bool(interrupted))
                except _Interrupted:
                    if self.step >= -(-len(self.train_x) // cfg.batch_size):  # stopped after the last step
                        self.save()
                    raise KeyboardInterrupt(
                        f"interrupted at epoch {self.epoch}, step {self.step}; checkpoint saved to "
                        f"{self.out / CHECKPOINT}; resume with the same command plus --resume"
                    ) from None
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    test = evaluate_elbo(self.model, self.test_x, cfg.binarize, cfg.seed)
                if not math.isfinite(test["loss"]):  # the last update broke the model: keep the last checkpoint
                    raise TrainingDiverged(
                        f"test loss became {test['loss']} at the end of epoch {self.epoch}, step {self.step}; "
                        f"try a smaller --lr (now {cfg.lr}); the last good checkpoint is kept"
                    )
                row = {"epoch": self.epoch, **metrics, "test_loss": test["loss"],
                       "recon": test["recon"], "kl": test["kl"]}  # fmt: skip
                self.history.append(row)
                self.log(
                    f"epoch {self.epoch:3d}/{cfg.epochs}  train {row['train_loss']:8.3f}  "
                    f"test {row['test_loss']:8.3f} (recon {row['recon']:7.3f} + kl {row['kl']:6.3f})  "
                    f"{row['seconds']:6.1f} s  {row['examples_per_s']:8.0f} ex/s"
                )
                self.epoch, self.step, self.perm = self.epoch + 1, 0, None
                self.stats = EpochStats()
                self.save()
                self._write_metrics()
                self.notes = self.pictures()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.history

    def _write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history (so a resumed run never duplicates an epoch)."""
        text = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write(self.out / METRICS, lambda f: f.write(text.encode("utf-8")))

    # ---------------------------------------------------------------- pictures

    def pictures(self) -> list:
        """Write samples, reconstructions, loss curves (and the 2-D latent pictures); returns notes."""
        return write_pictures(self.model, self.out, self.test_x, self.test_y, self.history, self.cfg)


def write_pictures(model, out, test_x, test_y, history, cfg) -> list:
    """The run folder's pictures; returns notes on how plots were rendered."""
    out = Path(out)
    rng = Generator(cfg.seed, model.xp, stream=STREAM_PICTURES)
    images.save_grid(out / "samples.png", model.sample(100, rng=rng), ncols=10)
    x = next(batches_of(test_x[:40], model, cfg.binarize, Generator(cfg.seed, np, stream=STREAM_EVAL_DATA), 40))
    images.save_reconstructions(out / "reconstructions.png", x, model.reconstruct(x), ncols=10)
    notes = []
    if history:
        series = {"train (objective)": [r["train_loss"] for r in history],
                  "test (negative ELBO)": [r["test_loss"] for r in history]}  # fmt: skip
        notes.append(images.plot_curves(out / "loss.png", series, title="loss per example"))
    if model.latent_dim == 2:
        n = 20
        images.save_grid(out / "manifold.png", model.decode(images.latent_grid(n)), ncols=n)
        xs = to_device(test_x[:5000].astype(model.dtype) / 255, model.xp)
        codes = to_numpy(model.encode(xs)[0])
        notes.append(images.plot_latent(out / "latent.png", codes, test_y[:5000], title="test codes (mean of q)"))
    return notes


def train(cfg: TrainConfig, log=print) -> list:
    """Run :class:`Run` for ``cfg``; returns the per-epoch metrics."""
    run = Run(cfg, log=log)
    history = run.run()
    notes = run.notes if run.notes is not None else run.pictures()  # none yet if no epoch was left to run
    for note in sorted(set(notes)):
        if note and not note.startswith("matplotlib"):
            log(f"plots rendered with {note}")
    return history
