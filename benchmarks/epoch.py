"""Per-step time of many steps per dispatch (`jpc.run_steps`) vs per-call loops.

    python -m benchmarks.epoch [--quick] [--workloads W0,W1,W2,W3]

For each workload of `benchmarks.run` (fused inference, T SGD activity steps),
three ways of running the same training steps on the same batch, interleaved in
rounds (`benchmarks.run.time_interleaved`):

- `yardstick`: the pure-JAX step of `benchmarks.yardstick`, one call per step;
- `loop`: a Python loop of `jpc.make_pc_step` calls;
- `run_steps`: `jpc.run_steps(jpc.make_pc_step, ...)` over a device-resident
  dataset of `K` copies of the batch (batch size = the workload's), so one call
  runs `K` steps in one compiled program; its time per call is divided by `K`;

and, as the floor of the step's own computation, `yardstick_scan`: the
yardstick's step in a `lax.scan` of `K` steps under one `jax.jit`.

Prints the per-step wall and CPU times (CPU: this process, all threads; on a
shared machine the wall time includes waiting for a core) and the speed-ups
`yardstick / run_steps` and `loop / run_steps`, from the medians and paired per
round (wall and CPU).
"""

import argparse

import jax
import jax.numpy as jnp

import jpc
from jpc._compat import jax_versions

from . import run, yardstick as ys


IMPLS = ("yardstick", "loop", "run_steps", "yardstick_scan")
SCANNED = ("run_steps", "yardstick_scan")
STEPS_PER_CALL = {"W0": 500, "W1": 50, "W2": 50, "W3": 10}  # K


def impl_run_steps(p: run.Problem, k: int):
    """`step(state)` running `k` fused `make_pc_step` steps in one `run_steps` call."""
    x = jnp.tile(p.x, (k, 1))
    y = jnp.tile(p.y, (k, 1))
    kwargs = dict(
        optim=p.optim,
        activity_optim=p.activity_optim,
        n_inference_steps=p.workload.n_steps,
    )

    def step(state):
        model, opt_state = state
        carried = {"model": model, "skip_model": None, "opt_state": opt_state}
        out, metrics = jpc.run_steps(
            jpc.make_pc_step, carried, x, y, batch_size=p.workload.batch, **kwargs
        )
        return (out["model"], out["opt_state"]), metrics["loss"]

    return step, (p.model, run.adam_state(p, p.model))


def impl_yardstick_scan(p: run.Problem, k: int):
    """The yardstick's step in a `lax.scan` of `k` steps under one `jax.jit`: the
    floor of the step's own computation, without any per-call cost."""
    w = p.workload
    act = jpc.get_act_fn(w.act)
    pc_step = ys.make_pc_step(act, w.n_steps, run.ACTIVITY_LR, run.PARAM_LR)

    @jax.jit
    def many(params, opt_state):
        def body(carry, _):
            params, opt_state, energy = pc_step(*carry, p.x, p.y)
            return (params, opt_state), energy

        return jax.lax.scan(body, (params, opt_state), None, length=k)

    def step(state):
        state, energies = many(*state)
        return state, energies

    return step, (p.params, ys.adam_init(p.params))


def time_workload(name: str, rounds: int, target: float) -> dict:
    """Per-step times of the three ways and the speed-ups of `run_steps`."""
    p = run.make_problem(run.WORKLOADS[name])
    k = STEPS_PER_CALL[name]
    impls = {
        "yardstick": run.impl_yardstick(p),
        "loop": run.impl_fused(p),
        "run_steps": impl_run_steps(p, k),
        "yardstick_scan": impl_yardstick_scan(p, k),
    }
    times = run.time_interleaved(impls, rounds, target)
    steps = {n: k if n in SCANNED else 1 for n in impls}
    wall = {n: t["median_s"] / steps[n] for n, t in times.items()}
    paired = {n: t["paired_ratio"] / steps[n] for n, t in times.items()}
    cpu = {n: t["paired_cpu_ratio"] / steps[n] for n, t in times.items()}
    speedups = {
        kind: {base: ratio[base] / ratio["run_steps"] for base in ("yardstick", "loop")}
        for kind, ratio in (
            ("wall", wall),
            ("wall, paired", paired),
            ("CPU, paired", cpu),
        )
    }
    cpu_s = {n: t["median_cpu_s"] / steps[n] for n, t in times.items()}
    return dict(
        steps_per_call=k, per_step_s=wall, cpu_per_step_s=cpu_s, speedups=speedups
    )


def report(name: str, r: dict) -> None:
    t, c = r["per_step_s"], r["cpu_per_step_s"]
    times = " ".join(f"{t[n] * 1e3:7.3f}/{c[n] * 1e3:.3f}" for n in IMPLS)
    ups = "  ".join(
        f"{u['yardstick']:5.1f}x/{u['loop']:5.1f}x" for u in r["speedups"].values()
    )
    print(f"{name:<4} {r['steps_per_call']:>4} {times}   {ups}", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of ~0.2 s")
    parser.add_argument("--workloads", default="W0,W1,W2,W3")
    args = parser.parse_args(argv)
    rounds, target = (3, 0.2) if args.quick else (7, 0.5)
    print(f"{jax_versions()}, {jax.devices()[0].device_kind}, rounds={rounds}")
    print(
        "per-step ms (wall/CPU): " + ", ".join(IMPLS) + "; speed-up of run_steps over"
    )
    print("yardstick/loop: wall (medians), wall (paired per round), CPU (paired)")
    results = {}
    for name in args.workloads.split(","):
        results[name] = time_workload(name, rounds, target)
        report(name, results[name])
    if "W0" in results:
        best = max(u["yardstick"] for u in results["W0"]["speedups"].values())
        worst = min(u["yardstick"] for u in results["W0"]["speedups"].values())
        verdict = (
            "met" if worst >= 5 else "met on some measures" if best >= 5 else "MISSED"
        )
        print(
            f"W0 run_steps >= 5x faster than the yardstick's per-call loop: {verdict}"
        )
    return results


if __name__ == "__main__":
    main()
