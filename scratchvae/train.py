"""Training a VAE on a data set: minibatches, per-epoch metrics, checkpoints, pictures, exact resume.

:func:`train` is what ``scratchvae train`` runs, and
:class:`scratchvae.estimator.VAEEstimator` runs the same :class:`Run` on
arrays. The data are a :class:`~scratchvae.datasets.Dataset` (MNIST, a file,
or arrays). One epoch is one pass over the training rows in an order drawn
from the run's data generator; each minibatch is converted to floats (and
binarized) on its own, so no float copy of ``uint8`` data is ever held, and
handed to an engine (:mod:`scratchvae.engines`) for the loss, the gradient
and the update.

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data as D
from . import datasets
from . import images
from .backend import backend_name, get_xp, to_device, to_numpy
from .checkpoint import CheckpointError, load_checkpoint, optimizer_state, restore_model, save_checkpoint
from .engines import ENGINES, engine_name, make_engine
from .evaluate import evaluate_elbo
from .files import FolderLock, atomic_write, remove_stale_temporaries
from .model import VAE
from .optim import OPTIMIZERS
from .rng import STREAM_DATA, STREAM_EVAL_DATA, STREAM_PICTURES, Generator
from .validate import OBJECTIVES, check_int_range, check_k, check_number, check_positive_int

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"


PICTURES = ("samples.png", "reconstructions.png", "loss.png", "manifold.png", "latent.png", "samples.npy",
            "reconstructions.npy")  # what write_pictures may write


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the epoch and step."""


