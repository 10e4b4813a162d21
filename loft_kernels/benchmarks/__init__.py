"""Benchmarks of loft_kernels: the ratio runner (`loft bench`, runner.py) and what bench/ shares with it.

Every number is a ratio measured in one process against a named baseline or
limit, candidate and baseline interleaved (timing.py), on fresh random inputs.
Cases P1..P9 live in the case_*.py modules; shapes.py has the realistic
shapes and workloads.py the candidates and baselines that bench/ and the runner both time.
"""
