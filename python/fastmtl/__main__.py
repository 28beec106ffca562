"""``python -m fastmtl``: the command line (fastmtl.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
