"""``python -m mlx_blockpilot.export``: the command in ``mlx_blockpilot.cli.export`` (also ``mlx-blockpilot export``)."""

import sys

from .cli.export import main

if __name__ == "__main__":
    sys.exit(main())
