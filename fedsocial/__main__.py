"""``python -m fedsocial``: the same entry point as the ``fedsocial`` command."""

import sys

from fedsocial.simulations.cli import main

sys.exit(main())
