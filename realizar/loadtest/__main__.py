"""``python -m realizar.loadtest ...`` is ``realizar loadtest ...``."""

import sys

from realizar.loadtest.cli import main

sys.exit(main(prog="python -m realizar.loadtest"))
