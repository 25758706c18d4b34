"""``python -m cheers ...``: the same as the ``cheers`` command."""

import sys

from cheers.cli import main

sys.exit(main())
