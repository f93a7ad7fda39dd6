"""Compile time and step time against depth, scanned layers against unrolled ones.

    python -m benchmarks.compile_depth [--depths 8 32 128] [--steps 5]
                                       [--paths scan unrolled]

A μPC residual MLP (width 64, ReLU, identity skips, batch 32): for each depth,
the first call (trace + compile + one run) and the median steady-state call of
`jpc.make_pc_step` (discrete inference, `optax.sgd(0.1)` on the activities, 20
steps) and of `jpc.make_bp_step`, with the hidden layers traced as one
`jax.lax.scan` ("scan") and unrolled layer by layer ("unrolled"). Each
(depth, path) pair runs in a fresh process, so no compiled program is reused
and both the wall time and the process CPU time of the first call are reported,
with the first call split by `jax.monitoring` into tracing (`jaxpr_trace`),
lowering to MLIR and XLA's compile.
"""

import argparse
import json
import subprocess
import sys
import time

from benchmarks.compile_ode import SPLIT, compile_durations


WIDTH, BATCH, D_IN, D_OUT = 64, 32, 64, 10


def _time(fn) -> tuple[float, float]:
    import jax

    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(depth: int, scan: bool, steps: int) -> dict:
    """First-call and steady-state times of one configuration, in this process."""
    import equinox as eqx
    import jax
    import jax.random as jr
    import numpy as np
    import optax

    import jpc
    from jpc import _stacked

    _stacked.ENABLED = scan
    k_model, k_x, k_y = jr.split(jr.PRNGKey(0), 3)
    model = jpc.make_mlp(
        k_model, D_IN, WIDTH, depth, D_OUT, "relu", param_type="mupc", use_bias=True
    )
    skip_model = jpc.make_skip_model(depth)
    x = jr.normal(k_x, (BATCH, D_IN))
    y = jax.nn.one_hot(jr.randint(k_y, (BATCH,), 0, D_OUT), D_OUT)
    optim = optax.adam(1e-3)
    state = optim.init((eqx.filter(model, eqx.is_array), skip_model))
    common = dict(input=x, skip_model=skip_model, param_type="mupc")
    activity_optim = optax.sgd(0.1)  # one object: a new one would recompile
    calls = {
        "pc": lambda: jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            activity_optim=activity_optim,
            n_inference_steps=20,
            **common,
        )["model"],
        "bp": lambda: jpc.make_bp_step(model, optim, state, y, **common)["model"],
    }
    durations = compile_durations()
    result = {}
    for name, call in calls.items():
        durations.clear()
        wall, cpu = _time(call)
        split = {k: durations[k] for k in SPLIT}
        times = [_time(call)[0] for _ in range(steps)]
        result[name] = {"compile_s": wall, "compile_cpu_s": cpu} | split
        result[name]["step_ms"] = 1e3 * float(np.median(times))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--paths", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"]
    )
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        depth, scan = int(args.one[0]), args.one[1] == "scan"
        print(json.dumps(measure(depth, scan, args.steps)))
        return
    header = "| depth | step | path | first call wall s | CPU s | trace s | MLIR s "
    print(header + "| XLA compile s | step ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth in args.depths:
        for path in args.paths:
            command = [sys.executable, "-m", "benchmarks.compile_depth", "--one"]
            command += [str(depth), path, "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            for step, r in result.items():
                cells = [r["compile_s"], r["compile_cpu_s"], *(r[k] for k in SPLIT)]
                cells = " | ".join(f"{c:.2f}" for c in cells)
                print(f"| {depth} | {step} | {path} | {cells} | {r['step_ms']:.2f} |")


if __name__ == "__main__":
    main()
