"""`python -m lorakit` and the `lorakit` command."""

import sys


def run() -> int:
    """The `lorakit` command; Ctrl-C while it starts up prints one line, not a traceback."""
    try:
        from lorakit.cli.main import main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
