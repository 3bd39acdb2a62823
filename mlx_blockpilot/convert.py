"""``python -m mlx_blockpilot.convert``: the command in ``mlx_blockpilot.cli.convert`` (also ``mlx-blockpilot convert``)."""

import sys

from .cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
