"""The steady-state stop, step by step: where its line-search check decides.

    python -m benchmarks.stop_trace

For each problem, one default ODE solve (`jpc.solve_inference`, Heun + PID,
`record_iters=True`) from the feedforward state, then at the initial state and
after every accepted step: the stop's plain ratio (at most 1: steady), the ratio
after its exact line-search step (`polished`, the check's value; at most 1 with a
plain ratio above 1: the check fires), and whether the plain ratio had fallen
since the previous state. Both ratios are recomputed from the recorded states
with the stop's own functions (`jpc._infer.steady_state_ratio`,
`jpc._infer.polished_ratio`).

The question it answers: could the check, one Hessian-vector product per step
while it runs, be skipped on the steps where it cannot fire? It lists the steps
on which the check fires and whether the plain ratio had fallen there: a rule
that ran the check only on steps where the ratio did not fall would have missed
every firing step marked `fell`.
"""

import jax
import jax.numpy as jnp
import jax.random as jr

import jpc
from jpc import _infer
from jpc._grads import neg_pc_activity_grad


RTOL = ATOL = 1e-3


def _problems():
    """(name, model, x, y, max_t1): W0 and W4 of `benchmarks.run`, then small MLPs."""
    from benchmarks.run import WORKLOADS, make_problem

    w0 = make_problem(WORKLOADS["W0"])
    yield "W0 8-8-8-2 tanh b4, max_t1=2000", w0.model, w0.x, w0.y, 2000.0
    w4 = make_problem(WORKLOADS["W4"])
    yield "W4 784-300-300-10 tanh b64, max_t1=20", w4.model, w4.x, w4.y, 20.0
    yield "W4, max_t1=2000", w4.model, w4.x, w4.y, 2000.0
    for width, depth, act, batch, seed in [
        (8, 3, "tanh", 4, 0),
        (32, 4, "tanh", 8, 2),
        *[(16, 5, "tanh", 8, s) for s in range(3, 8)],
        (64, 8, "relu", 16, 3),
    ]:
        model = jpc.make_mlp(jr.PRNGKey(seed), 12, width, depth, 5, act)
        x = jr.normal(jr.PRNGKey(seed + 1), (batch, 12))
        y = jax.nn.one_hot(jnp.arange(batch) % 5, 5)
        name = f"12-{width}x{depth - 1}-5 {act} b{batch} seed {seed}, max_t1=2000"
        yield name, model, x, y, 2000.0


def trace(model, x, y, max_t1) -> tuple[list, dict]:
    """Per state: (step, plain ratio, polished ratio, whether the ratio fell)."""
    activities = jpc.init_activities_with_ffwd(model, x)
    rows, info = jpc.solve_inference(
        (model, None), activities, y, input=x, max_t1=max_t1, record_iters=True,
        return_info=True, max_steps=1024,
    )  # fmt: skip
    args = _infer.vector_field_args(
        (model, None), y, x, loss_id="mse", param_type="sp", weight_decay=0.0,
        spectral_penalty=0.0, activity_decay=0.0,
    )  # fmt: skip

    @jax.jit
    def ratios(z):
        field = neg_pc_activity_grad(None, z, args)
        plain = _infer.steady_state_ratio(field[:-1], z[:-1], RTOL, ATOL)
        return plain, _infer.polished_ratio(z, field, args, RTOL, ATOL)

    n = int(info.n_accepted_steps)
    states = [list(activities)] + [[r[k] for r in rows] for k in range(n)]
    out, previous = [], float("inf")
    for k, z in enumerate(states):
        plain, polished = map(float, ratios(z))
        out.append((k, plain, polished, plain < previous))
        previous = plain
    summary = {"steps": n, "stopped": bool(info.steady_state_reached)}
    return out, summary


def main() -> None:
    for name, model, x, y, max_t1 in _problems():
        rows, summary = trace(model, x, y, max_t1)
        checked = [r for r in rows if 1 < r[1] < _infer._POLISH_BELOW]
        fires = [r for r in checked if r[2] <= 1]
        plain = [r[1] for r in rows]
        print(f"{name}: {summary['steps']} steps, stopped {summary['stopped']}")
        print(f"  check runs at {len(checked)} of {len(rows)} states", end="")
        print(f"; plain ratio from {min(plain):.3g} to {max(plain):.3g}")
        for k, plain, polished, fell in rows[-3:]:
            print(
                f"  state {k:4d}: plain {plain:8.3f}  polished {polished:8.3f}", end=""
            )
            print(f"  {'fell' if fell else 'did not fall'}")
        print(
            "  check fires at:",
            ", ".join(
                f"{k} ({'fell' if f else 'did not fall'})" for k, _, _, f in fires
            )
            or "none",
            flush=True,
        )


if __name__ == "__main__":
    main()
