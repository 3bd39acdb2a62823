"""``python -m mlx_blockpilot.bench``."""

import sys

from ..cli.bench import main

sys.exit(main())
