"""``python -m scratchvae``: the command line (see :mod:`scratchvae.cli`)."""

import signal
import sys

# Signals while the command line loads are only noted: one that cut an import short (NumPy's, say) would
# end in an import error's traceback. cli.main stops quietly for the first of them once everything is loaded.
_pending = []
for _signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_signum) is not signal.SIG_IGN:  # an ignore inherited from the caller stays
        signal.signal(_signum, lambda signum, frame: _pending.append(signum))

import numpy  # noqa: E402, F401  (the slow import, done here where a signal cannot cut it short)

from .cli import main  # noqa: E402

_status = main(pending=_pending)
for _signum in (signal.SIGINT, signal.SIGTERM):  # the work is done (or saved): a late signal changes nothing
    if signal.getsignal(_signum) is not signal.SIG_IGN:
        signal.signal(_signum, signal.SIG_IGN)
sys.exit(_status)
