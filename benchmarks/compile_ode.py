"""First-call (compile) time of the default ODE training step, and where it goes.

    python -m benchmarks.compile_ode [--repeats 3]

On W1's shapes (784-300-300-10 tanh, batch 64, Adam), each of these runs in a fresh
process, so that nothing compiled is reused; its first call is split with
`jax.monitoring` into tracing (`jaxpr_trace`), lowering to MLIR and XLA's backend
compile, the rest being Python and the run itself:

- `make_pc_step`: the default `jpc.make_pc_step` (Heun + PID, `max_t1=20`, the
  steady-state stop);
- `yardstick_ode`, `yardstick_ode_nostop`: the same step written directly
  (`benchmarks.yardstick.make_ode_pc_step`), with the same stop and with none;
- `diffrax_bare`: the feedforward pass and `diffrax.diffeqsolve` of the PC field
  (`benchmarks.yardstick.infer_ode` with no stop: Heun + PID, no parameter update):
  the floor of any step whose inference is a diffrax solve.

`--code DIR` imports `jpc` from another checkout (the benchmarks stay this
checkout's), to compare versions of `jpc` on the same machine.

`--cache` measures the first call with JAX's persistent compilation cache
(`jax_compilation_cache_dir`, a new temporary directory per case): one process
fills the cache, and the timed processes after it load the compiled program from
disk instead of compiling it, as a second session of the same notebook would.
"""

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext


CASES = ("make_pc_step", "yardstick_ode", "yardstick_ode_nostop", "diffrax_bare")


# JAX's events for the three stages of a first call: tracing, lowering, XLA.
SPLIT = ("jaxpr_trace", "jaxpr_to_mlir_module", "backend_compile")


def compile_durations() -> dict:
    """A dict that, from now on, sums the seconds of JAX's monitoring events in
    this process by event name (`SPLIT` names the stages of a first call)."""
    import jax.monitoring

    durations = collections.defaultdict(float)

    def listen(name, seconds, **kwargs):
        durations[name.rsplit("/", 1)[-1].removesuffix("_duration")] += seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    return durations


def measure(case: str) -> dict:
    """The first call of `case`, in this process (seconds)."""
    import jax

    from benchmarks.versions import import_jpc

    jpc = import_jpc(os.environ.get("JPC_BENCHMARK_CODE"))
    from benchmarks import yardstick as ys
    from benchmarks.run import (
        MAX_T1,
        ODE_STOPS,
        PARAM_LR,
        WORKLOADS,
        adam_state,
        make_problem,
    )

    p = make_problem(WORKLOADS["W1"])
    act = jpc.get_act_fn(p.workload.act)
    if case == "make_pc_step":
        state = adam_state(p, p.model)

        def call():
            return jpc.make_pc_step(p.model, p.optim, state, p.y, input=p.x)["model"]

    elif case in ODE_STOPS:
        step = ys.make_ode_pc_step(act, MAX_T1, PARAM_LR, ODE_STOPS[case])
        state = ys.adam_init(p.params)

        def call():
            return step(p.params, state, p.x, p.y)

    else:
        bare = functools.partial(ys.infer_ode, act=act, max_t1=MAX_T1, stop="none")
        solve = jax.jit(bare)

        def call():
            return solve(p.params, p.x, p.y)

    durations = compile_durations()
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    keys = (*SPLIT, "cache_retrieval_time_sec")
    return {"first_call_s": wall, "cpu_s": cpu} | {k: durations[k] for k in keys}


def _run(case: str, env: dict) -> dict:
    """`measure(case)` in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.compile_ode", "--one", case]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--code", help="a checkout whose `jpc` is imported instead")
    parser.add_argument(
        "--cache", action="store_true", help="with a filled persistent compile cache"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    env = dict(os.environ)
    if args.code:
        env["JPC_BENCHMARK_CODE"] = os.path.abspath(args.code)
    header = "| call | first call s (median) | trace s | MLIR s | XLA compile s |"
    if args.cache:
        header += " cache load s |"
    print(header + " runs |")
    print("|---" * header.count("|") + "|")  # one more column: runs
    results = {}
    for case in args.cases:
        cache_dir = tempfile.TemporaryDirectory() if args.cache else nullcontext()
        with cache_dir as cache:
            if args.cache:
                env["JAX_COMPILATION_CACHE_DIR"] = cache
                env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
                _run(case, env)  # fills the cache
            runs = [_run(case, env) for _ in range(args.repeats)]
        results[case] = runs

        def median(key, runs=runs):
            return sorted(r[key] for r in runs)[len(runs) // 2]

        cells = [median(k) for k in ("first_call_s", "jaxpr_trace")]
        cells += [median("jaxpr_to_mlir_module"), median("backend_compile")]
        if args.cache:
            cells.append(median("cache_retrieval_time_sec"))
        firsts = ", ".join(f"{r['first_call_s']:.2f}" for r in runs)
        print(f"| {case} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {firsts} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
