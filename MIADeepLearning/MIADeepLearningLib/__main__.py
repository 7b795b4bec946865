"""`python -m MIADeepLearningLib ...` is the batch command line (see cli.py)."""

from __future__ import annotations

import sys

from MIADeepLearningLib.cli import main

if __name__ == "__main__":
    sys.exit(main())
