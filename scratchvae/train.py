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
from .backend import Generator, backend_name, get_xp, to_device, to_numpy
from .checkpoint import CheckpointError, load_checkpoint, restore_model, save_checkpoint
from .evaluate import iwae_bound
from .model import VAE
from .optim import OPTIMIZERS

STREAM_DATA, STREAM_EVAL = 2, 3  # generator streams of the run's seed (0, 1 belong to the model)
CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the epoch and step."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI's ``train`` flags)."""

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
    backend: str | None = None
    dtype: str = "float32"
    seed: int = 0
    out: str = "runs/mnist"
    resume: bool = False
    train_size: int | None = None
    test_size: int | None = None
    checkpoint_every: int = 0  # also save every N steps inside an epoch (0: only at epoch ends)
    progress: bool | None = None  # None: show a progress line when stderr is a terminal

    # Fields that must agree between a run and its resumption.
    RESUME_KEYS = (
        "batch_size", "lr", "optimizer", "hidden", "latent", "activation", "init", "likelihood",
        "binarize", "dtype", "seed", "train_size", "test_size",
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


# ------------------------------------------------------------------------------------------
# Data: uint8 images -> float minibatches on the model's device.
# ------------------------------------------------------------------------------------------


def prepare_mnist(cfg: TrainConfig):
    """Load MNIST (uint8), slice to ``train_size``/``test_size``, threshold once for ``static``."""
    mnist = D.load_mnist(cfg.data_dir)
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

    The noise and dynamic binarization come from a generator seeded by
    ``seed`` alone, so the number is the same whenever it is computed.
    """
    rng_data = Generator(seed, np, stream=STREAM_EVAL)
    rng_eps = Generator(seed, model.xp, stream=STREAM_EVAL)
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
    rng_data = Generator(seed, np, stream=STREAM_EVAL)
    rng_eps = Generator(seed, model.xp, stream=STREAM_EVAL + 1)
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
        self.data_rng = Generator(cfg.seed, np, stream=STREAM_DATA)
        self.epoch, self.step = 1, 0  # next epoch to run (1-based) and next step within it
        self.perm = None
        self.stats = EpochStats()
        self.history = []

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        meta = {
            "model": self.model.config(),
            "train": self.cfg.to_json(),
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": {"name": self.cfg.optimizer, "t": self.opt.t},
            "rng": {"noise": self.model.rng.get_state(), "data": self.data_rng.get_state()},
            "stats": dataclasses.asdict(self.stats),
            "history": self.history,
        }
        arrays = {f"opt_{k}": v for k, v in self.opt.state_dict().items() if k != "t"}
        if self.perm is not None:
            arrays["perm"] = self.perm
        return save_checkpoint(self.out / CHECKPOINT, self.model.params, meta, arrays)

    def restore(self) -> None:
        path = self.out / CHECKPOINT
        ckpt = load_checkpoint(path)
        saved = ckpt.meta.get("train", {})
        now = self.cfg.to_json()
        diff = [k for k in TrainConfig.RESUME_KEYS if saved.get(k) != now.get(k)]
        if diff:
            pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
            raise CheckpointError(f"cannot resume from {path}: the configuration differs ({pairs})")
        model = restore_model(ckpt, backend=backend_name(self.xp))
        if model.params.shape != self.model.params.shape:
            raise CheckpointError(f"cannot resume from {path}: the model has a different size")
        try:
            self.model.params[...] = model.params
            state = {k[4:]: to_device(v, self.xp) for k, v in ckpt.arrays.items() if k.startswith("opt_")}
            state["t"] = ckpt.meta["optimizer"]["t"]
            self.opt.load_state_dict(state)
            self.model.rng.set_state(ckpt.meta["rng"]["noise"])
            self.data_rng.set_state(ckpt.meta["rng"]["data"])
            self.epoch, self.step = int(ckpt.meta["epoch"]), int(ckpt.meta["step"])
            self.perm = ckpt.arrays.get("perm")
            self.stats = EpochStats(**ckpt.meta["stats"])
            self.history = list(ckpt.meta["history"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is missing training state ({exc})") from None
        if self.step and (self.perm is None or self.perm.shape != (len(self.train_x),)):
            raise CheckpointError(f"checkpoint {path} has no usable data order for its mid-epoch position")

    # ---------------------------------------------------------------- training

    def train_epoch(self, stop) -> dict:
        """Run (the rest of) the current epoch; returns its metrics dict."""
        cfg, model, opt = self.cfg, self.model, self.opt
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

        try:
            while self.step < n_steps:
                idx = self.perm[self.step * bs : (self.step + 1) * bs]
                xb = to_device(D.to_float_batch(self.train_x[idx], cfg.binarize, self.data_rng, model.dtype), self.xp)
                pending.append((len(idx), model._loss_and_grad(xb)))
                if len(pending) >= check_every or self.step == n_steps - 1:
                    flush()
                opt.step()
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
            self.stats.seconds += time.perf_counter() - t0
            bar.close()
        s = self.stats
        return {"train_loss": s.loss / s.n, "train_recon": s.recon / s.n, "train_kl": s.kl / s.n,
                "seconds": s.seconds, "examples_per_s": s.n / max(s.seconds, 1e-9)}  # fmt: skip

    def run(self) -> list:
        """Train to ``cfg.epochs``; returns the per-epoch metrics."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            if (self.out / CHECKPOINT).exists():
                self.restore()
                self.log(f"resuming {self.out} at epoch {self.epoch}, step {self.step}")
            else:
                self.log(f"no checkpoint in {self.out}; starting a new run")
        elif (self.out / CHECKPOINT).exists():
            self.log(f"note: {self.out / CHECKPOINT} exists and will be overwritten (use --resume to continue it)")
        self._write_metrics()
        self.log(
            f"training {self.model.n_params:,} parameters "
            f"({cfg.latent}-d latent, hidden {','.join(map(str, cfg.hidden))}, {cfg.activation}, {cfg.likelihood}) "
            f"on {len(self.train_x):,} images, {backend_name(self.xp)}/{cfg.dtype}, out {self.out}"
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
                test = evaluate_elbo(self.model, self.test_x, cfg.binarize, cfg.seed)
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
                self.pictures()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.history

    def _write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history (so a resumed run never duplicates an epoch)."""
        path = self.out / METRICS
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
        tmp.replace(path)

    # ---------------------------------------------------------------- pictures

    def pictures(self) -> list:
        """Write samples, reconstructions, loss curves (and the 2-D latent pictures); returns notes."""
        return write_pictures(self.model, self.out, self.test_x, self.test_y, self.history, self.cfg)


def write_pictures(model, out, test_x, test_y, history, cfg) -> list:
    """The run folder's pictures; returns notes on how plots were rendered."""
    out = Path(out)
    rng = Generator(cfg.seed, model.xp, stream=STREAM_EVAL + 2)
    images.save_grid(out / "samples.png", model.sample(100, rng=rng), ncols=10)
    x = next(batches_of(test_x[:40], model, cfg.binarize, Generator(cfg.seed, np, stream=STREAM_EVAL), 40))
    images.save_reconstructions(out / "reconstructions.png", x, model.reconstruct(x), ncols=10)
    notes = []
    if history:
        series = {"train": [r["train_loss"] for r in history], "test": [r["test_loss"] for r in history]}
        notes.append(images.plot_curves(out / "loss.png", series, title="negative ELBO per example"))
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
    notes = run.pictures()
    for note in sorted(set(notes)):
        if note and not note.startswith("matplotlib"):
            log(f"plots rendered with {note}")
    return history
