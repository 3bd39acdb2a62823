"""``python -m mlx_blockpilot.generate``: the command in ``mlx_blockpilot.cli.generate`` (also ``mlx-blockpilot generate``)."""

import sys

from .cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
