"""`python -m composemirror`: the command line."""

import sys

from composemirror.cli import main

sys.exit(main())
