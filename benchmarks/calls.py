"""Time each public computing call of `jpc` against the same maths in pure JAX.

    python -m benchmarks.calls --quick       # 3 rounds, under a minute
    python -m benchmarks.calls [--rounds N] [--calls a,b] [--out FILE]

One workload, W1 of `benchmarks.run` (784-300-300-10 tanh, batch 64, the
`jpc.make_mlp` layout; the yardstick's `(W, b)` list holds the same weights).
Each call of `jpc` (the energy, its activity and parameter gradients, one
activity and one parameter update, the feedforward initialisation, the default
ODE inference, the fused and ODE training steps, the backprop step and the
discriminative test) is timed per call beside a `jax.jit` of the same maths
built from `benchmarks.yardstick` (its `energy`, `feedforward`, `adam_update`,
`infer_ode`, `make_pc_step`, `make_ode_pc_step`, `make_bp_step`). Before any
timing, each pair is checked to compute the same numbers (float32 round-off);
the check raises otherwise.

Timing is `benchmarks.run.time_interleaved`: compile excluded, a few calls per
round (chained where the call returns a state: the updates and the steps),
the implementations of one call interleaved in each round so that they see
the same machine load. Printed per call: the median wall time of
the pure-JAX version and the ratios jpc / pure JAX (of the wall medians | the
median paired wall ratio | the median paired CPU-time ratio). The default ODE
training step is compared with the yardstick's steady-state stop
(`stop="polish"`) and with a solve to `max_t1` with no stop (`stop="none"`);
the first is checked to reach the same inferred state, the second reaches a
different one by design and is a floor on the solve's cost.
Writes JSON (default `benchmarks/results/calls.json`).
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import jpc

from . import run, yardstick as ys
from .run import ACTIVITY_LR, MAX_T1, PARAM_LR


RTOL = 1e-4  # float32 round-off, relative to the largest entry of each leaf


# ------------------------------------------------------------------- inputs


class Inputs:
    """W1 and an off-equilibrium state (feedforward plus noise) to evaluate at."""

    def __init__(self, seed: int = 0):
        self.p = p = run.make_problem(run.WORKLOADS["W1"], seed)
        self.act = jpc.get_act_fn(p.workload.act)
        ffwd = jpc.init_activities_with_ffwd(p.model, p.x)
        keys = jr.split(jr.PRNGKey(seed + 1), len(ffwd))
        self.activities = [z + 0.1 * jr.normal(k, z.shape) for z, k in zip(ffwd, keys)]
        self.hidden = self.activities[:-1]  # the yardstick's free activities


def _stateless(fn: Callable, *args, **kwargs):
    """`(step, state)` for `run.time_interleaved`: the same call every time."""

    def step(state):
        return state, fn(*args, **kwargs)

    return step, None


# ---------------------------------------------------- pure-JAX counterparts
# Only those the yardstick has no function for; `act` is closed over, as there.


def pure_feedforward(act):
    return jax.jit(lambda params, x: ys.feedforward(params, act, x))


def pure_energy(act):
    return jax.jit(lambda params, hidden, x, y: ys.energy(params, hidden, x, y, act))


def pure_activity_grad(act):
    """Energy and `∂F/∂z` (`jpc.compute_pc_activity_grad` returns both)."""
    grad = jax.value_and_grad(ys.energy, argnums=1)
    return jax.jit(lambda params, hidden, x, y: grad(params, hidden, x, y, act))


def pure_param_grads(act):
    grad = jax.grad(ys.energy)
    return jax.jit(lambda params, hidden, x, y: grad(params, hidden, x, y, act))


def pure_activity_update(act, lr: float):
    """One SGD step on the hidden activities: `(energy, hidden, grads)`."""
    grad = jax.value_and_grad(ys.energy, argnums=1)

    @jax.jit
    def update(params, hidden, x, y):
        e, grads = grad(params, hidden, x, y, act)
        return e, [z - lr * g for z, g in zip(hidden, grads)], grads

    return update


def pure_param_update(act, lr: float):
    """One Adam step on the parameters: `(params, opt_state, grads)`."""
    grad = jax.grad(ys.energy)

    @jax.jit
    def update(params, opt_state, hidden, x, y):
        grads = grad(params, hidden, x, y, act)
        return (*ys.adam_update(params, grads, opt_state, lr), grads)

    return update


def pure_infer_ode(act):
    return jax.jit(lambda params, x, y: ys.infer_ode(params, x, y, act, MAX_T1))


def pure_test(act):
    """Loss (`jpc.mse_loss`) and accuracy in percent of the feedforward prediction."""

    @jax.jit
    def test(params, x, y):
        pred = ys.feedforward(params, act, x)[-1]
        loss = 0.5 * jnp.sum((y - pred) ** 2) / y.shape[0]
        hits = jnp.argmax(pred, axis=1) == jnp.argmax(y, axis=1)
        return loss, 100 * jnp.mean(hits)

    return test


# ------------------------------------------------------------------- checks


def rel_err(ours, theirs) -> float:
    """Largest `max|a - b| / max|b|` over the leaves of two equal-structure trees."""
    a, b = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    if len(a) != len(b):
        raise AssertionError(f"{len(a)} leaves against {len(b)}")
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
        for u, v in zip(a, b)
    )


def update_err(ours, theirs, lr: float) -> float:
    """Largest difference between two parameter updates from the same start, in
    units of the learning rate: Adam's first step is about `±lr` whatever the
    gradient's size, so a parameter-scale tolerance does not apply to it."""
    a, b = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(a, b)) / lr


