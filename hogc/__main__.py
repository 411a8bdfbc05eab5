"""``python -m hogc ...`` is the ``hogc`` command line."""
import sys

from .cli import main

sys.exit(main())
