"""μPC against standard PC and backprop on deep residual MLPs: accuracy vs depth.

The setting of μPC (Innocenti et al., 2025): residual ReLU MLPs of width 128 on MNIST
(`jpc.make_mlp` plus the identity skips of `jpc.make_skip_model`: a skip around every
hidden layer, none at the input and output layers), no biases, batch 64, one epoch,
Adam on the weights and T = depth SGD steps on the activities, fused into one compiled
step ([`jpc.make_pc_step`][] with `activity_optim` and `n_inference_steps`):

- `muPC`: `param_type="mupc"` (weights drawn from N(0, 1), scaled in the forward pass
  by 1/√D at the input, 1/√(N L) in the residual blocks and 1/N at the output);
- `PC`: the same residual network in the standard parameterisation (`"sp"`,
  Equinox's default initialisation) — standard PC, expected to degrade with depth;
- `BP`: backprop ([`jpc.make_bp_step`][]) on the μPC-parameterised network.

For every depth the three methods see the same batches; the test accuracy is measured
by a feedforward pass every `--eval-every` iterations and after the epoch (or after
`--max-iters` iterations).

    python -m experiments.mupc_depth                            # depths 8, 16, 32, 64
    python -m experiments.mupc_depth --depths 8 16 --max-iters 300
    python -m experiments.mupc_depth --quick

Writes `results.json` and `mupc_depth.png` to `--out-dir`.
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
from tqdm import tqdm

import jpc
from jpc import datasets


N_CLASSES = 10
METHODS = ("muPC", "PC", "BP")
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "mupc_depth"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mupc_depth",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-iters", type=int, default=None, help="cap on the epoch's iterations"
    )
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--mupc-param-lr", type=float, default=0.1, help="Adam")
    parser.add_argument("--mupc-activity-lr", type=float, default=0.5, help="SGD")
    parser.add_argument("--pc-param-lr", type=float, default=1e-3, help="Adam")
    parser.add_argument("--pc-activity-lr", type=float, default=0.5, help="SGD")
    parser.add_argument("--bp-param-lr", type=float, default=0.1, help="Adam")
    parser.add_argument("--seed", type=int, default=0, help="init and batch order")
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument(
        "--quick", action="store_true", help="depths 4 and 8, 100 iterations"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.max_iters, args.eval_every = [4, 8], 100, 50
    if min(args.depths) < 3:
        parser.error(
            "--depths must be at least 3 (a residual block needs a hidden layer)"
        )
    for name in ("width", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_iters is not None and args.max_iters < 1:
        parser.error("--max-iters must be positive")
    return args


def load_data(data_dir):
    """MNIST standardised with the training set's pixel mean and std, one-hot."""
    train = datasets.load_mnist("train", data_dir)
    test = datasets.load_mnist("test", data_dir)
    mean, std = train[0].mean(), train[0].std()
    train = ((train[0] - mean) / std, datasets.one_hot(train[1], N_CLASSES))
    test = tuple(
        jnp.asarray(a)
        for a in ((test[0] - mean) / std, datasets.one_hot(test[1], N_CLASSES))
    )
    return train, test


# ------------------------------------------------------------------------ training


class Method:
    """A method on a depth-`depth` residual net: its model, optimisers and step."""

    def __init__(self, name: str, depth: int, args, optims: dict):
        self.name = name
        self.param_type = "sp" if name == "PC" else "mupc"
        self.model = jpc.make_mlp(
            jr.PRNGKey(args.seed),
            28 * 28,
            args.width,
            depth,
            N_CLASSES,
            "relu",
            use_bias=False,
            param_type=self.param_type,
        )
        self.skip_model = jpc.make_skip_model(depth)
        self.optim, self.activity_optim = optims[name]
        self.n_steps = depth
        params = (eqx.filter(self.model, eqx.is_array), self.skip_model)
        self.opt_state = self.optim.init(params)

    def step(self, x, y) -> float:
        kwargs = dict(input=x, skip_model=self.skip_model, param_type=self.param_type)
        if self.name == "BP":
            result = jpc.make_bp_step(
                self.model, self.optim, self.opt_state, y, **kwargs
            )
        else:
            result = jpc.make_pc_step(
                self.model,
                self.optim,
                self.opt_state,
                y,
                activity_optim=self.activity_optim,
                n_inference_steps=self.n_steps,
                **kwargs,
            )
        self.model, self.opt_state = result["model"], result["opt_state"]
        return result["loss"]

    def test_acc(self, test) -> float:
        x, y = test
        _, acc = jpc.test_discriminative_pc(
            self.model, y, x, skip_model=self.skip_model, param_type=self.param_type
        )
        return float(acc)


def make_optims(args) -> dict:
    """`(param optimiser, activity optimiser)` per method, built once for all depths."""
    return {
        "muPC": (optax.adam(args.mupc_param_lr), optax.sgd(args.mupc_activity_lr)),
        "PC": (optax.adam(args.pc_param_lr), optax.sgd(args.pc_activity_lr)),
        "BP": (optax.adam(args.bp_param_lr), None),
    }


