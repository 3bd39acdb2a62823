"""``python -m mlx_blockpilot.calibrate``: the command in ``mlx_blockpilot.cli.calibrate`` (also ``mlx-blockpilot calibrate``)."""

import sys

from .cli.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
