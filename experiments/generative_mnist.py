"""Classification by inference with a generative (label → image) PC network on MNIST.

A tanh MLP maps a one-hot label to an image (pixels in [0, 1]) through hidden layers
of width 256 (`jpc.make_mlp(key, 10, 256, 3, 784, "tanh")`). It is trained with
[`jpc.make_pc_step`][] (label as `input`, image as `output`), 20 per-example SGD
steps of 0.1 on the activities per batch and one Adam update per batch, and saved
with [`jpc.save_checkpoint`][] next to the cells (the `train` cell).

Each `eval` cell then classifies the same test images with
[`jpc.test_generative_pc`][] (classification by inference, as in Whittington &
Bogacz, 2017): the image is clamped, the activities start from the same random draw,
inference finds the latent $z_0$ and its argmax is the predicted label. The cells
are one inference setting each:

- discrete inference, `activity_optim=jpc.per_example(optax.sgd(eta))` for `T`
  steps, on a grid of η (0.01 to 0.2) and `T` (50 to 1000);
- the ODE path (default `diffrax.Heun` with a PID step-size controller) with
  `max_t1` = 5, 20 and 100 × the batch size (5 × 100 is the default
  `max_t1=500`), with `return_info=True` to record whether the steady-state stop
  fired.

All cells use the first 1000 test images in batches of 100 and the same key. Every
cell reports the accuracy and the wall-clock and CPU seconds per 1000 images, timed
after a first call on the first batch that compiles; the compile time (that first
call less the mean time of a batch) is reported apart.

    python -m experiments.generative_mnist            # 1500 training steps
    python -m experiments.generative_mnist summary    # table from the cells
    python -m experiments.generative_mnist --quick    # tiny, for a smoke test

and the same network trained for only 200 steps, on a smaller grid:

    python -m experiments.generative_mnist --train-steps 200 \
        --etas 0.03 0.05 0.1 0.2 --steps 50 100 200 --ode-t1-per-example 5 20 \
        --cells-dir experiments/cells/generative_mnist_train200 \
        --out-dir experiments/results/generative_mnist_train200

The summary also gives the largest singular value ‖W_L‖₂ of the trained output
weights: the curvature of the output term in the last hidden layer is about
‖W_L‖₂² at most (tanh' ≤ 1), so gradient descent on it needs per-example steps
below about 2/‖W_L‖₂², and the step that works shrinks as training grows the
weights.

Writes `summary.md` and `summary.json` to `--out-dir`.
"""

import argparse
import functools
import os
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import optax

import jpc
from experiments import _runner
from jpc import datasets
from jpc._compat import jax_versions


