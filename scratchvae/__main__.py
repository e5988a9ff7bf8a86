"""``python -m scratchvae``: the command line (see :mod:`scratchvae.cli`)."""

import signal
import sys


def _stop(signum, frame):  # a signal while the command line loads: stop quietly, as cli.main does later
    raise SystemExit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _stop)

from .cli import main  # noqa: E402  (after the handlers: loading takes a moment)

sys.exit(main())
