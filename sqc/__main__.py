"""``python -m sqc`` is the ``sqc`` command."""
import sys

from .cli import main

sys.exit(main())
