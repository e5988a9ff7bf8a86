"""``python -m scratchvae``: the command line (see :mod:`scratchvae.cli`)."""

import signal
import sys


def _stop(signum, frame):  # a signal while the command line loads or exits: stop quietly, as cli.main does
    raise SystemExit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_signum) is not signal.SIG_IGN:  # an ignore inherited from the caller stays
        signal.signal(_signum, _stop)

from .cli import main  # noqa: E402  (after the handlers: loading takes a moment)

_status = main()
for _signum in (signal.SIGINT, signal.SIGTERM):  # the work is done (or saved): a late signal changes nothing
    signal.signal(_signum, signal.SIG_IGN)
sys.exit(_status)
