"""``python -m fastmft COMMAND ...``: the ``fastmft`` command line."""

import sys

from fastmft.cli import main

sys.exit(main())
