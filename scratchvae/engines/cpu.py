r"""The ``cpu`` engine: a NumPy training step in kept buffers, split over CPU threads by rows of the batch.

The loss is a mean over the batch, so it splits exactly over any partition of
the rows :math:`R_1, \dots, R_n`:

.. math::
    L = \frac1B\sum_{b=1}^B \ell_b = \sum_{r=1}^n L_r,\qquad
    L_r = \frac1B\sum_{b\in R_r}\ell_b,\qquad
    \nabla_\theta L = \sum_{r=1}^n \nabla_\theta L_r

Thread ``r`` runs the fused forward and backward pass of
:mod:`scratchvae.engines.fused` on rows ``R_r`` (its *lane*: its own kept
buffers and gradient buffer; the parameters are the model's, shared) and
writes :math:`\nabla_\theta L_r`. When every thread is done (one barrier),
thread ``r`` adds the ``n`` gradient buffers over the ``r``-th slice of the
flat parameter vector and applies the optimiser's update to that slice. No
two threads write the same memory, and the result depends on the split but
not on timing: a run with the same thread count is reproducible bit for bit.

NumPy releases the GIL inside matrix products and ufuncs, so the threads
compute at the same time. Meanwhile BLAS is held to one thread per caller:
the threads already use the cores, and a multi-threaded BLAS would
oversubscribe them (``benchmarks/NOTES.md``, items 6 and 8).

>>> import numpy as np, scratchvae as sv
>>> model = sv.VAE(784, seed=0)
>>> opt = sv.Adam(model)
>>> x = np.random.default_rng(0).random((128, 784), dtype=np.float32)
>>> with sv.make_engine("cpu", model, opt, threads=2) as engine:
...     out = engine.step(x)      # loss and gradient of the whole batch, then opt's update
"""

from __future__ import annotations

import threading

import numpy as np

from ..layers import Activation
from ..model import Loss
from ..optim import SGD, Adam
from ..validate import check_positive_int
from .blas import blas_threads, cpu_count, limit_blas_threads, set_blas_threads_here
from .fused import ACTIVATIONS_IN_PLACE, Lane, adam_update, chunks, sgd_update
from .reference import check_engine_arguments, check_step_beta

MIN_ROWS = 32  # with fewer rows per thread, splitting costs more than it gains (benchmarks/NOTES.md, item 8)
MAX_DEFAULT_THREADS = 8  # each thread beyond the first keeps a gradient buffer as large as the model
UPDATES = {Adam: adam_update, SGD: sgd_update}


def default_threads() -> int:
    """Threads a step uses by default: the CPUs available, at most 8.

    1 where NumPy's BLAS thread count cannot be controlled
    (:func:`~scratchvae.engines.blas.blas_threads` is ``None``), since a
    multi-threaded BLAS in every thread would oversubscribe the cores.
    """
    if blas_threads() is None:
        return 1
    return min(cpu_count(), MAX_DEFAULT_THREADS)


