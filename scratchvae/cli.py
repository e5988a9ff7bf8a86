"""Command line: ``scratchvae train | evaluate | sample`` (also ``python -m scratchvae``).

Errors in the input (flags, data files, checkpoints) print one line,
``scratchvae: error: ...``, and exit with status 2; no traceback. Long work
(an epoch, an importance-weighted evaluation) shows a progress line on
stderr when it is a terminal (:class:`Progress`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from . import __version__

EXIT_USAGE, EXIT_DIVERGED = 2, 1


class UsageError(Exception):
    """A bad flag value; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --epoch is not --epochs: a typo is an error, not a guess
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, status 2 (argparse would print the usage too)
        # argparse quotes what it was given: a value with a line break must not break the line
        raise UsageError("".join(c if c.isprintable() else ascii(c)[1:-1] for c in message))


# ------------------------------------------------------------------ flag value types


def _number_type(convert, minimum, strict: bool, what: str):
    """An argparse type: ``convert(text)``, finite and ``> minimum`` (``strict``) or ``>= minimum``."""

    def parse(text):
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or v < minimum or (strict and v == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what
    return parse


positive_int = _number_type(int, 0, True, "a positive integer")
nonnegative_int = _number_type(int, 0, False, "an integer >= 0")
positive_float = _number_type(float, 0.0, True, "a positive number")
nonnegative_float = _number_type(float, 0.0, False, "a number >= 0")


def fraction(text):
    """A number strictly between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, like 0.1, got {text!r}")
    return v


def layer_sizes(text):
    """``"400"`` -> ``(400,)``, ``"200,200"`` -> ``(200, 200)``; an empty part (``"400,,200"``) is an error."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 400 or 200,200, got {text!r}")
    return sizes