def _assert_close(name: str, err: float, tol: float = RTOL) -> float:
    if not err < tol:
        raise AssertionError(f"{name}: jpc and pure JAX differ by {err:.2e}")
    return err


# -------------------------------------------------------------------- calls
# Each returns `(impls, checks)`: `impls` maps names to `(step, state)` for
# `run.time_interleaved`, the pure-JAX baselines first and `"jpc"` last;
# `checks` maps a description to its (asserted) relative difference.


def call_init_ffwd(inp: Inputs):
    p = inp.p
    ff = pure_feedforward(inp.act)
    ours = jpc.init_activities_with_ffwd(p.model, p.x)
    checks = {"activities": rel_err(ours, ff(p.params, p.x))}
    impls = {
        "pure": _stateless(ff, p.params, p.x),
        "jpc": _stateless(jpc.init_activities_with_ffwd, p.model, p.x),
    }
    return impls, checks


def _at_state(inp: Inputs, ours: Callable, theirs: Callable):
    """`(impls, ours_out, theirs_out)` for a `jpc` call taking `(params,
    activities, output, x=input)` and its counterpart taking `(params, hidden, x,
    y)`, both evaluated at the benchmark's off-equilibrium state."""
    p = inp.p
    ours_args = ((p.model, None), inp.activities, p.y)
    theirs_args = (p.params, inp.hidden, p.x, p.y)
    impls = {
        "pure": _stateless(theirs, *theirs_args),
        "jpc": _stateless(ours, *ours_args, x=p.x),
    }
    return impls, ours(*ours_args, x=p.x), theirs(*theirs_args)


def call_energy(inp: Inputs):
    impls, e, e_ys = _at_state(inp, jpc.pc_energy_fn, pure_energy(inp.act))
    return impls, {"energy": rel_err(e, e_ys)}


def call_activity_grad(inp: Inputs):
    fn = pure_activity_grad(inp.act)
    impls, (e, grads), (e_ys, grads_ys) = _at_state(
        inp, jpc.compute_pc_activity_grad, fn
    )
    checks = {"energy": rel_err(e, e_ys), "grads": rel_err(grads[:-1], grads_ys)}
    checks["last grad is zero"] = float(jnp.max(jnp.abs(grads[-1])))
    return impls, checks


def call_param_grads(inp: Inputs):
    fn = pure_param_grads(inp.act)
    impls, (grads, _), theirs = _at_state(inp, jpc.compute_pc_param_grads, fn)
    return impls, {"grads": rel_err(run._linear_params(grads), theirs)}


def call_update_activities(inp: Inputs):
    """One SGD step on the activities, chained: each call starts from the last."""
    p, optim = inp.p, optax.sgd(ACTIVITY_LR)
    fn = pure_activity_update(inp.act, ACTIVITY_LR)

    def ours(state):
        z, opt_state = state
        out = jpc.update_pc_activities(
            (p.model, None), z, optim, opt_state, p.y, input=p.x
        )
        return (out["activities"], out["opt_state"]), out["energy"]

    def theirs(hidden):
        e, hidden, _ = fn(p.params, hidden, p.x, p.y)
        return hidden, e

    jpc_state = (inp.activities, optim.init(inp.activities))
    (z, _), e = ours(jpc_state)
    hidden, e_ys = theirs(inp.hidden)
    checks = {"energy": rel_err(e, e_ys), "activities": rel_err(z[:-1], hidden)}
    return {"pure": (theirs, inp.hidden), "jpc": (ours, jpc_state)}, checks


