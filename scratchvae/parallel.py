r"""One training step (loss, gradient, optimiser update) split over CPU threads by rows of the batch.

The loss is a mean over the batch, so it splits exactly over any partition of
the rows :math:`R_1, \dots, R_n`:

.. math::
    L = \frac1B\sum_{b=1}^B \ell_b = \sum_{r=1}^n L_r,\qquad
    L_r = \frac1B\sum_{b\in R_r}\ell_b,\qquad
    \nabla_\theta L = \sum_{r=1}^n \nabla_\theta L_r

Thread ``r`` runs the ordinary forward and backward pass on rows ``R_r`` with a
replica of the model: the same parameter buffer, its own gradient buffer and
work buffers (:meth:`VAE._replica <scratchvae.model._Model._replica>`), and
writes :math:`\nabla_\theta L_r`. When every thread is done (one barrier),
thread ``r`` adds the ``n`` gradient buffers over the ``r``-th slice of the
flat parameter vector and lets the optimiser update that slice. No two
threads write the same memory, and the result depends on the split but not
on timing: a run with the same thread count is reproducible bit for bit.

NumPy releases the GIL inside matrix products and ufuncs, so the threads
compute at the same time. Meanwhile BLAS is held to one thread per caller:
the threads already use the cores, and a multi-threaded BLAS would
oversubscribe them (its idle workers also keep spinning on the cores for a
while after each product).

Why not leave the parallelism to BLAS? At small batches a step is not only
matrix products: the loss, activations and the optimiser's passes over the
whole parameter vector run on one core. Split by rows, all of it runs on
every core. (``benchmarks/NOTES.md`` has the measurements.)

>>> import numpy as np, scratchvae as sv
>>> model = sv.VAE(784, seed=0)
>>> opt = sv.Adam(model)
>>> x = np.random.default_rng(0).random((128, 784), dtype=np.float32)
>>> with sv.ParallelStep(model, opt, threads=2) as step:
...     out = step(x)            # loss and gradient of the whole batch, then opt's update
"""

from __future__ import annotations

import threading

import numpy as np

from .backend import blas_threads, cpu_count, limit_blas_threads, set_blas_threads_here
from .evaluate import check_k, check_positive_int
from .model import Loss, check_beta
from .objectives import _iwae_loss_and_grad

MIN_ROWS = 32  # with fewer rows per thread, splitting costs more than it gains (benchmarks/NOTES.md)
MAX_DEFAULT_THREADS = 8  # each thread beyond the first keeps a gradient buffer as large as the model
OBJECTIVES = ("elbo", "iwae")


def default_threads(model) -> int:
    """Threads a step of ``model`` uses by default: the CPUs available (at most 8) on NumPy, 1 on the GPU.

    Also 1 where NumPy's BLAS thread count cannot be controlled
    (:func:`~scratchvae.backend.blas_threads` is ``None``), since a
    multi-threaded BLAS in every thread would oversubscribe the cores.
    """
    if model.xp is not np or blas_threads() is None:
        return 1
    return min(cpu_count(), MAX_DEFAULT_THREADS)


def step_threads(model, threads=None) -> int:
    """Threads :class:`ParallelStep` ``(model, ..., threads=threads)`` would use: at most this many split a batch.

    ``threads=None`` means :func:`default_threads`; any positive count is
    accepted, and on the GPU the answer is always 1 (the device is the
    parallelism). Nothing is started.
    """
    threads = check_positive_int(default_threads(model) if threads is None else threads, "threads")
    return 1 if model.xp is not np else threads


