"""`python -m lorakit`: the `lorakit` command."""

import sys

from lorakit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
