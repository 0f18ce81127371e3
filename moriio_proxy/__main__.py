"""``python -m moriio_proxy`` is the ``moriio-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
