"""``python -m pimcore`` is the ``pimcore`` command."""

import sys

from .cli import main

sys.exit(main())
