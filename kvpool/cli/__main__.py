"""``python -m kvpool.cli``: the same as the ``kvpool`` command."""

import sys

from . import main

sys.exit(main())
