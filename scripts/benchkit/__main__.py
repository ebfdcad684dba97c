"""``python -m benchkit`` from scripts/: the same as ``python scripts/bench.py``."""

import sys

from benchkit.harness import main

sys.exit(main())