def call_update_params(inp: Inputs):
    """One Adam step on the parameters, chained: each call starts from the last."""
    p = inp.p
    fn = pure_param_update(inp.act, PARAM_LR)

    def ours(state):
        model, opt_state = state
        out = jpc.update_pc_params(
            (model, None), inp.activities, p.optim, opt_state, p.y, input=p.x
        )
        return (out["model"], out["opt_state"]), out["opt_state"][0].count

    def theirs(state):
        params, opt_state, _ = fn(*state, inp.hidden, p.x, p.y)
        return (params, opt_state), opt_state[0]

    jpc_state = (p.model, run.adam_state(p, p.model))
    ys_state = (p.params, ys.adam_init(p.params))
    out = jpc.update_pc_params(
        (p.model, None), inp.activities, p.optim, jpc_state[1], p.y, input=p.x
    )
    params, _, grads = fn(*ys_state, inp.hidden, p.x, p.y)
    checks = {
        "grads": rel_err(run._linear_params(out["grads"][0]), grads),
        "update / lr": update_err(run._linear_params(out["model"]), params, PARAM_LR),
    }
    return {"pure": (theirs, ys_state), "jpc": (ours, jpc_state)}, checks


def call_solve_inference(inp: Inputs):
    """The default ODE inference from the feedforward state (the yardstick's
    `infer_ode` also runs the feedforward pass, one energy's worth of work)."""
    p = inp.p
    fn = pure_infer_ode(inp.act)
    z0 = jpc.init_activities_with_ffwd(p.model, p.x)
    checks = {"inferred activities": run.check_same_ode(p)}

    def ours():
        return jpc.solve_inference((p.model, None), z0, p.y, input=p.x, max_t1=MAX_T1)

    impls = {
        "pure": _stateless(fn, p.params, p.x, p.y),
        "jpc": _stateless(ours),
    }
    return impls, checks


def _step_checks(p, pairs) -> dict[str, float]:
    """Gradients of the first call of each `(jpc, yardstick)` step, read from
    Adam's first moment (`0.1 × grads` after one step). The updated parameters
    are not compared: Adam's first step is about `±lr` per entry whatever the
    gradient's size, so round-off in a gradient entry near Adam's `eps` (or near
    zero) moves its parameter by a sizeable fraction of `lr`."""
    checks = {}
    for ours, theirs in pairs:
        (step, state), (ys_step, ys_state) = run.IMPLS[ours](p), run.IMPLS[theirs](p)
        (_, (adam, _)), (_, (_, mu, _)) = step(state)[0], ys_step(ys_state)[0]
        err = rel_err(run._linear_params(adam.mu[0]), mu)
        checks[f"{ours} vs {theirs}: grads"] = err
    return checks


def step_call(ours: str, theirs: str) -> Callable:
    """The call of `run.IMPLS[ours]` against `run.IMPLS[theirs]`, gradients checked."""

    def call(inp: Inputs):
        checks = _step_checks(inp.p, [(ours, theirs)])
        return {"pure": run.IMPLS[theirs](inp.p), "jpc": run.IMPLS[ours](inp.p)}, checks

    return call


def call_pc_step_ode(inp: Inputs):
    """`make_pc_step`'s default ODE path against the yardstick with its
    steady-state stop (`pure`) and with no stop (`stop=none`, not checked:
    it integrates to `max_t1`, a different end state by design)."""
    p = inp.p
    checks = _step_checks(p, [("ode", "yardstick_ode")])
    checks["inferred activities"] = run.check_same_ode(p)
    impls = {
        "pure": run.impl_yardstick_ode(p),
        "stop=none": run.impl_yardstick_ode_nostop(p),
        "jpc": run.impl_ode(p),
    }
    return impls, checks


