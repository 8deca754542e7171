"""``python -m vitq`` and the ``vitq`` console script.

The command-line module imports torch, timm and the methods, which takes seconds: a Ctrl-C while they load
still ends with one line and exit code 130, like a Ctrl-C during the work (:func:`vitq.cli.main`).
"""

from __future__ import annotations

import _thread
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_INTERRUPTED = 130


def _interrupted(message: str | None) -> int:
    """Exit 130 at once: a Ctrl-C inside an extension's import can leave CPython set to re-raise SIGINT when it
    shuts down, which would kill the process and hide the exit code (outputs are already cleaned up)."""
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


#: set by a Ctrl-C while the libraries load: through the SIGINT handler :func:`load_cli` installs, or swallowed (below)
_interrupted_while_loading = threading.Event()


def reraise_swallowed_interrupt(unraisable) -> None:
    """``sys.unraisablehook``: a Ctrl-C that lands in code whose exceptions CPython can only report (a finalizer,
    the logging module's fork handlers while libraries load) would be printed as "Exception ignored" and lost, and
    the command would go on.

    From another thread it is raised again in the main thread, where the one-line handlers see it. In the main
    thread that is impossible: the signal would be handled inside this hook, whose own exception CPython again only
    reports. There it is recorded, and :func:`load_cli` treats the loading as interrupted; once the work has begun,
    it runs to its end (a complete output, exit 0)."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        if threading.current_thread() is threading.main_thread():
            _interrupted_while_loading.set()
        else:
            _thread.interrupt_main()
        return
    sys.__unraisablehook__(unraisable)


def load_cli() -> Callable[[], int] | None:
    """``vitq.cli.main``, or ``None`` when a Ctrl-C arrived while the libraries loaded.

    A Ctrl-C during an import does not always surface as ``KeyboardInterrupt``: a library that catches it (or an
    import it leaves half done, seen again by a later import) can raise something else, e.g. an ``AttributeError``
    of a partially initialised module. Any exception after a Ctrl-C therefore counts as the interrupt; without
    one, an exception is a real error and propagates. A Ctrl-C swallowed where it landed
    (:func:`reraise_swallowed_interrupt`) counts too, once the import is over."""
    _interrupted_while_loading.clear()

    def on_sigint(signum, frame):
        _interrupted_while_loading.set()
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # a process started with Ctrl-C ignored keeps ignoring it
        signal.signal(signal.SIGINT, on_sigint)
    try:
        main = importlib.import_module("vitq.cli").main
    except KeyboardInterrupt:
        return None
    except Exception:
        if _interrupted_while_loading.is_set():
            return None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    return None if _interrupted_while_loading.is_set() else main


def run() -> int:
    """Load the command line and run it on ``sys.argv``."""
    sys.unraisablehook = reraise_swallowed_interrupt
    main = load_cli()
    if main is None:
        return _interrupted("vitq: interrupted (while loading; nothing was written)")
    try:
        code = main()
    except KeyboardInterrupt:  # between main()'s own handlers (argument parsing): nothing was written yet
        return _interrupted("vitq: interrupted (nothing was written)")
    if code == EXIT_INTERRUPTED:  # main() printed its line
        return _interrupted(None)
    # the work is done and its outputs are in place: a Ctrl-C while the interpreter shuts down (torch takes a
    # moment) would otherwise kill the process by SIGINT and hide the exit code
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(run())