class RunFolderUsed(ValueError):
    """``out`` already holds a run, and neither ``resume`` nor ``overwrite`` was asked for."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a step boundary, after saving it.

    ``signum`` is the signal, ``epoch`` and ``step`` the position saved in
    ``checkpoint`` (the path), from which ``resume`` continues exactly.
    """

    def __init__(self, signum: int, epoch: int, step: int, checkpoint):
        super().__init__(f"interrupted at epoch {epoch}, step {step}; checkpoint saved to {checkpoint}")
        self.signum, self.epoch, self.step, self.checkpoint = signum, epoch, step, checkpoint


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

    data_dir: str | None = None  # MNIST's folder (when ``data`` is None)
    data: str | None = None  # a .npy/.npz file or a folder of IDX files (scratchvae.datasets.load_file)
    validation: float = 0.1  # the fraction held out as the test set when the data have none
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    hidden: tuple = (400,)
    latent_dim: int = 20
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
    out: str | None = "runs/mnist"  # None: nothing is written (the estimator's default)
    resume: bool = False
    overwrite: bool = False  # start over in an ``out`` that holds a run (its files are deleted)
    train_size: int | None = None
    test_size: int | None = None
    checkpoint_every: int = 0  # also save every N steps inside an epoch (0: only at epoch ends)
    engine: str = "auto"  # how a step runs (scratchvae.engines): auto, reference, cpu or gpu
    threads: int | None = None  # threads of the cpu engine's steps (None: one per CPU, at most 8)

    # Fields that must agree between a run and its resumption.
    RESUME_KEYS = (
        "batch_size", "lr", "optimizer", "hidden", "latent_dim", "activation", "init", "likelihood",
        "binarize", "dtype", "seed", "train_size", "test_size", "objective", "k", "beta", "kl_warmup",
        "validation",
    )  # fmt: skip

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible value."""
        for name in ("epochs", "batch_size", "latent_dim"):
            check_positive_int(getattr(self, name), name)
        for name in ("train_size", "test_size", "threads"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), name)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.binarize not in D.BINARIZE:
            raise ValueError(f"unknown binarize {self.binarize!r}; choose one of {', '.join(D.BINARIZE)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.data is not None and self.data_dir is not None:
            raise ValueError(f"data_dir (--data-dir) is MNIST's folder and data (--data) another data set: give one "
                             f"of them, not both (got {self.data_dir!r} and {self.data!r})")  # fmt: skip
        if not (isinstance(self.validation, (float, np.floating)) and 0 < self.validation < 1):
            raise ValueError(f"validation must be a fraction between 0 and 1, got {self.validation!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite deletes it and starts over")
        check_int_range("seed", self.seed, 0)
        check_int_range("checkpoint_every", self.checkpoint_every, 0)
        check_int_range("kl_warmup", self.kl_warmup, 0)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        check_k(self.k)
        if isinstance(self.beta, bool) or not (
            isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0
        ):
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")
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


def training_state(meta: dict, n: int, batch_size: int):
    """``(epoch, step, stats, history)`` from a checkpoint's metadata, checked against the run.

    With ``n`` images in batches of ``batch_size`` an epoch has
    ``ceil(n / batch_size)`` steps; at step ``s`` of epoch ``e`` the running
    sums cover ``min(s * batch_size, n)`` images and the history holds one row
    for each of epochs ``1 .. e-1``. Raises ``KeyError``, ``TypeError`` or
    ``ValueError`` naming what does not fit.
    """
    n_steps = -(-n // batch_size)
    epoch = check_int_range("epoch", meta["epoch"], 1)
    step = check_int_range("step", meta["step"], 0, n_steps)
    check_int_range("optimizer t", meta["optimizer"]["t"], 0)
    stats = EpochStats(**meta["stats"])
    covered = min(step * batch_size, n)
    if check_int_range("stats n", stats.n, 0) != covered:
        raise ValueError(f"stats cover {stats.n} images, but step {step} in batches of {batch_size} means {covered}")
    for name in ("loss", "recon", "kl", "seconds"):
        check_number(f"stats {name}", getattr(stats, name))
    history = meta["history"]
    if (
        not isinstance(history, list) or len(history) != epoch - 1
        or [row.get("epoch") if isinstance(row, dict) else row for row in history] != list(range(1, epoch))
    ):  # fmt: skip
        raise ValueError(f"history must hold one row for each of epochs 1..{epoch - 1}")
    for row in history:
        for key in ("train_loss", "test_loss"):
            check_number(f"history {key}", row[key])
    return epoch, step, stats, history


def renamed_test_keys(row: dict) -> dict:
    """A metrics row with the test parts named ``test_recon``, ``test_kl`` (``recon``, ``kl`` before)."""
    row = dict(row)
    for old, new in (("recon", "test_recon"), ("kl", "test_kl")):
        if old in row and new not in row:
            row[new] = row.pop(old)
    return row


def is_permutation(perm, n: int) -> bool:
    """Whether ``perm`` is an integer array holding each of ``0 .. n-1`` once."""
    return (
        isinstance(perm, np.ndarray) and perm.shape == (n,) and perm.dtype.kind in "iu"
        and np.array_equal(np.sort(perm), np.arange(n))
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig) -> datasets.Dataset:
    """The run's data: ``cfg.data`` (a file or IDX folder) or MNIST, cut and checked (:func:`~scratchvae.datasets.prepare`).

    A size larger than the set is a ``ValueError``, not silently the whole set.
    """
    if cfg.data is not None:
        ds = datasets.load_file(cfg.data, validation=cfg.validation, seed=cfg.seed)
    else:
        ds = datasets.load_mnist_dataset(cfg.data_dir)
    return ds


# ------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def describe_run(out: Path) -> str | None:
    """What run ``out`` holds, in words (``"1 of 10 epochs done, checkpoint at epoch 2, step 17"``), or None if none."""
    metrics, checkpoint = out / METRICS, out / CHECKPOINT
    try:
        done = len(metrics.read_text(encoding="utf-8", errors="replace").splitlines())
    except OSError:
        done = 0
    if not done and not checkpoint.exists():
        return None
    try:
        meta = load_checkpoint(checkpoint).meta
        epoch, step, total = int(meta["epoch"]), int(meta["step"]), int(meta["train"]["epochs"])
    except (CheckpointError, KeyError, TypeError, ValueError, OverflowError):
        unreadable = f", and a {CHECKPOINT} that cannot be read" if checkpoint.exists() else ""
        return f"{done} epoch{'s' if done != 1 else ''} in {METRICS}{unreadable}"
    said = f"{epoch - 1} of {total} epochs done"
    return said + (f", checkpoint at epoch {epoch}, step {step}" if step else "")


@contextlib.contextmanager
def _signals_set_flag():
    """While inside, SIGINT and SIGTERM append their number to the yielded list instead of stopping the process.

    The trainer checks the list at every step boundary, saves, and raises
    :class:`Interrupted`. Outside the main thread (where handlers cannot be
    set) the signals keep their handlers.
    """
    signalled = []
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # an ignore inherited from the caller stays
                previous[signum] = signal.signal(signum, lambda num, frame: signalled.append(num))
    except ValueError:  # not the main thread
        pass
    try:
        yield signalled
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class Run:
    """A training run in a folder: model, optimiser, engine, generators, position; saves and restores them.

    ``dataset``: a :class:`~scratchvae.datasets.Dataset` to train on
    (default: :func:`load_data` of ``cfg``). With ``cfg.out = None`` nothing
    is written (no folder, checkpoint, metrics or pictures), and ``resume``
    is impossible; the finiteness checks still stop a diverging run.
    ``log(line)`` receives one line per event (default :func:`print`).
    ``progress(total, description)``, when given, makes a progress display
    for an epoch: an object with ``update(done, loss)`` and ``close()`` (the
    command line's :class:`scratchvae.cli.Progress`).
    """

    def __init__(self, cfg: TrainConfig, log=print, progress=None, dataset=None):
        cfg.validate()
        self.cfg, self.log, self.progress = cfg, log, progress
        self.started = time.time()  # temporary files older than this were left by earlier runs
        self.out = None if cfg.out is None else Path(cfg.out)
        if self.out is None and cfg.resume:
            raise ValueError("resume needs the run folder (out) to resume from")
        self.xp = get_xp(cfg.backend)
        self.data = datasets.prepare(
            load_data(cfg) if dataset is None else dataset, likelihood=cfg.likelihood, binarize=cfg.binarize,
            train_size=cfg.train_size, test_size=cfg.test_size,
        )  # fmt: skip
        self.train_x, self.test_x = self.data.train, self.data.test
        self.model = VAE(
            self.train_x.shape[1], hidden=cfg.hidden, latent_dim=cfg.latent_dim, likelihood=cfg.likelihood,
            activation=cfg.activation, init=cfg.init, backend=backend_name(self.xp), dtype=cfg.dtype, seed=cfg.seed,
        )  # fmt: skip
        self.opt = OPTIMIZERS[cfg.optimizer](self.model, lr=cfg.lr)
        self._engine, self._engine_key = None, None
        self._threads = cfg.threads  # None: the default, or on --resume the count the checkpoint was written with
        self.data_rng = Generator(cfg.seed, np, stream=STREAM_DATA)
        self.epoch, self.step = 1, 0  # next epoch to run (1-based) and next step within it
        self.perm = None
        self.stats = EpochStats()
        self.history = []
        self.notes = None  # how the last pictures were rendered (see write_pictures)
        self._batch = None  # the host float buffer each minibatch is converted into, kept across steps
        self._data_meta = None  # see data_meta
        self._device = {}  # the training set, the epoch's order and a batch buffer on the device (device_batch)
        _ = self.engine  # an engine that cannot run this model says so now, before anything is written

    @property
    def engine(self):
        """The engine of the training steps (rebuilt when ``opt`` or the thread count changes)."""
        key = (self.opt, self._threads)
        if self._engine is None or self._engine_key != key:
            cfg = self.cfg  # a thread count read from a checkpoint applies to the cpu engine only
            threads = self._threads if engine_name(cfg.engine, self.model) == "cpu" else cfg.threads
            self._engine = make_engine(
                cfg.engine, self.model, self.opt, objective=cfg.objective, k=cfg.k, threads=threads
            )
            self._engine_key = key
        return self._engine

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write the checkpoint; NaN or inf in the parameters or the optimiser's state raise ``TrainingDiverged`` and keep the last good one.

        (Adam's second moment overflows to inf when gradients pass about
        1e19 in float32; the parameters then stop moving but stay finite, so
        the loss alone would not show it.)
        """
        opt_state = {f"opt_{k}": v for k, v in self.opt.state_dict().items() if k != "t"}  # live arrays
        # (with no folder to save to, the finiteness checks below still run)
        for what, checked in (("parameters", [self.model.params]), ("optimiser's state", opt_state.values())):
            if not all(bool(self.xp.isfinite(a).all()) for a in checked):
                raise TrainingDiverged(
                    f"the {what} became NaN or inf (checkpoint at epoch {self.epoch}, step {self.step} not written); "
                    f"try a smaller --lr (now {self.cfg.lr}); the last good checkpoint is kept"
                )
        if self.out is None:
            return None
        meta = {
            "model": self.model.config(),
            "train": self.cfg.to_json(),
            "data": self.data_meta(),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": {"name": self.cfg.optimizer, "t": self.opt.t},
            "step_threads": self.engine.threads,  # a resumed run splits its steps the same way
            "rng": {"noise": self.model.rng.get_state(), "data": self.data_rng.get_state()},
            "stats": dataclasses.asdict(self.stats),
            "history": self.history,
        }
        arrays = dict(opt_state)
        if self.perm is not None:
            arrays["perm"] = self.perm
        return save_checkpoint(self.out / CHECKPOINT, self.model.params, meta, arrays)

    def data_meta(self) -> dict:
        """What a checkpoint records of the data: where from, the shape of an example, a fingerprint of the training rows."""
        if self._data_meta is None:
            ds = self.data
            self._data_meta = {
                "source": ds.source,
                "path": None if self.cfg.data is None else str(Path(self.cfg.data).resolve()),
                "image_shape": None if ds.image_shape is None else list(ds.image_shape),
                "input_dim": ds.dim,
                "uint8": bool(ds.train.dtype == np.uint8),
                "split": ds.split,
                "fingerprint": ds.fingerprint(),
            }
        return self._data_meta

    def restore(self) -> None:
        path = self.out / CHECKPOINT
        ckpt = load_checkpoint(path)
        saved = ckpt.meta.get("train")
        if not isinstance(saved, dict):
            raise CheckpointError(f"cannot resume from {path}: it holds no training configuration")
        # a checkpoint from before the objective fields existed was trained with their defaults
        saved = {"objective": "elbo", "k": 1, "beta": 1.0, "kl_warmup": 0, "validation": 0.1, **saved}
        if "latent_dim" not in saved and "latent" in saved:  # the field's name before format version 3
            saved["latent_dim"] = saved["latent"]
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
        data = ckpt.meta.get("data")
        fingerprint = data.get("fingerprint") if isinstance(data, dict) else None  # absent before format 3's data record
        if fingerprint is not None and fingerprint != self.data_meta()["fingerprint"]:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained on other data than {self.data.source} "
                f"(its training rows were {data.get('source')!r} with another fingerprint)"
            )
        try:  # check everything before taking any of it
            epoch, step, stats, history = training_state(ckpt.meta, len(self.train_x), self.cfg.batch_size)
            history = [renamed_test_keys(row) for row in history]
            state = {k: to_device(v, self.xp) for k, v in optimizer_state(ckpt, self.opt).items()}
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
            try:  # absent (written before steps were split) or not a count: the default
                self._threads = min(check_positive_int(ckpt.meta.get("step_threads"), "step_threads"), 1024)
            except ValueError:
                pass

    # ---------------------------------------------------------------- training

    def train_epoch(self, stop) -> dict:
        """Run (the rest of) the current epoch; returns its metrics dict."""
        cfg, model = self.cfg, self.model
        n, bs = len(self.train_x), cfg.batch_size
        n_steps = -(-n // bs)
        if self.step == 0:
            self.perm = self.data_rng.permutation(n)
            self.stats = EpochStats()
        bar = self.progress(n, f"epoch {self.epoch}/{cfg.epochs}") if self.progress else None
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
            if bar:
                bar.update(self.stats.n, self.stats.loss / max(self.stats.n, 1))  # the examples done so far

        engine = self.engine
        try:
            while self.step < n_steps:
                first, end = self.step * bs, min((self.step + 1) * bs, n)  # (stop is the interruption check)
                if self.data_on_device:
                    xb = self.device_batch(first, end)
                else:
                    idx = self.perm[first:end]
                    xb = D.rows_to_float(self.train_x[idx], cfg.binarize, self.data_rng, model.dtype,
                                         out=self._buffer(len(idx)))  # fmt: skip
                    xb = to_device(xb, self.xp)
                beta = cfg.beta_at((self.epoch - 1) * n_steps + self.step, n_steps)
                # loss and gradient, then the update; the batch came from data checked once, up front
                pending.append((end - first, engine.step(xb, beta, check_input=False)))
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
            engine.close()  # helper threads stop, BLAS gets its threads back for the evaluation
            self.stats.seconds += time.perf_counter() - t0
            if bar:
                bar.close()
        s = self.stats
        return {"train_loss": s.loss / s.n, "train_recon": s.recon / s.n, "train_kl": s.kl / s.n,
                "beta": cfg.beta_at(self.epoch * n_steps - 1, n_steps),  # the KL weight of the epoch's last step
                "seconds": s.seconds, "examples_per_s": s.n / max(s.seconds, 1e-9)}  # fmt: skip

    @property
    def data_on_device(self) -> bool:
        """Whether batches are gathered on the device: the gpu engine's, unless binarization is dynamic.

        (Dynamic binarization draws from the host generator that checkpoints keep.)
        """
        return self.xp is not np and self.engine.name == "gpu" and self.cfg.binarize != "dynamic"

    def device_batch(self, start, stop):
        """Rows ``perm[start:stop]`` of the training set as floats, gathered and converted on the model's device.

        The training set is copied to the device once (``uint8`` stays
        ``uint8``), the epoch's order once per epoch; a step then copies
        nothing from the host, so it never waits for the GPU. The floats are
        those of the host path (:func:`~scratchvae.data.rows_to_float`).
        """
        xp, kept = self.xp, self._device
        if kept.get("train") is None:
            kept["train"] = xp.asarray(self.train_x)
        if kept.get("perm_of") is not self.perm:
            kept["perm"], kept["perm_of"] = xp.asarray(self.perm), self.perm
        rows = kept["train"][kept["perm"][start:stop]]
        out = kept.get("batch")
        if out is None or out.shape != rows.shape:
            out = kept["batch"] = xp.empty(rows.shape, dtype=self.model.dtype)
        return D.rows_to_float(rows, self.cfg.binarize, None, self.model.dtype, out=out)

    def _buffer(self, rows):
        """The kept host buffer a minibatch of ``rows`` images is converted into."""
        shape = (rows, self.train_x.shape[1])
        if self._batch is None or self._batch.shape != shape:
            self._batch = np.empty(shape, dtype=self.model.dtype)
        return self._batch

    def run(self) -> list:
        """Train to ``cfg.epochs`` holding the run folder's lock; returns the per-epoch metrics.

        Raises :class:`RunFolderUsed` if ``out`` holds a run and neither
        ``resume`` nor ``overwrite`` is set, :class:`~scratchvae.files.FolderBusy`
        if another process trains there now, and :class:`Interrupted` after
        saving, when SIGINT or SIGTERM arrives (at the next step boundary).
        """
        if self.out is None:  # nothing to save, so Ctrl-C stops it as it stops any Python code
            self.log(datasets.describe(self.data))
            self._train([])
            return self.history
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # it, or a folder above it, is a file
            raise OSError(f"cannot create the run folder {self.out} ({exc.strerror or exc})") from None
        with FolderLock(self.out, "training run"):
            self._start()
            with _signals_set_flag() as signalled:
                try:
                    self._train(signalled)
                    if self.notes is None:  # no epoch was left to run: the pictures of the model as it is
                        self.notes = self.pictures()
                finally:  # dropped while signals only set a flag: its clean-up is never cut short by one
                    self._engine = None
        return self.history

    def _start(self) -> None:
        """Clean up after killed writes, then restore (``resume``), refuse a used folder, or clear it (``overwrite``)."""
        cfg = self.cfg
        ours = lambda name: name in (CHECKPOINT, METRICS, *PICTURES)  # noqa: E731
        stale = remove_stale_temporaries(self.out, ours, before=self.started)
        if stale:
            self.log(f"removed what a killed write left behind in {self.out}: {', '.join(stale)}")
        used = describe_run(self.out)
        if cfg.resume:
            if (self.out / CHECKPOINT).exists():
                self.restore()
                self.log(f"resuming {self.out} at epoch {self.epoch}, step {self.step} "
                         f"(steps on {self.engine.threads} thread{'s' if self.engine.threads > 1 else ''})")
                if self.xp is not np and self.engine.name != "gpu":
                    self.log("note: on the GPU the noise generator restarts from the seed, so the resumed run "
                             "is equivalent but not bitwise identical to an uninterrupted one")  # fmt: skip
            elif used:  # metrics without a checkpoint: nothing to continue from, and something to lose
                raise RunFolderUsed(
                    f"{self.out} holds a run ({used}) but no {CHECKPOINT} to resume from; start over with "
                    "--overwrite (which deletes it), or choose another --out"
                )
            else:
                self.log(f"no checkpoint in {self.out}; starting a new run")
        elif used and not cfg.overwrite:
            raise RunFolderUsed(
                f"{self.out} already holds a run ({used}); continue it with --resume, start over with --overwrite "
                "(which deletes it), or choose another --out"
            )
        elif used:
            for name in (CHECKPOINT, METRICS, *PICTURES):
                (self.out / name).unlink(missing_ok=True)
            self.log(f"overwriting the run in {self.out} ({used})")
        self._write_metrics()
        self.log(datasets.describe(self.data))

    def _train(self, signalled) -> None:
        """The epochs left: train, evaluate, save, pictures; stops with :class:`Interrupted` when ``signalled``."""
        cfg = self.cfg
        objective = f"iwae k={cfg.k}" if cfg.objective == "iwae" else f"elbo beta={cfg.beta}"
        if cfg.kl_warmup:
            objective += f" after a {cfg.kl_warmup}-epoch warm-up from 0"
        self.log(
            f"training {self.model.n_params:,} parameters "
            f"({cfg.latent_dim}-d latent, hidden {','.join(map(str, cfg.hidden))}, {cfg.activation}, {cfg.likelihood}) "
            f"on {len(self.train_x):,} examples, {objective}, {backend_name(self.xp)}/{cfg.dtype}, "
            f"engine {self.engine.name}" + (f", out {self.out}" if self.out is not None else "")
        )
        if cfg.likelihood != "bernoulli" and self.data.image_shape is not None and cfg.binarize != "dequantize":
            self.log(f"note: the {cfg.likelihood} likelihood is a density: on grey levels in [0, 1] its losses are not "
                     "probabilities and can fall below 0 (a learned variance shrinks on near-constant pixels); "
                     "--binarize dequantize makes them bounds in nats (README: Which likelihood)")  # fmt: skip
        while self.epoch <= cfg.epochs:
            if signalled:  # arrived before the first step, or while the last epoch was evaluated and saved
                self.save()  # (a consistent position: the start of an epoch)
                raise Interrupted(signalled[0], self.epoch, self.step, self.out / CHECKPOINT)
            try:
                # Overflow shows up as a non-finite loss, reported with its epoch and step.
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    metrics = self.train_epoch(lambda: bool(signalled))
            except _Interrupted:
                if self.step >= -(-len(self.train_x) // cfg.batch_size):  # stopped after the last step
                    self.save()
                raise Interrupted(signalled[0], self.epoch, self.step, self.out / CHECKPOINT) from None
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                test = evaluate_elbo(self.model, self.test_x, cfg.binarize, cfg.seed)
            if not math.isfinite(test["loss"]):  # the last update broke the model: keep the last checkpoint
                raise TrainingDiverged(
                    f"test loss became {test['loss']} at the end of epoch {self.epoch}, step {self.step}; "
                    f"try a smaller --lr (now {cfg.lr}); the last good checkpoint is kept"
                )
            row = {"epoch": self.epoch, **metrics, "test_loss": test["loss"],
                   "test_recon": test["recon"], "test_kl": test["kl"]}  # fmt: skip
            self.history.append(row)
            self.log(
                f"epoch {self.epoch:3d}/{cfg.epochs}  train {row['train_loss']:8.3f}  "
                f"test {row['test_loss']:8.3f} (recon {row['test_recon']:7.3f} + kl {row['test_kl']:6.3f})  "
                f"{row['seconds']:6.1f} s  {row['examples_per_s']:8.0f} ex/s"
            )
            self.epoch, self.step, self.perm = self.epoch + 1, 0, None
            self.stats = EpochStats()
            self.save()
            self._write_metrics()
            self.notes = self.pictures()

    def _write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history (so a resumed run never duplicates an epoch)."""
        if self.out is None:
            return
        text = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write(self.out / METRICS, lambda f: f.write(text.encode("utf-8")))

    # ---------------------------------------------------------------- pictures

    def pictures(self) -> list:
        """Write samples, reconstructions, loss curves (and the 2-D latent pictures); returns notes."""
        if self.out is None:
            return []
        return write_pictures(self.model, self.out, self.data, self.history, self.cfg)


def write_pictures(model, out, data, history, cfg) -> list:
    """The run folder's pictures (or arrays, for data that are not images); returns notes on how plots were rendered.

    Image data (``data.image_shape`` set) get ``samples.png`` (100 samples)
    and ``reconstructions.png`` (the first 40 test examples over their
    reconstructions); other data get the same as arrays, ``samples.npy``
    ``(100, D)`` and ``reconstructions.npy`` ``(2, 40, D)`` (originals,
    reconstructions). Always ``loss.png``; for a 2-d latent space
    ``latent.png`` (test codes, coloured by label where there are labels
    0-9) and, for images, ``manifold.png``.
    """
    out = Path(out)
    rng = Generator(cfg.seed, model.xp, stream=STREAM_PICTURES)
    samples = model.sample(100, rng=rng)
    rng_data = Generator(cfg.seed, np, stream=STREAM_EVAL_DATA)
    x = next(D.float_batches(data.test[:40], cfg.binarize, rng_data, 40, model.dtype, model.xp))
    shape = data.image_shape
    if shape is not None:
        images.save_grid(out / "samples.png", samples, ncols=10, shape=shape)
        images.save_reconstructions(out / "reconstructions.png", x, model.reconstruct(x), ncols=10, shape=shape)
    else:
        pairs = np.stack([to_numpy(x), to_numpy(model.reconstruct(x))])
        for name, a in (("samples.npy", to_numpy(samples)), ("reconstructions.npy", pairs)):
            atomic_write(out / name, lambda f, a=a: np.save(f, a))
    notes = []
    if history:
        series = {"train (objective)": [r["train_loss"] for r in history],
                  "test (negative ELBO)": [r["test_loss"] for r in history]}  # fmt: skip
        notes.append(images.plot_curves(out / "loss.png", series, title="loss per example"))
    if model.latent_dim == 2:
        if shape is not None:
            n = 20
            images.save_grid(out / "manifold.png", model.decode(images.latent_grid(n)), ncols=n, shape=shape)
        xs = next(D.float_batches(data.test[:5000], "none", None, 5000, model.dtype, model.xp))
        codes = to_numpy(model.encode(xs)[0])
        labels = data.test_labels
        if labels is None or labels.min() < 0 or labels.max() > 9:
            labels = np.zeros(len(data.test), dtype=np.int64)  # one colour
        notes.append(images.plot_latent(out / "latent.png", codes, labels[:5000], title="test codes (mean of q)"))
    return notes


def train(cfg: TrainConfig, log=print, progress=None) -> list:
    """Run :class:`Run` for ``cfg`` (``log`` and ``progress`` as there); returns the per-epoch metrics."""
    run = Run(cfg, log=log, progress=progress)
    history = run.run()
    for note in sorted(set(run.notes)):
        if note and not note.startswith("matplotlib"):
            log(f"plots rendered with {note}")
    return history
