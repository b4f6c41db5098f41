"""``python -m nncompress.cli``: the same entry point as the ``nncompress`` script."""

import sys

from . import main

sys.exit(main())
