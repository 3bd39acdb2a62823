"""``python -m mlx_blockpilot.train_draft``: the command in ``mlx_blockpilot.cli.train_draft`` (also ``mlx-blockpilot train_draft``)."""

import sys

from .cli.train_draft import main

if __name__ == "__main__":
    sys.exit(main())