class _Helper:
    """A thread that runs the tasks :class:`ParallelStep` hands it, one at a time.

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
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()


class ParallelStep:
    r"""A training step of ``model`` with ``optimizer``, split over ``threads`` threads.

    ``step(x)`` computes the loss and gradient of the whole batch ``x`` (the
    gradient ends up in ``model.grads``, as after ``model.loss_and_grad(x)``)
    and then applies one ``optimizer`` update. The numbers are the serial
    ones up to rounding (the sums over rows are added in another order).

    Parameters
    ----------
    model : VAE
    optimizer : Adam or SGD
        Built on ``model``.
    threads : int, optional
        Default :func:`default_threads`. A batch is split over at most
        ``rows // min_rows`` threads (``rows`` = batch, times ``k`` for
        IWAE); with one, the step is the serial one.
    objective : {"elbo", "iwae"}
        Negative ELBO with the analytic KL (weighted by ``beta`` at each
        call), or the IWAE bound with ``k`` samples.
    k : int
        Importance samples for ``objective="iwae"``.
    min_rows : int
        Fewest rows per thread.

    Use it as a context manager (or call :meth:`close`): while it is open,
    ``threads - 1`` helper threads wait for work and NumPy's BLAS runs on one
    thread per caller (where its thread count can be set: see
    :func:`~scratchvae.backend.blas_threads`); closing restores both. A call
    outside ``with`` opens it. If a step is interrupted (an exception, Ctrl-C
    in the calling thread), it still waits for its helpers to finish before
    the exception goes on, so no thread writes the parameters afterwards.
    """

    def __init__(self, model, optimizer, threads=None, objective="elbo", k=1, min_rows=MIN_ROWS):
        if optimizer.params is not model.params:
            raise ValueError("optimizer must be built on model (its params are another buffer)")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.k = check_k(k)
        if objective == "elbo" and self.k != 1:
            raise ValueError(f"objective 'elbo' uses one sample per example; k={k} needs objective 'iwae'")
        self.threads = step_threads(model, threads)
        min_rows = check_positive_int(min_rows, "min_rows")
        self.model, self.optimizer, self.objective = model, optimizer, objective
        self.min_rows = min_rows
        self.replicas = [model]  # one per part of a batch, made when first needed
        self._helpers = []
        self._blas = None  # the open limit_blas_threads context
        self._barriers = {}

    # ---------------------------------------------------------------- opening and closing

    def open(self):
        """Start the helper threads and hold BLAS to one thread per caller (done by the first call too)."""
        if self._blas is None and self.threads > 1:
            self._blas = limit_blas_threads(1)
            self._blas.__enter__()
            try:
                for r in range(1, self.threads):
                    self._helpers.append(_Helper(f"scratchvae-step-{r}"))
            except BaseException:
                self.close()
                raise
        return self

    def close(self):
        """Stop the helper threads and restore BLAS's thread count."""
        for helper in self._helpers:
            helper.stop()
        self._helpers = []
        if self._blas is not None:
            blas, self._blas = self._blas, None
            blas.__exit__(None, None, None)

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # a step dropped while open still stops its threads and restores BLAS
        try:
            self.close()
        except Exception:  # interpreter shutdown: threads and modules may be gone already
            pass

    # ---------------------------------------------------------------- the step

    def n_parts(self, batch: int) -> int:
        """Threads a batch of ``batch`` rows is split over."""
        rows = int(batch) * self.k
        return max(1, min(self.threads, rows // self.min_rows, int(batch)))

    def __call__(self, x, beta=1.0) -> Loss:
        """Loss and gradient of the batch ``x`` ``(batch, input_dim)``, then one optimiser update.

        ``x`` is checked as by :meth:`VAE.loss_and_grad
        <scratchvae.model.VAE.loss_and_grad>`; ``beta`` weighs the KL (ELBO
        objective only). Returns the :class:`~scratchvae.model.Loss` of the
        whole batch (before the update).
        """
        model = self.model
        return self._step(model.check_input(x, bounded=model.likelihood == "bernoulli"), check_beta(beta))

    def _loss_and_grad(self, replica, x, eps, beta, n_total):
        if self.objective == "iwae":
            return _iwae_loss_and_grad(replica, x, self.k, eps, n_total)
        return replica._loss_and_grad(x, eps, beta, n_total)

    def _step(self, x, beta=1.0) -> Loss:
        """:meth:`__call__` without input checks (``x`` on the model's device, in its dtype)."""
        model, opt = self.model, self.optimizer
        B = x.shape[0]
        n = self.n_parts(B)
        if n == 1:
            loss = self._loss_and_grad(model, x, None, beta, None)
            opt.step()
            return loss
        self.open()
        while len(self.replicas) < n:
            self.replicas.append(model._replica())
        eps_shape = (B, model.latent_dim) if self.objective == "elbo" else (self.k, B, model.latent_dim)
        eps = model.rng.normal(eps_shape, model.dtype)  # the draw the serial step makes
        rows = [slice(r * B // n, (r + 1) * B // n) for r in range(n)]
        P = model.params.size
        parts = [slice(r * P // n, (r + 1) * P // n) for r in range(n)]
        barrier = self._barriers.get(n) or self._barriers.setdefault(n, threading.Barrier(n))
        losses = [None] * n
        updated = []

        def work(r):
            try:
                e = eps[rows[r]] if self.objective == "elbo" else eps[:, rows[r]]
                losses[r] = self._loss_and_grad(self.replicas[r], x[rows[r]], e, beta, B)
                barrier.wait()  # every replica's gradient is written
                updated.append(r)
                g = model.grads[parts[r]]  # replica 0 is the model: its buffer takes the sum
                for replica in self.replicas[1:n]:
                    g += replica.grads[parts[r]]
                opt.update(parts[r])
            except BaseException:
                barrier.abort()  # nobody waits forever for a thread that failed
                raise

        for helper in self._helpers:  # normally idle; after an interrupted step, let its last task finish first
            helper.wait()
        helpers = self._helpers[: n - 1]
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
