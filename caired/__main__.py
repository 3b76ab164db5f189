"""``python -m caired``."""

import sys

from caired.cli import main

sys.exit(main())