def train(method: Method, train_data, test, args) -> dict:
    """One epoch (or `--max-iters`) of one method; test accuracy along the way.

    A run whose loss or energy stops being finite is stopped and marked `diverged`;
    its accuracy is that of the last finite model.
    """
    x_train, y_train = train_data
    n_iters = len(x_train) // args.batch_size
    n_iters = min(n_iters, args.max_iters) if args.max_iters else n_iters
    batches = datasets.batches(x_train, y_train, args.batch_size, args.seed)
    log = {"eval_iter": [0], "test_acc": [method.test_acc(test)], "diverged": False}
    log["train_loss"], seconds = [], []
    desc = f"{method.name} depth {method.n_steps}"
    for it in tqdm(range(1, n_iters + 1), desc=desc, dynamic_ncols=True, leave=False):
        x, y = next(batches)
        start = time.perf_counter()
        try:
            loss = float(method.step(x, y))
        except Exception as e:  # eqx.error_if on a non-finite energy
            if "not finite" not in str(e):
                raise
            loss = float("nan")
        seconds.append(time.perf_counter() - start)
        log["train_loss"].append(loss)
        if not np.isfinite(loss):
            log["diverged"] = True
        if log["diverged"] or it % args.eval_every == 0 or it == n_iters:
            log["eval_iter"].append(it)
            log["test_acc"].append(method.test_acc(test))
        if log["diverged"]:
            break
    steady = seconds[1:] or seconds
    log.update(
        n_iters=len(seconds),
        first_step_seconds=seconds[0],
        median_step_seconds=float(np.median(steady)),
        train_seconds=float(np.sum(seconds)),
        final_test_acc=log["test_acc"][-1],
    )
    return log


# ------------------------------------------------------------------------- outputs


def save_plot(results: dict, path: Path) -> None:
    """Final test accuracy vs depth; test-accuracy curves per method and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_depth, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    depths = sorted(int(d) for d in results)
    colours = {"muPC": "tab:blue", "PC": "tab:orange", "BP": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for name in next(iter(results.values())):
        accs = [results[str(d)][name]["final_test_acc"] for d in depths]
        ax_depth.plot(depths, accs, "o-", color=colours[name], label=name)
        for i, d in enumerate(depths):
            run = results[str(d)][name]
            ax_curve.plot(
                run["eval_iter"],
                run["test_acc"],
                styles[i % len(styles)],
                color=colours[name],
                label=f"{name}, depth {d}",
            )
    ax_depth.set_xscale("log", base=2)
    ax_depth.set(xlabel="depth L", ylabel="test accuracy (%)", ylim=(0, 100))
    ax_depth.set_xticks(depths, [str(d) for d in depths])
    ax_depth.minorticks_off()
    ax_depth.set_title("end of training (one epoch or --max-iters)")
    ax_curve.set(xlabel="iteration", ylabel="test accuracy (%)", ylim=(0, 100))
    for ax in (ax_depth, ax_curve):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("μPC vs standard PC vs backprop, residual ReLU MLPs on MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(results: dict) -> None:
    methods = list(next(iter(results.values())))
    print("\ntest accuracy (%) after training; median step time (ms)")
    print(f"{'depth':>6}" + "".join(f"{m:>22}" for m in methods))
    for depth, runs in results.items():
        cells = []
        for m in methods:
            r = runs[m]
            flag = " (div)" if r["diverged"] else ""
            ms = 1e3 * r["median_step_seconds"]
            cells.append(f"{r['final_test_acc']:6.2f}{flag} / {ms:.0f}")
        print(f"{depth:>6}" + "".join(f"{c:>22}" for c in cells))


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_data, test = load_data(args.data_dir)
    n_train, n_test = len(train_data[0]), len(test[0])
    print(f"MNIST: {n_train} train / {n_test} test; JAX {jax.__version__}")
    optims = make_optims(args)
    results = {}
    for depth in args.depths:
        results[str(depth)] = {}
        for name in args.methods:
            run = train(Method(name, depth, args, optims), train_data, test, args)
            results[str(depth)][name] = run
            print(
                f"depth {depth:3d} {name:5}: test acc {run['final_test_acc']:.2f}% "
                f"after {run['n_iters']} iterations"
                + (" (diverged)" if run["diverged"] else "")
            )
    print_summary(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_plot(results, args.out_dir / "mupc_depth.png")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    output = {
        "config": {**config, "act_fn": "relu", "loss": "mse", "T": "depth"},
        "jax": {"version": jax.__version__, "backend": jax.default_backend()},
        "results": results,
    }
    (args.out_dir / "results.json").write_text(json.dumps(output, indent=2))
    print(f"Wrote {args.out_dir / 'results.json'} and mupc_depth.png")
    return output


if __name__ == "__main__":
    main()
