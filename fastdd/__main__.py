"""`python -m fastdd`: the same command line as the `fastdd` script."""
import sys

from fastdd.cli import main

if __name__ == "__main__":
    sys.exit(main())
