"""``python -m moriio_proxy`` is the ``moriio-proxy`` command."""

import sys

from .cli import main

# Guarded: ``serve --workers N`` starts its workers with multiprocessing's spawn, which
# imports this module again in each of them (as ``__mp_main__``).
if __name__ == "__main__":
    sys.exit(main())
