"""Compile time of splitting a stacked array into a list, by how it is split.

    python -m benchmarks.split_kernels [--n 128] [--repeats 3]

A program takes a `(n, 64, 64)` array `A` and `n` arrays `S_i` of shape `(64, 64)`
and returns `A_i * 0.9 + S_i ** 2` for each `i`, with `A_i` taken as

- `separate`: no split at all (`S_i` in place of `A_i`), the layer-by-layer baseline;
- `constant`: `A[i]`, slices at constant offsets;
- `barrier`: the same slices behind one `jax.lax.optimization_barrier`;
- `opaque`: `jpc._packed.split(A)`, dynamic slices at indices the compiler cannot
  fold.

Each is traced, lowered and compiled in a fresh process (the median of `repeats`
processes is printed), so that no compiled program is reused.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time


MODES = ("separate", "constant", "barrier", "opaque")


def measure(mode: str, n: int) -> float:
    """Seconds to trace, lower and compile the program of `mode`, in this process."""
    import jax
    import jax.numpy as jnp

    from jpc import _packed

    stacked = jnp.ones((n, 64, 64))
    others = [jnp.ones((64, 64)) for _ in range(n)]

    def parts(a):
        if mode == "constant":
            return [a[i] for i in range(n)]
        if mode == "barrier":
            return list(jax.lax.optimization_barrier(tuple(a[i] for i in range(n))))
        return _packed.split(a)

    def program(a, s):
        taken = s if mode == "separate" else parts(a)
        return [p * 0.9 + q * q for p, q in zip(taken, s)]

    start = time.perf_counter()
    jax.jit(program).lower(stacked, others).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n)))
        return
    print(f"| split of ({args.n}, 64, 64) | trace + lower + compile s (median) |")
    print("|---|---|")
    for mode in MODES:
        times = []
        for _ in range(args.repeats):
            command = [sys.executable, "-m", "benchmarks.split_kernels"]
            command += ["--one", mode, "--n", str(args.n)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            times.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"| {mode} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
