"""Entry point of `python -m tfjax`."""

from tfjax.cli import exit_with, main

exit_with(main())
