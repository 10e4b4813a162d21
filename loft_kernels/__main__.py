"""`python -m loft_kernels ...` is the `loft` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
