"""``python -m relex`` is the ``relex`` command."""

import sys

from relex.cli import main

sys.exit(main())
