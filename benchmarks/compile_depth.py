"""Compile time and step time against depth: stacked, scanned and unrolled layers.

    python -m benchmarks.compile_depth [--depths 8 32 128] [--steps 5]
                                       [--paths stacked scan unrolled]
                                       [--optim adam|sgd]
    python -m benchmarks.compile_depth --paired ROUNDS [--depths ...]

A μPC residual MLP (width 64, ReLU, identity skips, batch 32): for each depth,
the first call (trace + compile + one run) and the median steady-state call of
`jpc.make_pc_step` (discrete inference, `optax.sgd(0.1)` on the activities, 20
steps) and of `jpc.make_bp_step` (which is never stacked), with the hidden layers
and their activities held stacked for the whole step ("stacked",
`jpc.set_layer_stacking`, here for runs of any length), traced as one
`jax.lax.scan` at each evaluation of the energy ("scan", `jpc._stacked`) and
unrolled layer by layer ("unrolled"). Each
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


PATHS = ("stacked", "scan", "unrolled")


def _set_path(path: str) -> None:
    from jpc import _packed, _stacked

    _packed.MIN_RUN = _packed.ALWAYS if path == "stacked" else None
    _stacked.ENABLED = path == "scan"


def _problem(depth: int, optimiser: str = "adam"):
    import equinox as eqx
    import jax
    import jax.random as jr
    import optax

    import jpc

    k_model, k_x, k_y = jr.split(jr.PRNGKey(0), 3)
    model = jpc.make_mlp(
        k_model, D_IN, WIDTH, depth, D_OUT, "relu", param_type="mupc", use_bias=True
    )
    skip_model = jpc.make_skip_model(depth)
    x = jr.normal(k_x, (BATCH, D_IN))
    y = jax.nn.one_hot(jr.randint(k_y, (BATCH,), 0, D_OUT), D_OUT)
    optim = getattr(optax, optimiser)(1e-3)
    state = optim.init((eqx.filter(model, eqx.is_array), skip_model))
    return model, skip_model, x, y, optim, state


def paired(depth: int, rounds: int) -> dict:
    """`make_pc_step`'s step time, stacked over unrolled, both in this process.

    Each program is compiled under its own path (with its own optimiser objects,
    so that the two are separate compiled programs), then
    `benchmarks.run.time_interleaved` alternates the two in rounds of about 0.2 s
    and gives the median over rounds of the per-round ratio (wall and process
    CPU time). Also the largest difference between the updated weights.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import jpc
    from benchmarks.run import time_interleaved

    model, skip_model, x, y, _, state = _problem(depth)
    common = dict(input=x, skip_model=skip_model, param_type="mupc")
    impls, weights = {}, {}
    for path in ("unrolled", "stacked"):
        _set_path(path)
        optim, activity_optim = optax.adam(1e-3), optax.sgd(0.1)
        kw = dict(activity_optim=activity_optim, n_inference_steps=20)

        def call(s, optim=optim, kw=kw):
            return jpc.make_pc_step(model, optim, s, y, **kw, **common)

        out = call(state)
        weights[path] = jax.tree.leaves(eqx.filter(out["model"], eqx.is_array))
        impls[path] = (lambda s, call=call: (s, call(s)["opt_state"]), state)
    pairs = zip(weights["stacked"], weights["unrolled"])
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    out = time_interleaved(impls, rounds, target=0.2)["stacked"]
    ratios = dict(wall=out["paired_ratio"], cpu=out["paired_cpu_ratio"])
    return {"pc": ratios | {"diff": diff}}


def measure(depth: int, path: str, steps: int, optimiser: str = "adam") -> dict:
    """First-call and steady-state times of one configuration, in this process."""
    import numpy as np
    import optax

    import jpc

    _set_path(path)
    model, skip_model, x, y, optim, state = _problem(depth, optimiser)
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
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument(
        "--paired",
        type=int,
        metavar="ROUNDS",
        help="instead: make_pc_step's step time, stacked over unrolled, both in one "
        "process per depth, alternated for this many rounds",
    )
    parser.add_argument(
        "--optim",
        default="adam",
        choices=["adam", "sgd"],
        help="the parameter optimiser (learning rate 1e-3); default adam",
    )
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        depth, path = int(args.one[0]), args.one[1]
        if path == "paired":
            print(json.dumps(paired(depth, args.paired)))
        else:
            print(json.dumps(measure(depth, path, args.steps, args.optim)))
        return
    if args.paired:
        print("| depth | step | stacked / unrolled, wall | CPU | weight difference |")
        print("|---|---|---|---|---|")
        for depth in args.depths:
            command = [sys.executable, "-m", "benchmarks.compile_depth", "--one"]
            command += [str(depth), "paired", "--paired", str(args.paired)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            for step, r in result.items():
                cells = f"{r['wall']:.2f} | {r['cpu']:.2f} | {r['diff']:.1e}"
                print(f"| {depth} | {step} | {cells} |")
        return
    header = "| depth | step | path | first call wall s | CPU s | trace s | MLIR s "
    print(header + "| XLA compile s | step ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for depth in args.depths:
        for path in args.paths:
            command = [sys.executable, "-m", "benchmarks.compile_depth", "--one"]
            command += [str(depth), path, "--steps", str(args.steps)]
            command += ["--optim", args.optim]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            for step, r in result.items():
                cells = [r["compile_s"], r["compile_cpu_s"], *(r[k] for k in SPLIT)]
                cells = " | ".join(f"{c:.2f}" for c in cells)
                print(f"| {depth} | {step} | {path} | {cells} | {r['step_ms']:.2f} |")


if __name__ == "__main__":
    main()
