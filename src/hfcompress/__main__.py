"""``python -m hfcompress``: the ``hfcompress`` command."""

import sys

from hfcompress.cli import main

sys.exit(main())
