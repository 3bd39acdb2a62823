"""``python -m mlx_blockpilot.train_policy``: the command in ``mlx_blockpilot.cli.train_policy`` (also ``mlx-blockpilot train_policy``)."""

import sys

from .cli.train_policy import main

if __name__ == "__main__":
    sys.exit(main())
