"""``python -m automedsam segment|cache|demo ...`` (the same as the ``automedsam`` command)."""

import sys

from .cli import main

sys.exit(main())
