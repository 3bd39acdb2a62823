"""``python -m mlx_blockpilot.sweep``: the command in ``mlx_blockpilot.cli.sweep`` (also ``mlx-blockpilot sweep``)."""

import sys

from .cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
