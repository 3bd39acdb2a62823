"""``python -m mlx_blockpilot.chat``: the command in ``mlx_blockpilot.cli.chat`` (also ``mlx-blockpilot chat``)."""

import sys

from .cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