class Helper:
    """A thread that runs the tasks :class:`CPUEngine` hands it, one at a time.

    Hand-overs are numbered: :meth:`wait` returns once the last task handed
    over has finished, however often an exception (Ctrl-C) interrupted
    earlier waits, so a step never returns while a helper still writes.
    """

    POLL_S = 0.5  # a wake-up lost to an exception between two statements is noticed this late at worst

    def __init__(self, name):
        self.cond = threading.Condition()
        self.task, self.error, self.handed, self.finished, self.stopping = None, None, 0, 0, False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self):
        set_blas_threads_here(1)  # OpenMP builds of OpenBLAS count threads per calling thread
        seen = 0
        while True:
            with self.cond:
                while self.handed == seen and not self.stopping:
                    self.cond.wait(self.POLL_S)
                if self.stopping:
                    return
                seen, task = self.handed, self.task
            error = None
            try:
                task()
            except BaseException as exc:  # handed to the caller, which re-raises it
                error = exc
            task = None  # the task refers to its step: waiting here must not keep the step alive
            with self.cond:
                self.error, self.finished = error, seen
                self.cond.notify_all()

    def run(self, task):
        """Hand ``task`` (a function of no arguments) to the thread."""
        with self.cond:
            self.task, self.error = task, None
            self.handed += 1
            self.cond.notify_all()

    def wait(self):
        """Wait until the last task handed over has finished; return its exception (or ``None``)."""
        with self.cond:
            while self.finished < self.handed:
                self.cond.wait(self.POLL_S)
            error, self.error = self.error, None  # its traceback refers to the step: do not keep it here
            self.task = None
            return error

    def stop(self):
        """End the thread (after its current task) and wait for it."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()


class CPUEngine:
    r"""Training steps of a NumPy ``model`` with ``optimizer``, each split over up to ``threads`` threads.

    ``step(x)`` computes the loss and gradient of the whole batch ``x`` (the
    gradient ends up in ``model.grads``, as after ``model.loss_and_grad(x)``)
    and then applies one update of ``optimizer``. The numbers are the
    reference step's up to rounding (the sums over rows are added in
    another order, and the passes are fused).

    Parameters
    ----------
    model : VAE or Autoencoder
        On NumPy.
    optimizer : Adam or SGD
        Built on ``model``.
    objective : {"elbo", "iwae"}
        The VAE's negative ELBO with the analytic KL (weighted by ``beta`` at
        each step), or the IWAE bound with ``k`` samples; an autoencoder
        takes ``"elbo"``, meaning its own squared error.
    k : int
        Importance samples for ``objective="iwae"``.
    threads : int, optional
        Default :func:`default_threads`. A batch is split over at most
        ``rows // min_rows`` threads (``rows`` = batch, times ``k`` for
        IWAE); with one, no thread is started.
    min_rows : int
        Fewest rows per thread.

    While open (a ``with`` block, or from the first step until
    :meth:`close`), ``threads - 1`` helper threads wait for work and NumPy's
    BLAS runs on one thread per caller (where its thread count can be set:
    see :func:`~scratchvae.engines.blas.blas_threads`); closing restores
    both, and a later step opens it again. If a step is interrupted (an
    exception, Ctrl-C in the calling thread), it still waits for its helpers
    to finish before the exception goes on, so no thread writes the
    parameters afterwards.
    """

    name = "cpu"

    def __init__(self, model, optimizer, *, objective="elbo", k=1, threads=None, min_rows=MIN_ROWS):
        if model.xp is not np:
            raise ValueError("engine 'cpu' runs NumPy models, and this one lives on the GPU: use engine 'reference'")
        self.objective, self.k, self.autoencoder = check_engine_arguments(model, optimizer, objective, k)
        if type(optimizer) not in UPDATES:
            raise ValueError(f"engine 'cpu' updates with Adam or SGD, not {type(optimizer).__name__}")
        layers = [*model.encoder.layers, *model.decoder.layers, getattr(model, "out_act", None)]
        missing = {layer.name for layer in layers if isinstance(layer, Activation)} - set(ACTIVATIONS_IN_PLACE)
        if missing:
            raise ValueError(f"engine 'cpu' has no in-place form of {sorted(missing)}; use engine 'reference'")
        self.threads = check_positive_int(default_threads() if threads is None else threads, "threads")
        self.min_rows = check_positive_int(min_rows, "min_rows")
        self.model, self.optimizer, self.update = model, optimizer, UPDATES[type(optimizer)]
        self.lanes = [Lane(model, model.grads)]  # one per part of a batch, made when first needed
        self.update_buffer = np.empty_like(model.params)
        self.helpers = []
        self._blas = None  # the open limit_blas_threads context
        self._barriers = {}

    # ---------------------------------------------------------------- opening and closing

    def open(self):
        """Start the helper threads and hold BLAS to one thread per caller (done by the first step too)."""
        if self._blas is None and self.threads > 1:
            self._blas = limit_blas_threads(1)
            self._blas.__enter__()
            try:
                for r in range(1, self.threads):
                    self.helpers.append(Helper(f"scratchvae-step-{r}"))
            except BaseException:
                self.close()
                raise
        return self

    def close(self):
        """Stop the helper threads and restore BLAS's thread count."""
        for helper in self.helpers:
            helper.stop()
        self.helpers = []
        if self._blas is not None:
            blas, self._blas = self._blas, None
            blas.__exit__(None, None, None)

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # an engine dropped while open still stops its threads and restores BLAS
        try:
            self.close()
        except Exception:  # interpreter shutdown: threads and modules may be gone already
            pass

    # ---------------------------------------------------------------- the step

    def n_parts(self, batch: int) -> int:
        """Threads a batch of ``batch`` rows is split over."""
        rows = int(batch) * self.k
        return max(1, min(self.threads, rows // self.min_rows, int(batch)))

    def step(self, x, beta=1.0, *, check_input=True) -> Loss:
        """Loss and gradient of the batch ``x`` ``(batch, input_dim)``, then one optimiser update.

        ``x`` is checked as by ``model.loss_and_grad`` unless
        ``check_input=False`` (for data checked once beforehand: it must then
        be a float array of the model's dtype). ``beta`` weighs the KL (the
        VAE's ELBO only). Returns the :class:`~scratchvae.model.Loss` of the
        whole batch, before the update.
        """
        model = self.model
        x = model.check_input(x) if check_input else x
        beta = check_step_beta(beta, weighed=not self.autoencoder and self.objective == "elbo")
        B = x.shape[0]
        n = self.n_parts(B)
        eps = None
        if not self.autoencoder:  # the draw the reference step makes
            shape = (B, model.latent_dim) if self.objective == "elbo" else (self.k, B, model.latent_dim)
            eps = model.rng.normal(shape, model.dtype)
        if n == 1:
            loss = self._loss_and_grad(self.lanes[0], x, eps, beta, B)
            self.optimizer.t += 1
            for chunk in chunks(slice(0, model.params.size)):  # one thread updates everything: in cache-sized chunks
                self.update(self.optimizer, chunk, self.update_buffer)
            return loss
        return self._split_step(x, eps, beta, n)

    def _loss_and_grad(self, lane, x, eps, beta, n_total) -> Loss:
        if self.autoencoder:
            return lane.squared_error(x, n_total)
        if self.objective == "iwae":
            return lane.iwae(x, eps, self.k, n_total)
        return lane.elbo(x, eps, beta, n_total)

    def _split_step(self, x, eps, beta, n) -> Loss:
        model, opt = self.model, self.optimizer
        self.open()
        while len(self.lanes) < n:
            self.lanes.append(Lane(model, np.zeros_like(model.grads)))
        B, P = x.shape[0], model.params.size
        rows = [slice(r * B // n, (r + 1) * B // n) for r in range(n)]
        parts = [slice(r * P // n, (r + 1) * P // n) for r in range(n)]
        barrier = self._barriers.get(n) or self._barriers.setdefault(n, threading.Barrier(n))
        losses = [None] * n
        updated = []

        def work(r):
            try:
                e = None if eps is None else eps[rows[r]] if self.objective == "elbo" else eps[:, rows[r]]
                losses[r] = self._loss_and_grad(self.lanes[r], x[rows[r]], e, beta, B)
                barrier.wait()  # every lane's gradient is written
                updated.append(r)
                g = model.grads[parts[r]]  # lane 0 writes the model's buffer: it takes the sum
                for lane in self.lanes[1:n]:
                    g += lane.grads[parts[r]]
                self.update(opt, parts[r], self.update_buffer)  # a slice of a few cores' share: not in chunks
            except BaseException:
                barrier.abort()  # nobody waits forever for a thread that failed
                raise

        for helper in self.helpers:  # normally idle; after an interrupted step, let its last task finish first
            helper.wait()
        helpers = self.helpers[: n - 1]
        err = np.geterr()  # the caller's floating-point error handling, for the helpers too

        def helper_work(r):
            with np.errstate(**err):
                work(r)

        opt.t += 1
        errors, started = [], []
        try:
            for r, helper in enumerate(helpers, start=1):
                started.append(helper)
                helper.run(lambda r=r: helper_work(r))
            work(0)
        except BaseException as exc:  # also Ctrl-C: the helpers are let finish before it goes on
            errors.append(exc)
            barrier.abort()
        finally:
            for helper in started:
                while True:
                    try:
                        error = helper.wait()
                        break
                    except BaseException as exc:  # interrupted while waiting: keep waiting, raise it after
                        errors.append(exc)
                        barrier.abort()
                if error is not None:
                    errors.append(error)
        if errors:
            if barrier.broken:
                barrier.reset()
            if not updated:
                opt.t -= 1
            # the first failure, not the broken barrier it caused elsewhere
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return Loss(*(sum(part[i] for part in losses) for i in range(3)))
