"""`python -m loft_kernels.benchmarks`: the ratio runner (same as `loft bench`)."""
import sys

from .runner import main

sys.exit(main(sys.argv[1:]))