# ------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    from .backend import BACKENDS
    from .data import BINARIZE
    from .engines import ENGINES
    from .layers import ACTIVATIONS
    from .model import LIKELIHOODS
    from .optim import OPTIMIZERS

    p = _Parser(
        prog="scratchvae",
        description="A variational autoencoder from scratch on NumPy/CuPy: train on MNIST or your own data, "
        "evaluate, sample.",
    )
    p.add_argument("--version", action="version", version=f"scratchvae {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a VAE on MNIST or on your own data (--data)",
        description="Train a VAE on MNIST, or on your own data with --data. The defaults reproduce the PyTorch VAE "
        "example: 784-400-20, ReLU, Bernoulli likelihood on grey levels, Adam 1e-3, batch 128, 10 epochs. "
        "The run folder gets metrics.jsonl, checkpoint.npz, samples.png, reconstructions.png, loss.png "
        "(and manifold.png, latent.png for a 2-d latent space); for data that are not images, samples.npy and "
        "reconstructions.npy instead of the picture grids.",
    )
    t.add_argument("--data-dir", default=None, help="folder with the four MNIST IDX files (.gz or raw); "
                   "default: $SCRATCHVAE_DATA, ./data/mnist, the package checkout's data/mnist, then the user cache "
                   "(downloaded there when missing)")  # fmt: skip
    t.add_argument("--data", default=None, metavar="FILE",
                   help="train on this instead of MNIST: a .npy array (n_examples, n_features) or (n, height, width); "
                        "an .npz with arrays train and test (or x_train and x_test; test optional; y_train/y_test "
                        "labels and an image_shape used if present); or a folder of IDX files such as Fashion-MNIST "
                        "or EMNIST. uint8 data are grey levels (scaled by 1/255), other numbers are used as they are. "
                        "Without a test set, --validation of the examples is held out")  # fmt: skip
    t.add_argument("--validation", type=fraction, default=None,
                   help="the fraction of --data held out (drawn with --seed) as the test set when the data have none "
                        "(default 0.1)")  # fmt: skip
    t.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set (default 10)")
    t.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default 128)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam",
                   help="adam (bias-corrected) or sgd (momentum 0.9) (default adam)")  # fmt: skip
    t.add_argument("--hidden", type=layer_sizes, default=(400,),
                   help="hidden layer widths of the encoder, mirrored in the decoder, e.g. 400 or 200,200 (default 400)")  # fmt: skip
    t.add_argument("--latent", type=positive_int, default=20, dest="latent_dim",
                   help="latent dimension J (default 20; 2 adds manifold.png and latent.png)")  # fmt: skip
    t.add_argument("--activation", choices=[a for a in ACTIVATIONS if a != "identity"], default="relu",
                   help="hidden activation (default relu)")  # fmt: skip
    t.add_argument("--init", choices=["fan_in_uniform", "he", "glorot"], default="fan_in_uniform",
                   help="parameter initialisation: fan_in_uniform is U(+-1/sqrt(n_in)), the torch.nn.Linear default "
                        "of the PyTorch example; he: He normal for ReLU hidden layers, Glorot for the rest; "
                        "glorot: Glorot uniform everywhere (default fan_in_uniform)")  # fmt: skip
    t.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli",
                   help="p(x|z): bernoulli from logits, gaussian with unit variance, or gaussian_learned "
                        "with a per-pixel log-variance (default bernoulli)")  # fmt: skip
    t.add_argument("--binarize", choices=BINARIZE, default="none",
                   help="how grey levels become inputs. none: u/255; dynamic: a fresh Bernoulli sample of each "
                        "image every time it is used (standard for reported likelihoods); static: thresholded once; "
                        "dequantize: (u + v)/256 with fresh uniform v, for the gaussian likelihoods on 8-bit images "
                        "(default none)")  # fmt: skip
    t.add_argument("--objective", choices=["elbo", "iwae"], default="elbo",
                   help="elbo: negative ELBO with one sample and the analytic KL (weighted by --beta); "
                        "iwae: negative importance-weighted bound log 1/K sum_k p(x,z_k)/q(z_k|x) with --k "
                        "samples (Burda et al. 2015) (default elbo)")  # fmt: skip
    t.add_argument("--k", type=positive_int, default=1,
                   help="importance samples K per example for --objective iwae (default 1; the elbo takes 1 only)")  # fmt: skip
    t.add_argument("--beta", type=nonnegative_float, default=1.0,
                   help="weight of the KL term of the elbo objective, loss = recon + beta * KL (default 1; "
                        "iwae takes 1 only)")  # fmt: skip
    t.add_argument("--kl-warmup", type=nonnegative_int, default=0, metavar="EPOCHS",
                   help="ramp the KL weight linearly from 0 at the first step to --beta after EPOCHS epochs, "
                        "step by step (default 0: no warm-up; elbo only)")  # fmt: skip
    t.add_argument("--backend", choices=BACKENDS, default=None,
                   help="numpy (CPU), cupy (NVIDIA GPU) or auto; default: $SCRATCHVAE_BACKEND or numpy")  # fmt: skip
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="floating-point type (default float32)")
    t.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every random stream of the run (default 0)")
    t.add_argument("--out", default=None, help="run folder for metrics, checkpoint and pictures (default runs/mnist, "
                   "or runs/NAME for --data NAME.npy)")  # fmt: skip
    t.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run, deleting its checkpoint, metrics and pictures "
                        "(without it, such a folder is refused)")  # fmt: skip
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (give the same flags as the first run); "
                        "on the CPU the result is bitwise identical to an uninterrupted run (it keeps the "
                        "checkpoint's --threads unless given another)")  # fmt: skip
    t.add_argument("--engine", choices=ENGINES, default="auto",
                   help="how a training step runs: reference is the textbook code (loss_and_grad, then the "
                        "optimiser's step), cpu the same arithmetic in kept buffers and in place, split over "
                        "threads (numpy only); gpu fused CUDA kernels with noise that resumes exactly (cupy only; "
                        "new, opt-in); auto is cpu on numpy, reference on cupy. Engines differ by rounding only "
                        "(default auto)")  # fmt: skip
    t.add_argument("--threads", type=positive_int, default=None,
                   help="threads of each training step of the cpu engine: the batch is split over them by rows, "
                        "and BLAS runs on one thread in each (default: one per CPU, at most 8, where numpy's BLAS "
                        "thread count can be set, else 1). --resume keeps the count of the checkpoint. Another "
                        "count changes results by rounding only")  # fmt: skip
    t.add_argument("--train-size", type=positive_int, default=None, help="use only the first N training images")
    t.add_argument("--test-size", type=positive_int, default=None, help="use only the first N test images")
    t.add_argument("--checkpoint-every", type=nonnegative_int, default=0,
                   help="also checkpoint every N steps inside an epoch (default 0: at epoch ends only)")  # fmt: skip
    t.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress line on stderr: auto shows it on a terminal (tqdm if installed) (default auto)")  # fmt: skip

    e = sub.add_parser("evaluate", help="test ELBO and importance-weighted NLL of a checkpoint",
                       description="Evaluate a VAE checkpoint on its test set (MNIST's, or that of the data it was "
                                   "trained on): the ELBO and the importance-weighted bound log 1/K sum_k "
                                   "p(x,z_k)/q(z_k|x), reported as NLL in nats.")  # fmt: skip
    e.add_argument("checkpoint", help="a checkpoint.npz written by train or VAEEstimator.save, or a run folder")
    e.add_argument("--iwae-k", type=positive_int, default=5000,
                   help="importance samples K (default 5000: on all 10,000 MNIST test images that takes about 25 "
                        "minutes on two CPU cores; --n-test 1000 --iwae-k 1000 takes about half a minute)")  # fmt: skip
    e.add_argument("--n-test", type=positive_int, default=None, help="evaluate the first N test images (default all)")
    e.add_argument("--data-dir", default=None, help="folder with the MNIST files (as for train)")
    e.add_argument("--data", default=None, metavar="FILE",
                   help="the data file or IDX folder (as for train) whose test set to use; its held-out split is "
                        "the one train made (default: the file the checkpoint was trained on, else MNIST for 784-d "
                        "models)")  # fmt: skip
    e.add_argument("--backend", choices=BACKENDS, default=None, help="numpy, cupy or auto (as for train)")
    e.add_argument("--batch-size", type=positive_int, default=100, help="test images per IWAE batch (default 100)")
    e.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the evaluation noise (default 0)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    e.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress line on stderr")

    s = sub.add_parser("sample", help="decode samples z ~ N(0, I) from a checkpoint into a PNG grid or a .npy array",
                       description="Draw z ~ N(0, I), decode, and write the means as a PNG grid (image data) or "
                                   "as an array (n, n_features) in a .npy file.")  # fmt: skip
    s.add_argument("checkpoint", help="a checkpoint.npz written by train or VAEEstimator.save, or a run folder")
    s.add_argument("--n", type=positive_int, default=100, help="number of samples (default 100)")
    s.add_argument("--out", default=None,
                   help="file to write: .png for a picture grid (image data only), .npy for the array "
                        "(default samples.png for image data, else samples.npy)")  # fmt: skip
    s.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the prior samples (default 0)")
    s.add_argument("--backend", choices=BACKENDS, default=None, help="numpy, cupy or auto")
    return p


