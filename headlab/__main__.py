"""`python -m headlab`: the same as the `headlab` command (headlab/cli.py)."""

import sys

from headlab.cli import main

sys.exit(main())
