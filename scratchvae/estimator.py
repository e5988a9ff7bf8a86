r"""A VAE for your own data, with scikit-learn's habits: ``VAEEstimator(...).fit(X)``, ``transform``, ``save``, ``load``.

>>> import numpy as np, scratchvae as sv
>>> X = np.random.default_rng(0).normal(size=(500, 10))       # 500 examples, 10 features
>>> vae = sv.VAEEstimator(hidden=(32,), latent_dim=2, likelihood="gaussian", epochs=3).fit(X)
>>> vae.transform(X).shape                                       # posterior means
(500, 2)
>>> len(vae.history_)                                            # one row of metrics per epoch
3

Training is the command line's trainer (:class:`scratchvae.train.Run`): the
same engines, NaN checks, progress display, and, with ``out=`` a folder, the
same checkpoints, ``metrics.jsonl``, pictures and exact ``resume``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np

from . import datasets
from .backend import backend_name, to_numpy
from .checkpoint import CheckpointError, image_shape_of, load_checkpoint, restore_model, save_checkpoint
from .data import float_batches
from .evaluate import evaluate_elbo
from .rng import STREAM_SAMPLE, Generator
from .train import CHECKPOINT, Run, TrainConfig, renamed_test_keys

_TRAINING = ("epochs", "batch_size", "lr", "optimizer", "binarize", "objective", "k", "beta", "kl_warmup", "engine",
             "threads", "backend", "dtype", "init", "checkpoint_every")  # fmt: skip


class VAEEstimator:
    r"""A variational autoencoder fitted to an array (scikit-learn's conventions).

    Parameters
    ----------
    hidden : sequence of int
        Encoder hidden widths, mirrored in the decoder.
    latent_dim : int
        Latent dimension ``J``.
    likelihood : {"bernoulli", "gaussian", "gaussian_learned"}
        :math:`p(x|z)`. ``bernoulli`` for data in ``[0, 1]`` (images: grey
        levels or black and white); ``gaussian`` (unit variance, the squared
        error up to a constant) for real-valued data, best standardised;
        ``gaussian_learned`` also learns a variance per feature and example
        (see the README's "Which likelihood" for when it helps).
    activation : str
        Hidden activation: relu, tanh, sigmoid or softplus.
    epochs, batch_size, lr, optimizer, binarize, objective, k, beta, kl_warmup, engine, threads, backend, dtype, init, checkpoint_every
        As the ``train`` command's flags of the same names (see
        :class:`scratchvae.train.TrainConfig`).
    validation : float
        The fraction of ``X`` held out to measure the test loss each epoch,
        when :meth:`fit` gets no ``validation`` array.
    seed : int or None
        Seeds everything random (initialisation, noise, data order, the
        held-out rows). ``None`` draws a fresh seed, kept in ``seed_``.
    out : str or path, optional
        A run folder for the checkpoint, ``metrics.jsonl`` and pictures, as
        ``train --out`` writes them; ``None`` (default) writes nothing.
    resume, overwrite : bool
        With ``out``: continue the run there, or replace it (a folder that
        holds a run is refused otherwise).
    progress : bool
        Show a progress line on stderr during each epoch.
    verbose : bool
        Print one line per epoch (the command line's log).

    Attributes
    ----------
    model_ : scratchvae.VAE
        The fitted model.
    history_ : list of dict
        Per-epoch metrics: ``train_loss``, ``test_loss`` (negative ELBO in
        nats per example), ``test_recon``, ``test_kl``, ``seconds``, ...
    n_features_in_ : int
    image_shape_ : (height, width) or None
        The shape of one example when ``X`` holds images.
    seed_ : int
    training_ : dict
        The training configuration of the last ``fit`` (what :meth:`save` records).
    """

    def __init__(self, hidden=(400,), latent_dim=20, likelihood="bernoulli", activation="relu", *, epochs=10,
                 batch_size=128, lr=1e-3, optimizer="adam", validation=0.1, binarize="none", objective="elbo", k=1,
                 beta=1.0, kl_warmup=0, engine="auto", threads=None, backend=None, dtype="float32",
                 init="fan_in_uniform", checkpoint_every=0, seed=0, out=None, resume=False, overwrite=False,
                 progress=False, verbose=False):  # fmt: skip
        self.hidden, self.latent_dim, self.likelihood, self.activation = hidden, latent_dim, likelihood, activation
        self.epochs, self.batch_size, self.lr, self.optimizer = epochs, batch_size, lr, optimizer
        self.validation, self.binarize, self.objective, self.k = validation, binarize, objective, k
        self.beta, self.kl_warmup, self.engine, self.threads = beta, kl_warmup, engine, threads
        self.backend, self.dtype, self.init, self.checkpoint_every = backend, dtype, init, checkpoint_every
        self.seed, self.out, self.resume, self.overwrite = seed, out, resume, overwrite
        self.progress, self.verbose = progress, verbose

    # ---------------------------------------------------------------- fitting

    def fit(self, X, y=None, *, validation=None, image_shape=None):
        """Train on ``X``; returns ``self``.

        Parameters
        ----------
        X : array ``(n_examples, n_features)`` or ``(n_examples, height, width)``
            ``uint8`` grey levels (scaled by 1/255), or numbers: in ``[0, 1]``
            for the Bernoulli likelihood, any finite values for the Gaussian ones.
        y : int array ``(n_examples,)``, optional
            Not used for training; integer labels 0-9 colour the 2-d ``latent.png``.
        validation : array or float, optional
            Held-out examples for the per-epoch test loss, or the fraction
            of ``X`` to hold out (default: the constructor's ``validation``).
        image_shape : (height, width), optional
            The shape of one example, when ``X`` holds flattened images.
        """
        self.seed_ = self.seed if self.seed is not None else self._resumed_seed() or secrets.randbits(32)
        if isinstance(validation, (float, np.floating)):  # a fraction, as the constructor's validation
            validation, fraction = None, float(validation)
        else:
            fraction = float(self.validation) if isinstance(self.validation, np.floating) else self.validation
        labels = None if y is None else np.asarray(y)
        if labels is not None and labels.dtype.kind not in "iu":
            labels = None  # only integer labels colour latent.png
        data = datasets.from_arrays(X, validation, validation=fraction, seed=self.seed_,
                                    image_shape=image_shape, train_labels=labels)  # fmt: skip
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        cfg = TrainConfig(hidden=hidden, latent_dim=self.latent_dim, likelihood=self.likelihood,
                          activation=self.activation, validation=fraction, seed=self.seed_,
                          out=None if self.out is None else str(self.out), resume=self.resume,
                          overwrite=self.overwrite, **{name: getattr(self, name) for name in _TRAINING})  # fmt: skip
        progress = None
        if self.progress:
            from .cli import Progress

            progress = Progress
        run = Run(cfg, log=print if self.verbose else _silent, progress=progress, dataset=data)
        run.run()
        _set_fitted(self, run.model, run.history, data.image_shape)
        self.training_ = {**cfg.to_json(), "out": None, "resume": False, "overwrite": False}  # what save records
        return self

    @classmethod
    def from_model(cls, model, history=(), image_shape=None) -> VAEEstimator:
        """A fitted estimator around a :class:`~scratchvae.VAE` trained some other way (its hyperparameters copied)."""
        est = cls(hidden=model.hidden, latent_dim=model.latent_dim, likelihood=model.likelihood,
                  activation=model.activation, backend=backend_name(model.xp), dtype=np.dtype(model.dtype).name,
                  seed=model.seed)  # fmt: skip
        _set_fitted(est, model, history, image_shape)
        return est

    # ---------------------------------------------------------------- using the fitted model

    def _resumed_seed(self):
        """With ``seed=None``, ``resume`` and a checkpoint in ``out``: the seed that run drew (so it can continue)."""
        if not (self.resume and self.out is not None and (Path(self.out) / CHECKPOINT).is_file()):
            return None
        seed = load_checkpoint(Path(self.out) / CHECKPOINT).meta.get("train", {}).get("seed")
        return seed if isinstance(seed, int) and seed >= 0 else None

    def _batches(self, X):
        """Float batches of ``X`` on the model's device, as training saw them (``uint8`` scaled by 1/255)."""
        model = self._model()
        x, _ = datasets.rows(X, "X", "X")
        if x.shape[1] != model.input_dim:
            raise ValueError(f"X has {x.shape[1]} features, but the model was fitted to {model.input_dim}")
        if model.bounded_input and x.dtype != np.uint8 and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"X has values from {x.min():.4g} to {x.max():.4g}, but this model's {model.likelihood} likelihood "
                "takes values in [0, 1]: give grey levels as uint8 (scaled by 1/255, as in fit) or scale X yourself"
            )
        return float_batches(x, "none", None, 1024, model.dtype, model.xp)

    def transform(self, X) -> np.ndarray:
        r"""The posterior means :math:`\mu(x)` of ``X``, ``(n_examples, latent_dim)`` (NumPy)."""
        model = self._model()
        return np.concatenate([to_numpy(model.encode(xb)[0]) for xb in self._batches(X)])

    encode = transform

    def reconstruct(self, X) -> np.ndarray:
        r"""The mean of :math:`p(x|z=\mu(x))` for each row of ``X``, ``(n_examples, n_features)``."""
        model = self._model()
        return np.concatenate([to_numpy(model.reconstruct(xb)) for xb in self._batches(X)])

    def sample(self, n=1, *, seed=0) -> np.ndarray:
        r"""``n`` draws of the model's mean :math:`E[x|z]` with :math:`z \sim N(0, I)`, ``(n, n_features)``.

        Reshape a row to ``image_shape_`` to see an image.
        """
        model = self._model()
        return to_numpy(model.sample(n, rng=Generator(seed, model.xp, stream=STREAM_SAMPLE)))

    def score(self, X, *, seed=0) -> float:
        """The mean ELBO of ``X`` in nats per example (higher is better), with one noise sample per example."""
        model = self._model()
        x, _ = datasets.rows(X, "X", "X")
        return -evaluate_elbo(model, x, "none", seed)["loss"]

    def _model(self):
        model = getattr(self, "model_", None)
        if model is None:
            raise ValueError("this VAEEstimator is not fitted yet: call fit(X) first, or load a saved one")
        return model

    # ---------------------------------------------------------------- saving and loading

    def save(self, path) -> Path:
        """Write the fitted model to ``path`` (a ``.npz`` checkpoint, no pickle); returns the path."""
        model = self._model()
        meta = {"model": model.config(), "history": self.history_,
                "data": {"image_shape": None if self.image_shape_ is None else list(self.image_shape_),
                         "input_dim": self.n_features_in_}}  # fmt: skip
        training = getattr(self, "training_", None)
        if training is not None:  # how it was fitted: evaluate's split and binarization, load's settings
            meta["train"] = training
        return save_checkpoint(path, model.params, meta)

    @classmethod
    def load(cls, path, backend=None) -> VAEEstimator:
        """A fitted estimator from a file :meth:`save` or ``train`` wrote (or a ``train`` run folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT
        ckpt = load_checkpoint(path)
        model = restore_model(ckpt, backend=backend)
        if type(model).__name__ != "VAE":
            raise CheckpointError(f"{path} holds an {type(model).__name__}, not a VAE")
        history = ckpt.meta.get("history")
        history = history if isinstance(history, list) and all(isinstance(r, dict) for r in history) else []
        est = cls.from_model(model, history, image_shape_of(ckpt.meta))
        training = ckpt.meta.get("train")
        if isinstance(training, dict):  # the settings it was trained with, so that fit again trains the same way
            for name in (*_TRAINING, "validation"):
                if name in training and name not in ("backend", "dtype"):
                    setattr(est, name, training[name])
            est.training_ = training
        return est


def load(path, backend=None) -> VAEEstimator:
    """:meth:`VAEEstimator.load`: a fitted VAE from a file ``save`` or ``train`` wrote, or a run folder."""
    return VAEEstimator.load(path, backend=backend)


def _set_fitted(est, model, history, image_shape) -> None:
    """Set the fitted attributes (``model_``, ``history_``, ...) of ``est``."""
    est.model_, est.history_ = model, [renamed_test_keys(row) for row in history]
    est.n_features_in_, est.image_shape_ = model.input_dim, image_shape
    est.seed_ = getattr(est, "seed_", model.seed)


def _silent(*_):
    pass