def call_test_discriminative(inp: Inputs):
    p = inp.p
    fn = pure_test(inp.act)
    loss, acc = jpc.test_discriminative_pc(p.model, p.y, p.x)
    loss_ys, acc_ys = fn(p.params, p.x, p.y)
    checks = {"loss": rel_err(loss, loss_ys), "accuracy": rel_err(acc, acc_ys)}
    impls = {
        "pure": _stateless(fn, p.params, p.x, p.y),
        "jpc": _stateless(jpc.test_discriminative_pc, p.model, p.y, p.x),
    }
    return impls, checks


CALLS: dict[str, tuple[str, Callable]] = {
    "init_activities_with_ffwd": ("feedforward", call_init_ffwd),
    "pc_energy_fn": ("energy", call_energy),
    "compute_pc_activity_grad": ("value_and_grad(energy, 1)", call_activity_grad),
    "compute_pc_param_grads": ("grad(energy)", call_param_grads),
    "update_pc_activities": ("sgd(0.1) step by hand", call_update_activities),
    "update_pc_params": ("adam(1e-3) step by hand", call_update_params),
    "solve_inference": ("infer_ode (polish stop)", call_solve_inference),
    "make_pc_step fused": ("make_pc_step (T=20)", step_call("fused", "yardstick")),
    "make_pc_step ODE": ("make_ode_pc_step polish", call_pc_step_ode),
    "make_bp_step": ("make_bp_step", step_call("bp", "bp_yardstick")),
    "test_discriminative_pc": ("feedforward + loss/acc", call_test_discriminative),
}


# ------------------------------------------------------------------ running


def ratios(times: dict, base: str) -> dict[str, float]:
    """jpc / `base`: of the wall medians, of the paired wall and CPU ratios (each
    paired against the group's first implementation, so divided by `base`'s)."""
    ours, theirs = times["jpc"], times[base]
    return {
        "base_median_s": theirs["median_s"],
        "jpc_median_s": ours["median_s"],
        "median": ours["median_s"] / theirs["median_s"],
        "paired_wall": ours["paired_ratio"] / theirs["paired_ratio"],
        "paired_cpu": ours["paired_cpu_ratio"] / theirs["paired_cpu_ratio"],
    }


def run_calls(names, rounds: int, target: float) -> dict[str, Any]:
    inp = Inputs()
    results = {}
    for name in names:
        counterpart, build = CALLS[name]
        impls, checks = build(inp)
        for what, err in checks.items():
            tol = 1e-3 if what.endswith("/ lr") else RTOL
            _assert_close(f"{name} ({what})", err, tol)
        times = run.time_interleaved(impls, rounds, target)
        for t in times.values():
            del t["first_state"]
        bases = [k for k in times if k != "jpc"]
        entry = {"counterpart": counterpart, "checks": checks, "times": times}
        entry["ratios"] = {b: ratios(times, b) for b in bases}
        r = entry["ratios"]["pure"]
        print(
            f"[{name}] pure {run._fmt_time(r['base_median_s'])}, "
            f"jpc/pure {r['median']:.2f}",
            flush=True,
        )
        results[name] = entry
    return results


def print_table(results: dict) -> None:
    print(
        "\nper call, W1 (784-300-300-10 tanh, batch 64): median wall time of the"
        " pure-JAX version,\nratio jpc / pure JAX (of wall medians | paired wall |"
        " paired CPU), largest check difference"
    )
    head = f"{'jpc call':28}{'pure-JAX counterpart':28}{'pure':>9}  {'ratios':>18}"
    print(head + f"{'check':>10}")
    for name, entry in results.items():
        for base, r in entry["ratios"].items():
            label = entry["counterpart"] if base == "pure" else f"  vs {base}"
            cells = f"{r['median']:.2f}|{r['paired_wall']:.2f}|{r['paired_cpu']:.2f}"
            check = max(entry["checks"].values()) if base == "pure" else float("nan")
            print(
                f"{name if base == 'pure' else '':28}{label:28}"
                f"{run._fmt_time(r['base_median_s']):>9}  {cells:>18}"
                + (f"{check:>10.1e}" if base == "pure" else f"{'-':>10}")
            )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", default=",".join(CALLS), help="comma-separated")
    parser.add_argument("--out", default="benchmarks/results/calls.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 11)
    target = 0.05 if args.quick else 0.1
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": run.machine(), "rounds": rounds}
    print(results["machine"], flush=True)
    names = [n for n in args.calls.split(",") if n]
    results["calls"] = run_calls(names, rounds, target)
    print_table(results["calls"])
    results["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=run._json_default))
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