# ------------------------------------------------------------------ progress display


class Progress:
    """A progress line on stderr: tqdm when installed, else a plain updating line.

    ``update(done, loss=None)`` after each piece of work (``done`` out of
    ``total``), ``close()`` at the end (the line is cleared).
    """

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self._bar, self._last, self._t0 = None, 0.0, time.perf_counter()
        try:
            from tqdm import tqdm  # optional

            self._bar = tqdm(total=total, desc=desc, unit="ex", leave=False, file=sys.stderr)
        except ImportError:
            pass

    def update(self, done: int, loss: float | None = None) -> None:
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
        eta = f" ETA {_clock((self.total - done) / rate)}" if 0 < done < self.total else ""
        sys.stderr.write(f"\r{self.desc} [{bar}] {100 * frac:5.1f}%{tail} {rate:8.0f} ex/s{eta}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()


def _clock(seconds: float) -> str:
    """``seconds`` as ``m:ss``, or ``h:mm:ss`` from an hour on."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_factory(flag):
    """``Progress`` for ``--progress on``, or ``auto`` when stderr is a terminal; ``None`` (no display) otherwise."""
    show = sys.stderr.isatty() if flag == "auto" else flag == "on"
    return Progress if show else None


# ------------------------------------------------------------------ commands


def cmd_train(args) -> int:
    from .engines.blas import cpu_count
    from .train import TrainConfig, train

    if args.threads is not None and args.threads > cpu_count():
        raise UsageError(f"--threads {args.threads} is more than the {cpu_count()} CPUs this process may use; "
                         f"give at most {cpu_count()}")  # fmt: skip
    if args.validation is not None and args.data is None:
        raise UsageError("--validation holds out part of --data as a test set; MNIST has a test set of its own")
    cfg = TrainConfig(
        data_dir=args.data_dir, data=args.data, validation=args.validation or 0.1, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, hidden=tuple(args.hidden), latent_dim=args.latent_dim, activation=args.activation,
        init=args.init,
        likelihood=args.likelihood, binarize=args.binarize, objective=args.objective, k=args.k, beta=args.beta,
        kl_warmup=args.kl_warmup, backend=args.backend, dtype=args.dtype,
        seed=args.seed, out=args.out or default_out(args.data), resume=args.resume, overwrite=args.overwrite, train_size=args.train_size,
        test_size=args.test_size, checkpoint_every=args.checkpoint_every, engine=args.engine, threads=args.threads,
    )  # fmt: skip
    history = train(cfg, progress=progress_factory(args.progress))
    out = Path(cfg.out)
    pics = [p.name for p in sorted(out.glob("*.png"))]
    arrays = [p.name for p in sorted(out.glob("*.npy"))]
    last = history[-1] if history else None
    if last:
        print(f"final test loss {last['test_loss']:.3f} nats (negative ELBO per example)")
    if arrays:
        print(f"the data are not images: samples and reconstructions are arrays in {out}/: {', '.join(arrays)} "
              "(numpy.load them)")  # fmt: skip
    print(f"pictures in {out}/: {', '.join(pics)}; metrics in {out / 'metrics.jsonl'}")
    print(f"evaluate with: {program()} evaluate {shlex.quote(str(out))} --iwae-k 1000"
          + (" --n-test 2000" if args.data is None else ""))  # fmt: skip
    return 0


def default_out(data) -> str:
    """``runs/mnist``, or ``runs/<name>`` for ``--data <name>.npz`` (or a folder ``<name>``)."""
    return "runs/mnist" if data is None else f"runs/{Path(data).resolve().stem or 'data'}"


def checkpoint_file(path) -> Path:
    """``path``, or the checkpoint inside it when it is a run folder."""
    from .train import CHECKPOINT

    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def _load(path, backend):
    from .checkpoint import load_checkpoint, restore_model

    ckpt = load_checkpoint(path)
    return ckpt, restore_model(ckpt, backend=backend)


def _vae_only(model, path, what):
    """One line, status 2, for an autoencoder given where a VAE is needed."""
    if type(model).__name__ == "Autoencoder":
        raise ValueError(f"{path} holds a plain autoencoder, which {what}; this works with VAE checkpoints")


def test_data(args, ckpt, model, path):
    """The test rows a checkpoint is evaluated on, prepared as its run prepared them."""
    from . import datasets
    from .checkpoint import CheckpointError
    from .data import BINARIZE

    train_cfg = ckpt.meta.get("train", {})
    if not isinstance(train_cfg, dict):
        raise CheckpointError(f"checkpoint {path} has a malformed training configuration")
    binarize = train_cfg.get("binarize", "none")
    if binarize not in BINARIZE:
        raise CheckpointError(f"checkpoint {path} names an unknown binarization {binarize!r}")
    data_meta = ckpt.meta.get("data") if isinstance(ckpt.meta.get("data"), dict) else {}
    saved_path = data_meta.get("path")
    data = args.data or (saved_path if isinstance(saved_path, str) and Path(saved_path).exists() else None)
    if args.data is not None and args.data_dir is not None:
        raise UsageError("--data-dir is MNIST's folder and --data another data set: give one of them, not both")
    if data is not None:
        validation, seed = train_cfg.get("validation", 0.1), train_cfg.get("seed", 0)
        if not (isinstance(validation, float) and 0 < validation < 1 and isinstance(seed, int) and seed >= 0):
            raise CheckpointError(f"checkpoint {path} has a malformed training configuration (validation, seed)")
        ds = datasets.load_file(data, validation=validation, seed=seed)
        fingerprint = data_meta.get("fingerprint")
        if isinstance(fingerprint, str) and fingerprint != datasets.prepare(
            ds, likelihood=model.likelihood, binarize=binarize, train_size=train_cfg.get("train_size")
        ).fingerprint():  # the split would not be the run's: its test rows might be training rows
            raise ValueError(f"{data} is not the data {path} was trained on (its training rows differ, so its "
                             "held-out rows would not be the run's); give --data the file the run used")  # fmt: skip
    elif model.input_dim == 784 and data_meta.get("source", "MNIST") == "MNIST":  # (older checkpoints: MNIST)
        data_dir = args.data_dir
        saved_dir = train_cfg.get("data_dir")
        if data_dir is None and isinstance(saved_dir, str) and saved_dir and Path(saved_dir).is_dir():
            data_dir = saved_dir  # where the run found its data, if that is here too
        ds = datasets.load_mnist_dataset(data_dir)
    else:
        where = (f" ({saved_path}, not found here)" if isinstance(saved_path, str)
                 else f" (it was trained on {data_meta['source']})" if isinstance(data_meta.get("source"), str) else "")  # fmt: skip
        raise ValueError(f"{path} holds a model of {model.input_dim}-d data and names no data file to evaluate it "
                         f"on{where}; give --data FILE")  # fmt: skip
    if ds.dim != model.input_dim:
        raise ValueError(f"{ds.source} has {ds.dim} features per example, but the model in {path} takes "
                         f"{model.input_dim}")  # fmt: skip
    if args.n_test is not None and args.n_test > len(ds.test):
        raise ValueError(f"--n-test {args.n_test} is more than the {len(ds.test)} test examples")
    ds = datasets.prepare(ds, likelihood=model.likelihood, binarize=binarize, test_size=args.n_test)
    return ds.test, binarize


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_elbo, evaluate_nll

    path = checkpoint_file(args.checkpoint)
    ckpt, model = _load(path, args.backend)
    _vae_only(model, path, "has no ELBO or likelihood to evaluate (its loss is the squared error)")
    test_x, binarize = test_data(args, ckpt, model, path)
    t0 = time.perf_counter()
    elbo = evaluate_elbo(model, test_x, binarize, args.seed)
    make_bar = progress_factory(args.progress)
    bar = make_bar(len(test_x), f"IWAE K={args.iwae_k}") if make_bar else None
    try:
        nll, se = evaluate_nll(model, test_x, binarize, args.seed, k=args.iwae_k, batch_size=args.batch_size,
                               progress=(lambda done, total: bar.update(done)) if bar else None)  # fmt: skip
    finally:
        if bar:
            bar.close()
    result = {
        "checkpoint": str(path), "n_test": len(test_x), "binarize": binarize,
        "test_loss": elbo["loss"], "test_recon": elbo["recon"], "test_kl": elbo["kl"],
        "iwae_k": args.iwae_k, "nll": nll, "nll_stderr": se, "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"test negative ELBO {elbo['loss']:.3f} nats (recon {elbo['recon']:.3f} + kl {elbo['kl']:.3f}) "
              f"on {len(test_x)} examples, binarize={binarize}")  # fmt: skip
        print(f"test NLL (IWAE, K={args.iwae_k}) {nll:.3f} +- {se:.3f} nats")
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from . import images
    from .backend import to_numpy
    from .checkpoint import image_shape_of
    from .files import atomic_write
    from .rng import STREAM_SAMPLE, Generator

    path = checkpoint_file(args.checkpoint)
    out = args.out
    if out is not None and Path(out).suffix.lower() not in (".png", ".npy"):
        raise UsageError(f"--out {out} must end in .png (a picture grid) or .npy (the array of samples)")
    ckpt, model = _load(path, args.backend)
    _vae_only(model, path, "has no prior p(z) to sample from")
    shape = image_shape_of(ckpt.meta)
    if out is None:
        out = "samples.png" if shape is not None else "samples.npy"
    folder = Path(out).parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: the folder {folder} does not exist")
    x = model.sample(args.n, rng=Generator(args.seed, model.xp, stream=STREAM_SAMPLE))
    if Path(out).suffix.lower() == ".npy":
        atomic_write(out, lambda f: np.save(f, to_numpy(x)))
        print(f"wrote {args.n} samples, an array of shape {tuple(x.shape)}, to {out}")
        return 0
    if shape is None:
        raise UsageError(f"{path} holds a model of {model.input_dim}-d data that are not images; write the samples "
                         f"as an array with --out samples.npy")  # fmt: skip
    images.save_grid(out, x, ncols=min(args.n, 10), shape=shape)
    print(f"wrote {args.n} samples to {out}")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample}


def program() -> str:
    """How this process was started: ``python -m scratchvae`` or the ``scratchvae`` script."""
    return "python -m scratchvae" if Path(sys.argv[0]).name == "__main__.py" else "scratchvae"


def resume_command(argv) -> str:
    """The command line that continues an interrupted ``train argv``: ``--resume`` instead of ``--overwrite``."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*program().split(), *args])


class Signalled(BaseException):
    """SIGTERM (or SIGINT) outside a training loop: the process stops quietly with ``128 + signum``."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> dict:
    """SIGINT and SIGTERM raise :class:`Signalled` (a run's training loop sets its own handlers meanwhile).

    Returns the handlers they had, to put back (empty outside the main thread, where nothing changes).
    """

    def stop(signum, frame):
        raise Signalled(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is signal.SIG_IGN:  # ignored by whoever started us (`cmd &`): keep it so
            continue
        try:
            previous[signum] = signal.signal(signum, stop)
        except ValueError:  # not the main thread
            break
    return previous


def main(argv=None, pending=()) -> int:
    """Entry point; returns the exit status (0 ok, 1 diverged, 2 bad input, 128 + signal number when interrupted).

    ``pending``: signals that arrived while the caller was loading (``python -m scratchvae`` records them
    rather than letting them cut an import short); the first one stops the command before it starts.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = {}
    try:
        previous = stop_on_signals()
        if pending:
            raise Signalled(pending[0])
        return _main(argv)
    except (Signalled, KeyboardInterrupt) as exc:  # before or after training: nothing to save
        signum = exc.signum if isinstance(exc, Signalled) else signal.SIGINT
        print(f"scratchvae: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _main(argv) -> int:
    from .backend import BackendError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import Interrupted, TrainingDiverged

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader of our output went away (`... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        return 128 + 13  # SIGPIPE's status
    except UsageError as exc:
        print(f"scratchvae: error: {exc} (see scratchvae --help)", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, CheckpointError, BackendError, ValueError, OSError) as exc:
        print(f"scratchvae: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as exc:
        print(f"scratchvae: error: training diverged: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(f"scratchvae: {name}: {exc}; resume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