N_CLASSES = 10
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "generative_mnist"
DEFAULT_CELLS_DIR = Path(__file__).parent / "cells" / "generative_mnist"
QUICK_DIR = DEFAULT_OUT_DIR.with_name("generative_mnist_quick")
REPO = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.generative_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _runner.add_runner_args(parser, DEFAULT_CELLS_DIR)
    parser.add_argument("--width", type=int, default=256, help="hidden width")
    parser.add_argument("--depth", type=int, default=3, help="weight layers")
    parser.add_argument("--train-steps", type=int, default=1500, help="Adam updates")
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--param-lr", type=float, default=1e-3, help="Adam")
    parser.add_argument("--n-test", type=int, default=1000, help="test images")
    parser.add_argument("--eval-batch", type=int, default=100)
    parser.add_argument(
        "--etas", nargs="+", type=float, default=[0.01, 0.03, 0.05, 0.1, 0.2]
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[50, 100, 200, 1000])
    parser.add_argument(
        "--ode-n-test", type=int, default=1000, help="test images of the ODE cells"
    )
    parser.add_argument(
        "--ode-t1-per-example",
        nargs="+",
        type=float,
        default=[5.0, 20.0, 100.0],
        help="max_t1 / batch size, one ODE cell each",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument(
        "--quick", action="store_true", help="50 training steps, 200 test images"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def check_args(args, parser) -> None:
    if args.quick:
        args.train_steps, args.n_test, args.ode_n_test = 50, 200, 100
        args.ode_t1_per_example = [20.0]
        args.etas, args.steps = [0.1], [20]
        if args.cells_dir == DEFAULT_CELLS_DIR:
            args.cells_dir = QUICK_DIR / "cells"
        if args.out_dir == DEFAULT_OUT_DIR:
            args.out_dir = QUICK_DIR
    for name in ("width", "depth", "train_steps", "train_batch", "n_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("n_test", "ode_n_test"):
        if getattr(args, name) % args.eval_batch:
            flag = name.replace("_", "-")
            parser.error(f"--{flag} must be a multiple of --eval-batch")
    if args.data_dir is not None:  # read by every cell, also in worker processes
        os.environ["JPC_DATA_DIR"] = str(args.data_dir)


@functools.cache
def load_data():
    """MNIST images in [0, 1] and one-hot labels, as NumPy arrays."""
    train = datasets.load_mnist("train")
    test = datasets.load_mnist("test")
    hot = functools.partial(datasets.one_hot, n_classes=N_CLASSES)
    return (train[0], np.asarray(hot(train[1]))), (test[0], np.asarray(hot(test[1])))


def make_model(params: dict):
    key = jr.key(params["seed"])
    return jpc.make_mlp(
        key, N_CLASSES, params["width"], params["depth"], 784, "tanh", use_bias=True
    )


def layer_sizes(params: dict) -> list[int]:
    return [N_CLASSES] + [params["width"]] * (params["depth"] - 1) + [784]


# ------------------------------------------------------------------------ training


def train(params: dict) -> dict:
    (images, labels), _ = load_data()
    model = make_model(params)
    optim = optax.adam(params["param_lr"])
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    activity_optim = jpc.per_example(optax.sgd(0.1))  # made once: no recompiles
    rng = np.random.default_rng(params["seed"])
    batch, times = params["train_batch"], []
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(params["train_steps"]):
        rows = rng.choice(len(images), batch, replace=False)
        t = time.perf_counter()
        result = jpc.make_pc_step(
            model,
            optim,
            opt_state,
            images[rows],
            input=labels[rows],
            activity_optim=activity_optim,
            n_inference_steps=20,
        )
        model, opt_state = result["model"], result["opt_state"]
        jax.block_until_ready(model)
        times.append(time.perf_counter() - t)
        if (step + 1) % 250 == 0:
            print(f"train: step {step + 1}, loss {float(result['loss']):.4f}")
    train_wall = time.perf_counter() - wall
    train_cpu = time.process_time() - cpu
    jpc.save_checkpoint(checkpoint_path(params), model)
    return {
        "train_wall_seconds": train_wall,
        "train_cpu_seconds": train_cpu,
        "median_step_seconds": float(np.median(times[1:] or times)),
        "final_loss": float(result["loss"]),
    }


def checkpoint_path(params: dict) -> Path:
    """The trained model, beside the cells (a relative folder is in the repository)."""
    return REPO / params["cells_dir"] / "train.eqx"


def load_model(params: dict):
    path = checkpoint_path(params)
    if not path.exists():
        raise FileNotFoundError(
            f"No trained model at {path}: remove {path.with_name('train.json')} to "
            "train it again."
        )
    return jpc.load_checkpoint(path, make_model(params))


def output_weight_norm(params: dict) -> float:
    """‖W_L‖₂ of the trained model: per-example steps above ~2/‖W_L‖₂² diverge."""
    if not checkpoint_path(params).exists():
        return float("nan")
    weight = load_model(params)[-1][-1].weight
    return float(np.linalg.norm(np.asarray(weight), 2))


# ---------------------------------------------------------------------- evaluation


def evaluate(params: dict) -> dict:
    """Accuracy and cost of one inference setting on the first `n_test` images."""
    _, (images, labels) = load_data()
    model = load_model(params)
    batch, n = params["eval_batch"], params["n_test"]
    options = dict(layer_sizes=layer_sizes(params), batch_size=batch)
    if params["path"] == "ode":
        options.update(max_t1=params["max_t1"], return_info=True)
    else:
        options.update(
            activity_optim=jpc.per_example(optax.sgd(params["eta"])),
            n_inference_steps=params["T"],
        )
    key = jr.PRNGKey(params["seed"] + 1)
    # Each cell makes its own optimiser on purpose: its compile is timed apart.
    warnings.filterwarnings("ignore", "`test_generative_pc` has compiled")

    def run(i):
        rows = slice(i * batch, (i + 1) * batch)
        out = jpc.test_generative_pc(
            model, images[rows], labels[rows], jr.fold_in(key, i), **options
        )
        jax.block_until_ready(out)
        return out

    t = time.perf_counter()
    run(0)  # compiles
    first = time.perf_counter() - t
    wall, cpu = time.perf_counter(), time.process_time()
    outs = [run(i) for i in range(n // batch)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    per_1000 = 1000 / n
    result = {
        "accuracy": float(np.mean([float(o[0]) for o in outs])),
        "wall_seconds_per_1000": wall * per_1000,
        "cpu_seconds_per_1000": cpu * per_1000,
        "compile_seconds": max(first - wall / (n // batch), 0.0),
    }
    if params["path"] == "ode":
        infos = [o[2] for o in outs]
        result["steady_state_reached"] = [bool(i.steady_state_reached) for i in infos]
        result["n_accepted_steps"] = [int(i.n_accepted_steps) for i in infos]
    return result


# ------------------------------------------------------------------------- cells


def repo_relative(path: Path) -> str:
    """`path` relative to the repository if it is inside it (cells stay portable)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def model_params(args) -> dict:
    return {
        "width": args.width,
        "depth": args.depth,
        "seed": args.seed,
        "cells_dir": repo_relative(args.cells_dir),
    }


def plan(args, done: dict) -> list[_runner.Cell]:
    """The training cell, then (once it is done) one cell per inference setting."""
    base = model_params(args)
    training = {
        **base,
        "cell": "train",
        "train_steps": args.train_steps,
        "train_batch": args.train_batch,
        "param_lr": args.param_lr,
    }
    cells = [_runner.Cell("train", training)]
    if "train" not in done:
        return cells
    common = {**base, "cell": "eval", "eval_batch": args.eval_batch}
    for T in args.steps:
        for eta in args.etas:
            params = {**common, "path": "discrete", "eta": eta, "T": T}
            params["n_test"] = args.n_test
            cells.append(_runner.Cell(f"eval/sgd{eta}_T{T}", params))
    for per_example in args.ode_t1_per_example:
        max_t1 = per_example * args.eval_batch
        ode = {**common, "path": "ode", "max_t1": max_t1, "n_test": args.ode_n_test}
        cells.append(_runner.Cell(f"eval/ode_t1_{max_t1:g}", ode))
    return cells


def run_cell(params: dict) -> dict:
    return train(params) if params["cell"] == "train" else evaluate(params)


# ------------------------------------------------------------------------- outputs


def format_table(args, done: dict) -> str:
    lines = []
    if "train" in done:
        t = done["train"]["result"]
        norm = output_weight_norm(done["train"]["params"])
        lines += [
            f"Generator 10 → {args.width} × {args.depth - 1} → 784 (tanh, pixels in "
            f"[0, 1]), {args.train_steps} Adam steps ({args.param_lr}) on batches of "
            f"{args.train_batch}, 20 per-example SGD(0.1) inference steps each: "
            f"{t['train_wall_seconds']:.0f} s wall, {t['train_cpu_seconds']:.0f} s "
            f"CPU, final batch energy {t['final_loss']:.3f}, largest singular value "
            f"of the output weights ‖W_L‖₂ = {norm:.2f}.",
            "",
        ]
    lines += [
        f"Classification by inference on the first {args.n_test} test images "
        f"(ODE: first {args.ode_n_test}), batches of {args.eval_batch}, same "
        "random initial activities.",
        "",
        "| inference | accuracy (%) | wall s / 1000 img | CPU s / 1000 img "
        "| compile s | steady state reached |",
        "|---|---|---|---|---|---|",
    ]
    for cell in plan(args, {"train": True}):
        if cell.key == "train" or cell.key not in done:
            continue
        p, r = cell.params, done[cell.key]["result"]
        if p["path"] == "ode":
            name = f"ODE Heun + PID, max_t1 = {p['max_t1']:g}"
            reached = r["steady_state_reached"]
            steady = f"{sum(reached)}/{len(reached)} batches"
        else:
            name = f"per-example SGD {p['eta']}, T = {p['T']}"
            steady = "–"
        lines.append(
            f"| {name} | {r['accuracy']:.1f} | {r['wall_seconds_per_1000']:.2f} "
            f"| {r['cpu_seconds_per_1000']:.2f} | {r['compile_seconds']:.1f} "
            f"| {steady} |"
        )
    return "\n".join(lines) + "\n"


def summarize(args, done: dict) -> None:
    results = {k: {"params": r["params"], **r["result"]} for k, r in done.items()}
    _runner.write_summary(args, format_table(args, done), {"results": results})


def main(argv=None) -> dict:
    print(f"{jax_versions()}, backend {jax.default_backend()}")
    return _runner.main(
        "experiments.generative_mnist", build_parser(), argv, check_args=check_args
    )


if __name__ == "__main__":
    main()
