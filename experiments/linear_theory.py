"""Theoretical vs numerical equilibrium energy of a deep linear PCN trained on MNIST.

A deep linear network (`jpc.make_mlp(..., act_fn="linear")`, no biases) is trained as a
PCN on MNIST (MSE on one-hot labels). Each step runs inference from the feedforward
state (T SGD steps on the activities) and one Adam step on the weights at the inferred
activities (`jpc.update_pc_params`). Every `--record-every` steps the run records, on
the current batch:

- the numerical energy at the inferred activities (`jpc.pc_energy_fn`);
- the closed-form equilibrium energy (`jpc.linear_equilib_energy`);
- the energy at the exact equilibrium found by one linear solve
  (`jpc.compute_linear_activity_solution`), a second closed-form path;
- the feedforward loss (MSE of the prediction).

    python -m experiments.linear_theory [--quick]

Writes `results.json` and `linear_theory.png` to `--out-dir`.
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import jpc
from experiments._progress import progress
from jpc import datasets
from jpc._compat import jax_info


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "linear_theory"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.linear_theory",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="number of layers L")
    parser.add_argument("--param-type", default="sp", choices=["sp", "mupc", "ntp"])
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--param-lr", type=float, default=1e-3, help="Adam lr")
    parser.add_argument("--n-inference-steps", type=int, default=200, help="T")
    parser.add_argument(
        "--activity-lr",
        type=float,
        default=0.2,
        help="per-example activity step (the optax lr is this times the batch size)",
    )
    parser.add_argument("--record-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x64", action="store_true", help="run in float64")
    parser.add_argument("--quick", action="store_true", help="60 iterations")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.record_every = 60, 5
    return args


def make_step(args):
    """Jitted PC step returning the model, optimiser state and the four energies."""
    activity_optim = optax.sgd(args.activity_lr * args.batch_size)
    optim = optax.adam(args.param_lr)
    kw = dict(param_type=args.param_type)

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        params = (model, None)
        acts = jpc.init_activities_with_ffwd(model, x, **kw)
        ffwd_loss = jpc.mse_loss(acts[-1], y)

        def infer(carry, _):
            z, state = carry
            _, grads = jpc.compute_pc_activity_grad(params, z, y, x=x, **kw)
            updates, state = activity_optim.update(grads, state, z)
            return (optax.apply_updates(z, updates), state), None

        carry = (acts, activity_optim.init(acts))
        (acts, _), _ = jax.lax.scan(infer, carry, length=args.n_inference_steps)
        exact = jpc.compute_linear_activity_solution(model, x, y, **kw)
        energies = {
            "numerical": jpc.pc_energy_fn(params, acts, y, x=x, **kw),
            "theory": jpc.linear_equilib_energy(params, x, y, **kw),
            "linear_solve": jpc.pc_energy_fn(params, exact, y, x=x, **kw),
            "feedforward_loss": ffwd_loss,
        }
        out = jpc.update_pc_params(params, acts, optim, opt_state, y, input=x, **kw)
        return out["model"], out["opt_state"], energies

    return step, optim


def save_plot(log: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = np.asarray(log["iter"])
    theory, numerical = np.asarray(log["theory"]), np.asarray(log["numerical"])
    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(
        iters, numerical, "o", ms=4, label=f"numerical (T={args.n_inference_steps})"
    )
    ax.plot(iters, theory, "-", label="theory (closed form)")
    ax.plot(iters, log["feedforward_loss"], "--", alpha=0.6, label="feedforward MSE")
    ax.set(xlabel="training iteration", ylabel="energy", yscale="log")
    ax_err.plot(iters, np.abs(numerical - theory) / theory, "o-", ms=3)
    ax_err.set(
        xlabel="training iteration",
        ylabel="|numerical − theory| / theory",
        yscale="log",
    )
    for a in (ax, ax_err):
        a.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(
        f"Deep linear PCN on MNIST: L={args.depth}, N={args.width}, "
        f"{args.param_type}, batch {args.batch_size}, "
        f"{'float64' if args.x64 else 'float32'}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", args.x64)
    images, labels = datasets.load_mnist("train", args.data_dir)
    targets = datasets.one_hot(labels, 10)
    model = jpc.make_mlp(
        jr.PRNGKey(args.seed),
        784,
        args.width,
        args.depth,
        10,
        "linear",
        param_type=args.param_type,
    )
    step, optim = make_step(args)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    batches = datasets.batches(images, targets, args.batch_size, args.seed)
    keys = ("numerical", "theory", "linear_solve", "feedforward_loss")
    log = {"iter": [], **{k: [] for k in keys}}
    start = time.perf_counter()
    for it in progress(range(args.iters + 1), desc="linear PCN", dynamic_ncols=True):
        x, y = map(jnp.asarray, next(batches))
        model, opt_state, energies = step(model, opt_state, x, y)
        if it % args.record_every == 0:
            log["iter"].append(it)
            for k in keys:
                log[k].append(float(energies[k]))
    seconds = time.perf_counter() - start
    theory, numerical = np.asarray(log["theory"]), np.asarray(log["numerical"])
    rel = np.abs(numerical - theory) / theory
    solve_rel = np.abs(np.asarray(log["linear_solve"]) - theory) / theory
    summary = {
        "max_rel_diff_numerical": float(rel.max()),
        "median_rel_diff_numerical": float(np.median(rel)),
        "max_rel_diff_linear_solve": float(solve_rel.max()),
        "energy_first": theory[0].item(),
        "energy_last": theory[-1].item(),
        "seconds": seconds,
    }
    print(
        f"theory vs numerical: max rel. diff {summary['max_rel_diff_numerical']:.2e}, "
        f"median {summary['median_rel_diff_numerical']:.2e}; theory vs linear solve: "
        f"{summary['max_rel_diff_linear_solve']:.2e}; energy "
        f"{summary['energy_first']:.4f} → {summary['energy_last']:.4f} "
        f"({seconds:.0f} s)"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_plot(log, args, args.out_dir / "linear_theory.png")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {
        "config": config,
        "jax": jax_info(),
        "summary": summary,
        "log": log,
    }
    (args.out_dir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"Wrote {args.out_dir / 'results.json'} and linear_theory.png")
    return out


if __name__ == "__main__":
    main()
