"""``python -m leukoedge.bench latency|app ...`` (see :func:`leukoedge.bench.cli.main`)."""
import sys

from .cli import main

sys.exit(main())
