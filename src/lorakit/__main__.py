"""`python -m lorakit` and the `lorakit` command."""

import contextlib
import os
import signal
import sys


def run() -> int:
    """The `lorakit` command; Ctrl-C at any moment prints one line, not a traceback, and the
    exit code is 130."""
    try:
        from lorakit.cli.main import main

        code = main()
    except KeyboardInterrupt:  # while the command line itself is imported
        print("interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    # the work is over: a Ctrl-C while Python shuts down (waiting for threads) ends it at once
    signal.signal(signal.SIGINT, _exit_interrupted)
    return code


def _exit_interrupted(signum: int, frame: object) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(run())
