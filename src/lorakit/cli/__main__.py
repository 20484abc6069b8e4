"""`python -m lorakit.cli` (and `torchrun -m lorakit.cli`)."""

import sys

from lorakit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
