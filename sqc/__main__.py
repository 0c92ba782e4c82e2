"""``python -m sqc`` is the ``sqc`` command."""
from .cli import run

run()
