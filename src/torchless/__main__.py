"""`python -m torchless`: the same as the `torchless` command."""

import sys

from .cli import main

sys.exit(main())
