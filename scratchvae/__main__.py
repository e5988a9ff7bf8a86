"""``python -m scratchvae``: the command line (see :mod:`scratchvae.cli`)."""

import sys

from .cli import main

sys.exit(main())
