"""The same inference loop in different programs (W1, W2): scheduling, not work.

    python -m benchmarks.ablation [--workloads W1,W2] [--rounds 7]

Times four compiled programs on one workload, interleaved in rounds like
`benchmarks.run`, without any Python wrapper around them:

- `yardstick`: the pure-JAX step (feedforward init, T SGD activity steps in a
  `lax.fori_loop`, Adam on the parameters);
- `yardstick_inference`: the yardstick's feedforward init and activity loop alone;
- `fused_program`: the program `jpc.make_pc_step` (fused discrete inference) runs,
  called on its flat list of arrays (the Python work of a call left out);
- `jpc_inference`: `jpc`'s feedforward init and activity loop alone
  (`jpc.init_activities_with_ffwd` and the `lax.scan` of optax steps that
  `make_pc_step` runs).

Each pair does the same arithmetic (XLA's FLOP counts are printed). If a program
that does *less* work than another (an inference loop alone against the whole
step) takes longer, the wall-time gap between such programs comes from how XLA's CPU
runtime schedules them on the cores (CPU time / wall time), not from the work.
These use `jpc`'s internals (`jpc._jit`, `jpc._updates`), for diagnosis only.
"""

import argparse
import functools

import equinox as eqx
import jax

import jpc
from benchmarks import yardstick as ys
from benchmarks.run import (
    ACTIVITY_LR,
    PARAM_LR,
    WORKLOADS,
    Problem,
    adam_state,
    cost,
    flat_program,
    make_problem,
    time_interleaved,
)
from jpc._compat import jax_versions
from jpc._updates import discrete_inference


def programs(p: Problem) -> dict:
    """`name -> (step, state, lowered)` where `step(state) -> (state, marker)`."""
    w = p.workload
    act = jpc.get_act_fn(w.act)
    ys_step = ys.make_pc_step(act, w.n_steps, ACTIVITY_LR, PARAM_LR)

    ys_inference = jax.jit(
        functools.partial(ys.infer, act=act, n_steps=w.n_steps, activity_lr=ACTIVITY_LR)
    )
    kwargs = dict(
        input=p.x, activity_optim=p.activity_optim, n_inference_steps=w.n_steps
    )
    fused, arrays = flat_program(
        jpc.make_pc_step, p.model, p.optim, adam_state(p, p.model), p.y, **kwargs
    )
    model_arrays, model_static = eqx.partition(p.model, eqx.is_array)

    @jax.jit
    def jpc_inference(model_arrays, x, y):
        model = eqx.combine(model_arrays, model_static)
        activities = jpc.init_activities_with_ffwd(model, x)
        final, _ = discrete_inference(
            (model, None), activities, p.activity_optim, w.n_steps, y, x, False
        )
        return final

    ys_args = (p.params, ys.adam_init(p.params), p.x, p.y)

    def yardstick(state):
        params, opt_state, energy = ys_step(*state, p.x, p.y)
        return (params, opt_state), energy

    def fused_program(state):
        out, _ = fused(state)
        return state, out[0]

    return {
        "yardstick": (yardstick, ys_args[:2], ys_step.lower(*ys_args)),
        "yardstick_inference": (
            lambda s: (s, ys_inference(*s)[0]),
            (p.params, p.x, p.y),
            ys_inference.lower(p.params, p.x, p.y),
        ),
        "fused_program": (fused_program, arrays, fused.lower(arrays)),
        "jpc_inference": (
            lambda s: (s, jpc_inference(*s)[0]),
            (model_arrays, p.x, p.y),
            jpc_inference.lower(model_arrays, p.x, p.y),
        ),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation")
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target", type=float, default=0.1, help="s per round")
    args = parser.parse_args(argv)
    print(f"{jax_versions()}, {jax.default_backend()} backend")
    results = {}
    for name in args.workloads.split(","):
        progs = programs(make_problem(WORKLOADS[name]))
        times = time_interleaved(
            {k: (step, state) for k, (step, state, _) in progs.items()},
            args.rounds,
            args.target,
        )
        flops = {
            k: cost(lowered.compile()).get("flops", float("nan"))
            for k, (_, _, lowered) in progs.items()
        }
        base = times["yardstick"]["median_s"]
        print(f"\n{name} ({WORKLOADS[name].note}); ratios to the yardstick step")
        print(
            f"  {'program':20s} {'wall':>6s} {'paired':>7s} {'CPU':>6s} "
            f"{'CPU/wall':>8s} {'FLOPs':>10s}"
        )
        for k, t in times.items():
            print(
                f"  {k:20s} {t['median_s'] / base:6.3f} {t['paired_ratio']:7.3f} "
                f"{t['paired_cpu_ratio']:6.3f} "
                f"{t['median_cpu_s'] / t['median_s']:8.2f} {flops[k]:10.4g}"
            )
        results[name] = {
            k: dict(
                wall_ratio=t["median_s"] / base,
                paired_ratio=t["paired_ratio"],
                paired_cpu_ratio=t["paired_cpu_ratio"],
                cpu_per_wall=t["median_cpu_s"] / t["median_s"],
                flops=flops[k],
            )
            for k, t in times.items()
        }
    return results


if __name__ == "__main__":
    main()
