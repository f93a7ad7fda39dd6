"""Why the ODE steps are timed from a fixed state: chained calls change the work.

    python -m benchmarks.chained_ode [--calls 600] [--every 100]

On W1's shapes (784-300-300-10 tanh, batch 64, Adam), the default ODE
`jpc.make_pc_step` and the written-out step with no stop
(`benchmarks.yardstick.make_ode_pc_step(..., stop="none")`) are each called
`--calls` times in a chain, every call continuing from the previous call's
parameters on the same batch, as a timing loop that chains its calls does. Every
`--every` calls this prints the default solve's accepted steps and whether its stop
fired (`jpc.solve_inference(..., return_info=True)` from the feedforward state of
the current model), and the time per call of both steps at their current states
(median of 5 calls, each awaited).
"""

import argparse

import jpc
from benchmarks import yardstick as ys
from benchmarks.run import MAX_T1, PARAM_LR, WORKLOADS, adam_state, make_problem
from benchmarks.versions import per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    p = make_problem(WORKLOADS["W1"])
    act = jpc.get_act_fn(p.workload.act)
    nostop = ys.make_ode_pc_step(act, MAX_T1, PARAM_LR, "none")
    model, opt_state = p.model, adam_state(p, p.model)
    params, ys_state = p.params, ys.adam_init(p.params)

    def ours():
        return jpc.make_pc_step(model, p.optim, opt_state, p.y, input=p.x)["loss"]

    def theirs():
        return nostop(params, ys_state, p.x, p.y)[2]

    print("| calls made | accepted steps | stop fired | jpc ms | no stop ms | ratio |")
    print("|---|---|---|---|---|---|")
    for k in range(args.calls + 1):
        if k % args.every == 0:
            z0 = jpc.init_activities_with_ffwd(model, p.x)
            _, info = jpc.solve_inference(
                (model, None), z0, p.y, input=p.x, max_t1=MAX_T1, return_info=True
            )
            a, b = per_call(ours, 5), per_call(theirs, 5)
            print(
                f"| {k} | {int(info.n_accepted_steps)} | "
                f"{bool(info.steady_state_reached)} | {a * 1e3:.2f} | {b * 1e3:.2f} | "
                f"{a / b:.2f} |"
            )
        out = jpc.make_pc_step(model, p.optim, opt_state, p.y, input=p.x)
        model, opt_state = out["model"], out["opt_state"]
        params, ys_state, _ = nostop(params, ys_state, p.x, p.y)


if __name__ == "__main__":
    main()
