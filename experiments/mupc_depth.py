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

Each (depth, method) run is a cell of the resumable runner (`experiments/_runner.py`),
saved to its own JSON file under `--cells-dir` as soon as it ends; rerunning the same
command skips the finished cells:

    python -m experiments.mupc_depth                    # depths 8 … 128, one epoch
    python -m experiments.mupc_depth --depths 8 16 --max-iters 300
    python -m experiments.mupc_depth summary            # table and plot from the cells
    python -m experiments.mupc_depth --quick

Writes `summary.md`, `summary.json` and `mupc_depth.png` to `--out-dir`.
"""

import argparse
import functools
import os
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import jpc
from experiments import _runner
from experiments._progress import progress
from jpc import datasets
from jpc._compat import jax_versions


N_CLASSES = 10
METHODS = ("muPC", "PC", "BP")
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "mupc_depth"
DEFAULT_CELLS_DIR = Path(__file__).parent / "cells" / "mupc_depth"
QUICK_DIR = DEFAULT_OUT_DIR.with_name("mupc_depth_quick")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mupc_depth",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _runner.add_runner_args(parser, DEFAULT_CELLS_DIR)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
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
    return parser


def check_args(args, parser) -> None:
    if args.quick:
        args.depths, args.max_iters, args.eval_every = [4, 8], 100, 50
        if args.cells_dir == DEFAULT_CELLS_DIR:
            args.cells_dir = QUICK_DIR / "cells"
        if args.out_dir == DEFAULT_OUT_DIR:
            args.out_dir = QUICK_DIR
    if min(args.depths) < 3:
        parser.error(
            "--depths must be at least 3 (a residual block needs a hidden layer)"
        )
    for name in ("width", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.max_iters is not None and args.max_iters < 1:
        parser.error("--max-iters must be positive")
    if args.data_dir is not None:  # read by every cell, also in worker processes
        os.environ["JPC_DATA_DIR"] = str(args.data_dir)


@functools.cache
def load_data():
    """MNIST standardised with the training set's pixel mean and std, one-hot."""
    train = datasets.load_mnist("train")
    test = datasets.load_mnist("test")
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

    def __init__(self, name: str, depth: int, params: dict):
        self.name = name
        self.param_type = "sp" if name == "PC" else "mupc"
        self.model = jpc.make_mlp(
            jr.PRNGKey(params["seed"]),
            28 * 28,
            params["width"],
            depth,
            N_CLASSES,
            "relu",
            use_bias=False,
            param_type=self.param_type,
        )
        self.skip_model = jpc.make_skip_model(depth)
        self.optim = optax.adam(params["param_lr"])
        self.activity_optim = None if name == "BP" else optax.sgd(params["activity_lr"])
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


def train(method: Method, train_data, test, params: dict) -> dict:
    """One epoch (or `--max-iters`) of one method; test accuracy along the way.

    A run whose loss or energy stops being finite is stopped and marked `diverged`;
    its accuracy is that of the last finite model.
    """
    x_train, y_train = train_data
    max_iters = params["max_iters"]
    n_iters = len(x_train) // params["batch_size"]
    n_iters = min(n_iters, max_iters) if max_iters else n_iters
    batches = datasets.batches(x_train, y_train, params["batch_size"], params["seed"])
    log = {"eval_iter": [0], "test_acc": [method.test_acc(test)], "diverged": False}
    log["train_loss"], seconds, cpu_seconds = [], [], []
    desc = f"{method.name} depth {method.n_steps}"
    for it in progress(
        range(1, n_iters + 1), desc=desc, dynamic_ncols=True, leave=False
    ):
        x, y = next(batches)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            loss = float(method.step(x, y))
        except Exception as e:  # eqx.error_if on a non-finite energy
            if "not finite" not in str(e):
                raise
            loss = float("nan")
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        log["train_loss"].append(loss)
        if not np.isfinite(loss):
            log["diverged"] = True
        if log["diverged"] or it % params["eval_every"] == 0 or it == n_iters:
            log["eval_iter"].append(it)
            log["test_acc"].append(method.test_acc(test))
        if log["diverged"]:
            break
    steady = seconds[1:] or seconds
    log.update(
        n_iters=len(seconds),
        first_step_seconds=seconds[0],
        median_step_seconds=float(np.median(steady)),
        # CPU time of all the process's threads: less sensitive to other jobs than
        # the wall-clock time on a shared machine.
        median_step_cpu_seconds=float(np.median(cpu_seconds[1:] or cpu_seconds)),
        train_seconds=float(np.sum(seconds)),
        final_test_acc=log["test_acc"][-1],
    )
    return log


# ------------------------------------------------------------------------- cells


