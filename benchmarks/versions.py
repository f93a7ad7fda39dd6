"""The default ODE entry points of two versions of `jpc`, per call, side by side.

    python -m benchmarks.versions --code DIR [--alternations 3] [--calls 20]

Each public call whose inference is the default ODE solve (Heun + PID with the
steady-state stop) is timed in this checkout's `jpc` and in the `jpc` of the
checkout `DIR` (for example a `git worktree` of an earlier commit), in separate
processes run alternately, `--alternations` times each. Every call starts from the
same inputs (the solve's work depends on them) and is awaited; a process reports
the median over `--calls` calls after a first, compiling call. The table gives each
version's median over alternations and their ratio (this / other), with the
ratio's range over the alternations, and the accepted solver steps of the
`solve_inference` call in each version (`record_iters=True`, `jpc.get_t_max`).

Problems (784-pixel observations, 10 classes, batch 64, tanh MLPs of width 300):
`make_pc_step` and `solve_inference` on W1 (784-300-300-10, discriminative);
`make_hpc_step` and `test_hpc` with a generator 10-300-300-784 and an amortiser
784-300-300-10; `test_generative_pc` with the generator.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


CALLS = (
    "make_pc_step",
    "solve_inference",
    "make_hpc_step",
    "test_hpc",
    "test_generative_pc",
)


def import_jpc(code: str | None):
    """`jpc` imported from the checkout `code` (this one's when `None` or empty)."""
    if code:  # `jpc` from that checkout, the benchmarks from this one
        sys.path.insert(0, code)
    import jpc

    if code:
        sys.path.remove(code)
    return jpc


def _calls(jpc) -> tuple[dict, object]:
    """`{name: call}`, each call running one public function on fixed inputs, and
    a function giving the accepted steps of the `solve_inference` call's solve."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import optax

    keys = jr.split(jr.PRNGKey(0), 6)
    x = jr.normal(keys[0], (64, 784))
    labels = jax.nn.one_hot(jr.randint(keys[1], (64,), 0, 10), 10)
    model = jpc.make_mlp(keys[2], 784, 300, 3, 10, "tanh", use_bias=True)
    generator = jpc.make_mlp(keys[3], 10, 300, 3, 784, "tanh", use_bias=True)
    amortiser = jpc.make_mlp(keys[4], 784, 300, 3, 10, "tanh", use_bias=True)
    optim = optax.adam(1e-3)

    def adam(m):
        return optim.init((eqx.filter(m, eqx.is_array), None))

    pc_state = adam(model)
    hpc_states = [adam(generator), optim.init(eqx.filter(amortiser, eqx.is_array))]
    start = jpc.init_activities_with_ffwd(model, x)
    sizes = [10, 300, 300, 784]

    def solve_steps():
        params = (model, None)
        zs = jpc.solve_inference(params, start, labels, input=x, record_iters=True)
        return int(jpc.get_t_max(zs)) + 1

    calls = {
        "make_pc_step": lambda: jpc.make_pc_step(
            model, optim, pc_state, labels, input=x
        )["model"],
        "solve_inference": lambda: jpc.solve_inference(
            (model, None), start, labels, input=x
        ),
        "make_hpc_step": lambda: jpc.make_hpc_step(
            generator, amortiser, [optim, optim], hpc_states, x, input=labels
        )["generator"],
        "test_hpc": lambda: jpc.test_hpc(
            generator, amortiser, x, labels, keys[5], sizes, 64
        ),
        "test_generative_pc": lambda: jpc.test_generative_pc(
            generator, x, labels, keys[5], sizes, 64
        ),
    }
    return calls, solve_steps


def measure(code: str | None, names: list, n_calls: int) -> dict:
    """Median seconds per call of each of `names`, in this process."""

    jpc = import_jpc(code)
    calls, solve_steps = _calls(jpc)
    out = {"solve_inference steps": solve_steps()}
    for name in names:
        out[name] = per_call(calls[name], n_calls)
        jpc.raise_pending_step_errors()
    return out


def per_call(call, n: int) -> float:
    """Median seconds of `n` awaited calls of `call`, after a first (compiling) one."""
    import jax

    jax.block_until_ready(call())
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", required=True, help="the other checkout")
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20, help="timed calls each")
    parser.add_argument("--only", nargs="+", default=list(CALLS), choices=CALLS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one or None, args.only, args.calls)))
        return
    versions = {"this": "", "other": os.path.abspath(args.code)}
    runs = {v: [] for v in versions}
    for _ in range(args.alternations):
        for version, code in versions.items():
            command = [sys.executable, "-m", "benchmarks.versions", "--one", code]
            command += ["--code", args.code, "--calls", str(args.calls)]
            command += ["--only", *args.only]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr)
            runs[version].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"| call | this ms | {args.code} ms | this / other (range) |")
    print("|---|---|---|---|")
    for name in args.only:
        this = [r[name] for r in runs["this"]]
        other = [r[name] for r in runs["other"]]
        ratios = [a / b for a, b in zip(this, other)]
        print(
            f"| `{name}` | {statistics.median(this) * 1e3:.2f} | "
            f"{statistics.median(other) * 1e3:.2f} | "
            f"{statistics.median(this) / statistics.median(other):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    steps = {v: runs[v][0]["solve_inference steps"] for v in versions}
    print(f"accepted steps of the solve_inference call: {steps}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
