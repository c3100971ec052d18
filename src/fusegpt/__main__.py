"""``python -m fusegpt`` (and ``torchrun --nproc-per-node N -m fusegpt compress ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
