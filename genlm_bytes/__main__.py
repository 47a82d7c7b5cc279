"""``python -m genlm_bytes``: the command line (see :mod:`genlm_bytes.cli`)."""

import sys

from genlm_bytes.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
