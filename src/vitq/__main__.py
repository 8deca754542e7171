"""``python -m vitq``: the same as the ``vitq`` command."""

import sys

from vitq.cli import main

if __name__ == "__main__":
    sys.exit(main())
