"""``python -m mlx_blockpilot.server``: the command in ``mlx_blockpilot.cli.server`` (also ``mlx-blockpilot server``)."""

import sys

from .cli.server import main

if __name__ == "__main__":
    sys.exit(main())