def plan(args, done: dict) -> list[_runner.Cell]:
    """One cell per (depth, method), shallow depths first."""
    lrs = {
        "muPC": (args.mupc_param_lr, args.mupc_activity_lr),
        "PC": (args.pc_param_lr, args.pc_activity_lr),
        "BP": (args.bp_param_lr, None),
    }
    cells = []
    for depth in args.depths:
        for name in args.methods:
            params = {
                "depth": depth,
                "method": name,
                "width": args.width,
                "batch_size": args.batch_size,
                "max_iters": args.max_iters,
                "eval_every": args.eval_every,
                "param_lr": lrs[name][0],
                "activity_lr": lrs[name][1],
                "seed": args.seed,
            }
            cells.append(_runner.Cell(f"depth{depth}/{name}/seed{args.seed}", params))
    return cells


def run_cell(params: dict) -> dict:
    train_data, test = load_data()
    method = Method(params["method"], params["depth"], params)
    return train(method, train_data, test, params)


# ------------------------------------------------------------------------- outputs


def collect(args, done: dict) -> dict:
    """`{depth: {method: run}}` of the finished planned cells."""
    results = {}
    for cell in plan(args, {}):
        if cell.key in done:
            run = done[cell.key]["result"]
            results.setdefault(str(cell.params["depth"]), {})[cell.params["method"]] = (
                run
            )
    return results


def save_plot(results: dict, path: Path) -> None:
    """Test accuracy and time per step vs depth; test-accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_depth, ax_time, ax_curve) = plt.subplots(1, 3, figsize=(16, 4))
    depths = sorted(int(d) for d in results)
    colours = {"muPC": "tab:blue", "PC": "tab:orange", "BP": "tab:green"}
    styles = ["-", "--", ":", "-.", (0, (1, 4))]
    for name in METHODS:
        have = [d for d in depths if name in results[str(d)]]
        if not have:
            continue
        runs = [results[str(d)][name] for d in have]
        ax_depth.plot(
            have,
            [r["final_test_acc"] for r in runs],
            "o-",
            color=colours[name],
            label=name,
        )
        ax_time.plot(
            have,
            [1e3 * r["median_step_seconds"] for r in runs],
            "o-",
            color=colours[name],
            label=f"{name}, wall clock",
        )
        cpu = [(d, r.get("median_step_cpu_seconds")) for d, r in zip(have, runs)]
        cpu = [(d, 1e3 * c) for d, c in cpu if c is not None]
        if cpu:
            ax_time.plot(*zip(*cpu), "s:", color=colours[name], label=f"{name}, CPU")
        for d, run in zip(have, runs):
            ax_curve.plot(
                run["eval_iter"],
                run["test_acc"],
                linestyle=styles[depths.index(d) % len(styles)],
                color=colours[name],
                label=f"{name}, depth {d}",
            )
    for ax in (ax_depth, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.set_xlabel("depth L")
    ax_depth.set(ylabel="test accuracy (%)", ylim=(0, 100))
    ax_depth.set_title("after training (one epoch or --max-iters)")
    ax_time.set_yscale("log")
    ax_time.set(ylabel="median time per training step (ms)", title="time per step")
    ax_curve.set(xlabel="iteration", ylabel="test accuracy (%)", ylim=(0, 100))
    for ax in (ax_depth, ax_time, ax_curve):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("μPC vs standard PC vs backprop, residual ReLU MLPs on MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(args, results: dict) -> str:
    lines = [
        "test accuracy (%) after training (iterations); median wall-clock time per "
        "step in ms (and CPU time of the process per step)",
        "",
        "| depth | "
        + " | ".join(args.methods)
        + " | step ms "
        + " / ".join(args.methods)
        + " |",
        "|---" * (len(args.methods) + 2) + "|",
    ]
    for depth in args.depths:
        runs = results.get(str(depth), {})
        cells, times = [], []
        for m in args.methods:
            if m not in runs:
                cells.append("(running or not started)")
                times.append("–")
                continue
            r = runs[m]
            flag = " (diverged)" if r["diverged"] else ""
            cells.append(f"{r['final_test_acc']:.2f}{flag} ({r['n_iters']})")
            cpu = r.get("median_step_cpu_seconds")
            cpu = "" if cpu is None else f" (CPU {1e3 * cpu:.3g})"
            times.append(f"{1e3 * r['median_step_seconds']:.3g}{cpu}")
        lines.append(f"| {depth} | " + " | ".join(cells) + f" | {' / '.join(times)} |")
    return "\n".join(lines) + "\n"


def summarize(args, done: dict) -> None:
    results = collect(args, done)
    extra = {"act_fn": "relu", "loss": "mse", "T": "depth"}
    _runner.write_summary(
        args, format_table(args, results), {"results": results}, extra
    )
    if results:
        save_plot(results, args.out_dir / "mupc_depth.png")
    print(f"Wrote summary.md, summary.json and mupc_depth.png to {args.out_dir}")


def main(argv=None) -> dict:
    print(f"{jax_versions()}, backend {jax.default_backend()}")
    return _runner.main(
        "experiments.mupc_depth", build_parser(), argv, check_args=check_args
    )


if __name__ == "__main__":
    main()
