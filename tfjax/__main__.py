"""Entry point of `python -m tfjax`."""

import sys

from tfjax.cli import main

sys.exit(main())
