"""Seeded random generators next to a model's arrays, one stream per use.

Nothing in scratchvae reads global random state: every random number comes
from a :class:`Generator` made from a seed and a *stream*. On NumPy two
generators with the same seed and stream give the same bits, so two uses
sharing a stream would draw numbers that depend on each other; every use
therefore has a stream of its own, listed below.
"""

from __future__ import annotations

import numpy as np

STREAM_INIT = 0  # initial parameters (the model)
STREAM_NOISE = 1  # reparameterization noise of the training steps (the model)
STREAM_DATA = 2  # data order and dynamic binarization while training
STREAM_EVAL_DATA = 3  # dynamic binarization of evaluated images: every evaluation sees the same ones
STREAM_EVAL_IWAE = 4  # noise of the importance-weighted bound (evaluate_nll)
STREAM_PICTURES = 5  # the samples in a run's pictures
STREAM_EVAL_ELBO = 6  # noise of the one-sample ELBO on held-out images (evaluate_elbo)
STREAM_SAMPLE = 7  # ``scratchvae sample``
STREAM_SPLIT = 8  # the examples held out as a test set when a data set has none


class Generator:
    """A seeded random generator living next to a model's arrays.

    Wraps :class:`numpy.random.Generator` (PCG64) on the CPU and
    ``cupy.random.RandomState`` on the GPU, so that every caller can draw
    ``normal``/``uniform`` arrays directly in the model's dtype and device.

    Parameters
    ----------
    seed : int
    xp : module
        ``numpy`` or ``cupy``.
    stream : int
        Independent streams from one seed: each use has its own, listed in
        the ``STREAM_*`` constants of this module.
    """

    def __init__(self, seed: int, xp=np, stream: int = 0):
        self.xp = xp
        self.seed, self.stream = int(seed), int(stream)
        if xp is np:
            self._g = np.random.Generator(np.random.PCG64([self.stream, self.seed]))
        else:
            self._g = xp.random.RandomState(self.seed * 7919 + self.stream)

    def normal(self, shape, dtype=np.float64):
        """Standard normal draws ``eps ~ N(0, I)`` of the given shape and dtype."""
        return self._g.standard_normal(shape, dtype=dtype)

    def uniform(self, shape, dtype=np.float64):
        """Uniform draws on ``[0, 1)``."""
        if self.xp is np:
            return self._g.random(shape, dtype=dtype)
        return self._g.random_sample(shape, dtype=dtype)

    def permutation(self, n: int):
        """A random permutation of ``range(n)`` (int64)."""
        return self._g.permutation(int(n))

    def get_state(self):
        """The generator state as a JSON-serialisable object (for checkpoints); ``None`` on the GPU."""
        if self.xp is np:
            return self._g.bit_generator.state
        return None

    def set_state(self, state) -> None:
        """Restore a state from :meth:`get_state` (ignored on the GPU, where it is ``None``)."""
        if self.xp is np and state is not None:
            self._g.bit_generator.state = state
