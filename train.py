"""fmc-train entry point: ``python train.py prepare | fit | export | evaluate | table`` (see ``--help``)."""

import sys

from fmc.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
