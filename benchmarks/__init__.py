"""Hand-run benchmarks of `jpc` against a minimal pure-JAX yardstick.

Run with `python -m benchmarks.run`; never imported by `jpc/` or the tests.
"""
