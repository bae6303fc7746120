"""Grand-Challenge entry point for FuseMyCells: fuse every input view (see ``--help``)."""

import sys

from fmc.infer import main

if __name__ == "__main__":
    sys.exit(main())
