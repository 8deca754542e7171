"""``python -m vitq`` and the ``vitq`` console script.

The command-line module imports torch, timm and the methods, which takes seconds: a Ctrl-C while they load
still ends with one line and exit code 130, like a Ctrl-C during the work (:func:`vitq.cli.main`).
"""

from __future__ import annotations

import signal
import sys


def run() -> int:
    """Load the command line and run it on ``sys.argv``."""
    try:
        from vitq.cli import EXIT_INTERRUPTED, main
    except KeyboardInterrupt:
        print("vitq: interrupted (while loading; nothing was written)", file=sys.stderr)
        return 130
    try:
        code = main()
    except KeyboardInterrupt:  # between main()'s own handlers (argument parsing): nothing was written yet
        print("vitq: interrupted (nothing was written)", file=sys.stderr)
        return EXIT_INTERRUPTED
    # the work is done and its outputs are in place: a Ctrl-C while the interpreter shuts down (torch takes a
    # moment) would otherwise kill the process by SIGINT and hide the exit code
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(run())
