"""MCPC against standard PC as label → image generative models of MNIST.

The setting of Monte Carlo PC (Oliviers, Bogacz & Meulemans, 2024), small enough for
a CPU: a three-layer tanh network maps a one-hot label `x` through two hidden layers
to the image `y` (pixels in [0, 1]); its energy is the negative log-density of the
directed Gaussian model z_1 ~ N(W_1 x + b_1, I), z_2 ~ N(W_2 tanh(z_1), I),
y ~ N(W_3 tanh(z_2) + b, λ⁻¹ I) (see [`jpc.sample_generative_pc`][]). Both methods
train the same network on the same batches with the same number `T` of inference
steps of step size η per example and one Adam update per batch:

- `MCPC`: [`jpc.make_mcpc_step`][]: Langevin inference, parameter gradient averaged
  over the states after the burn-in (`T // 2` steps);
- `PC`: [`jpc.make_pc_step`][] with `T` SGD steps of the same size on the activities
  (gradient descent to the posterior mode), gradient at the final state.

After training, ancestral samples of p(y | label) are drawn with
[`jpc.sample_generative_pc`][]; the images shown and scored are the conditional
means of y given the sampled hidden layers (the pixel noise λ⁻¹ᐟ² would hide them).
The score is a Fréchet distance in the 128-d hidden features of a small MLP
classifier trained here on the MNIST training set (an FID-like score; lower is
better), between 1000 samples per class and the 10000 test images, together with
the classifier's accuracy on the samples (does a sample of label c look like a c?)
and the energy of the model on the test set after inference.

Each method is a cell of the resumable runner (`experiments/_runner.py`), saved to
its own JSON file under `--cells-dir`; rerunning the same command skips finished
cells:

    python -m experiments.mcpc_mnist              # 10000 training images, 2 epochs
    python -m experiments.mcpc_mnist summary      # table and figure from the cells
    python -m experiments.mcpc_mnist --quick

Writes `summary.md`, `summary.json` to `--out-dir` and the figure `mcpc_mnist.png`
to `experiments/figures/`.
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
from jpc import datasets
from jpc._compat import jax_versions


N_CLASSES = 10
METHODS = ("MCPC", "PC")
N_SHOWN = 8  # samples per class kept in the cell for the figure
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "mcpc_mnist"
DEFAULT_CELLS_DIR = Path(__file__).parent / "cells" / "mcpc_mnist"
FIGURE = Path(__file__).parent / "figures" / "mcpc_mnist.png"
QUICK_DIR = DEFAULT_OUT_DIR.with_name("mcpc_mnist_quick")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mcpc_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _runner.add_runner_args(parser, DEFAULT_CELLS_DIR)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--n-train", type=int, default=10000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=128, help="hidden width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-inference-steps", type=int, default=60, help="T")
    parser.add_argument("--activity-lr", type=float, default=0.02, help="η")
    parser.add_argument("--param-lr", type=float, default=1e-3, help="Adam")
    parser.add_argument(
        "--output-precision", type=float, default=10.0, help="λ of the pixels"
    )
    parser.add_argument("--n-per-class", type=int, default=1000, help="scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument(
        "--quick", action="store_true", help="1000 images, 1 epoch, T = 10"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def check_args(args, parser) -> None:
    if args.quick:
        args.n_train, args.epochs, args.n_inference_steps = 1000, 1, 10
        args.n_per_class = 100
        if args.cells_dir == DEFAULT_CELLS_DIR:
            args.cells_dir = QUICK_DIR / "cells"
        if args.out_dir == DEFAULT_OUT_DIR:
            args.out_dir = QUICK_DIR
    for name in ("n_train", "epochs", "width", "batch_size", "n_per_class"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.n_inference_steps < 2:
        parser.error("--n-inference-steps must be at least 2")
    if args.data_dir is not None:  # read by every cell, also in worker processes
        os.environ["JPC_DATA_DIR"] = str(args.data_dir)


@functools.cache
def load_data():
    """MNIST images in [0, 1] and one-hot labels, as NumPy arrays."""
    train = datasets.load_mnist("train")
    test = datasets.load_mnist("test")
    hot = functools.partial(datasets.one_hot, n_classes=N_CLASSES)
    return (train[0], np.asarray(hot(train[1]))), (test[0], np.asarray(hot(test[1])))


# ---------------------------------------------------------------------- classifier


@functools.cache
def classifier():
    """A 784-128-10 ReLU MLP trained with Adam on all 60000 training images (2 epochs).

    Returns `(features, predict)`: the 128-d hidden features and the class.
    """
    (images, labels), _ = load_data()
    key1, key2, key3 = jr.split(jr.key(1234), 3)
    params = {
        "w1": jr.normal(key1, (784, 128)) / np.sqrt(784),
        "b1": jnp.zeros(128),
        "w2": jr.normal(key2, (128, N_CLASSES)) / np.sqrt(128),
        "b2": jnp.zeros(N_CLASSES),
    }

    def features(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"])

    def loss(p, x, y):
        logits = features(p, x) @ p["w2"] + p["b2"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), -1))

    optim = optax.adam(1e-3)

    @jax.jit
    def step(p, state, x, y):
        grads = jax.grad(loss)(p, x, y)
        updates, state = optim.update(grads, state)
        return optax.apply_updates(p, updates), state

    state = optim.init(params)
    order = np.asarray(jr.permutation(key3, 2 * len(images)) % len(images))
    for start in range(0, len(order) - 127, 128):
        batch = order[start : start + 128]
        params, state = step(params, state, images[batch], labels[batch])
    feats = jax.jit(lambda x: features(params, x))
    predict = jax.jit(lambda x: jnp.argmax(features(params, x) @ params["w2"], -1))
    return feats, predict


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) of two feature sets (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((Σ_a Σ_b)^½) = Σ √eig(Σ_a^½ Σ_b Σ_a^½), a symmetric PSD matrix.
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sum(np.sqrt(np.clip(middle, 0, None)))
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


# ------------------------------------------------------------------------ training


def make_step(params: dict):
    """`step(model, opt_state, images, labels, key) -> (model, opt_state)`."""
    options = dict(
        n_inference_steps=params["n_inference_steps"],
        output_energy_scaling=params["output_precision"],
    )
    eta, batch = params["activity_lr"], params["batch_size"]
    optim = optax.adam(params["param_lr"])
    activity_optim = optax.sgd(1.0)  # made once: a new optimiser would recompile
    if params["method"] == "MCPC":

        def step(model, opt_state, y, x, key):
            result = jpc.make_mcpc_step(
                model, optim, opt_state, y, input=x, key=key, activity_lr=eta, **options
            )
            return result["model"], result["opt_state"]

    else:

        def step(model, opt_state, y, x, key):
            # η per example: the energy is a batch mean, so the SGD rate is η·B.
            result = jpc.make_pc_step(
                model,
                optim,
                opt_state,
                y,
                input=x,
                activity_optim=activity_optim,
                activity_lr=eta * batch,
                **options,
            )
            return result["model"], result["opt_state"]

    return optim, step


def test_energy(model, params, images, labels) -> float:
    """Mean energy per test image after `T` gradient steps of inference (the mode)."""
    chunk = 1000
    optim = optax.sgd(params["activity_lr"] * chunk)  # η per example
    lam = params["output_precision"]
    total = 0.0
    for start in range(0, len(images), chunk):
        x, y = labels[start : start + chunk], images[start : start + chunk]
        z = jpc.init_activities_with_ffwd(model, x)
        state = optim.init(z)
        for _ in range(params["n_inference_steps"]):
            result = jpc.update_pc_activities(
                (model, None), z, optim, state, y, input=x, output_energy_scaling=lam
            )
            z, state = result["activities"], result["opt_state"]
        energy = jpc.pc_energy_fn((model, None), z, y, x=x, output_energy_scaling=lam)
        total += float(energy) * len(x)
    return total / len(images)


def evaluate(model, params: dict) -> dict:
    """Samples per class, their classifier accuracy and Fréchet distance."""
    _, (test_images, test_labels) = load_data()
    features, predict = classifier()
    n = params["n_per_class"]
    classes = np.repeat(np.arange(N_CLASSES), n)
    x = jax.nn.one_hot(classes, N_CLASSES)
    sample = jax.jit(
        lambda key, x: jpc.sample_generative_pc(
            key,
            model,
            x,
            output_energy_scaling=params["output_precision"],
            output_noise=False,
        )[-1]
    )
    images = np.clip(np.asarray(sample(jr.key(params["seed"] + 1), x)), 0, 1)
    shown = images.reshape(N_CLASSES, n, 784)[:, :N_SHOWN]
    sample_acc = float(np.mean(np.asarray(predict(images)) == classes))
    return {
        "frechet_distance": frechet_distance(features(images), features(test_images)),
        "sample_accuracy": 100 * sample_acc,
        "test_energy": test_energy(model, params, test_images, test_labels),
        "samples": np.round(255 * shown).astype(int).tolist(),
    }


def train(params: dict) -> dict:
    (images, labels), _ = load_data()
    key = jr.key(params["seed"])
    model_key, order_key, noise_key = jr.split(key, 3)
    model = jpc.make_mlp(
        model_key, N_CLASSES, params["width"], 3, 784, "tanh", use_bias=True
    )
    optim, step = make_step(params)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    subset = np.asarray(jr.permutation(order_key, len(images)))[: params["n_train"]]
    batch = params["batch_size"]
    start_time, times = time.perf_counter(), []
    for epoch in range(params["epochs"]):
        order = subset[np.random.default_rng(epoch).permutation(len(subset))]
        for i in range(len(order) // batch):
            rows = order[i * batch : (i + 1) * batch]
            noise_key, step_key = jr.split(noise_key)
            t = time.perf_counter()
            model, opt_state = step(
                model, opt_state, images[rows], labels[rows], step_key
            )
            jax.block_until_ready(model)
            times.append(time.perf_counter() - t)
            if len(times) % 50 == 0:
                print(f"{params['method']}: step {len(times)}", flush=True)
    result = evaluate(model, params)
    result["train_seconds"] = time.perf_counter() - start_time
    result["median_step_seconds"] = float(np.median(times[1:] or times))
    return result


# ------------------------------------------------------------------------- cells


def plan(args, done: dict) -> list[_runner.Cell]:
    """One cell per method, and one scoring real images (`data`)."""
    cells = []
    for name in args.methods:
        params = {
            "method": name,
            "n_train": args.n_train,
            "epochs": args.epochs,
            "width": args.width,
            "batch_size": args.batch_size,
            "n_inference_steps": args.n_inference_steps,
            "activity_lr": args.activity_lr,
            "param_lr": args.param_lr,
            "output_precision": args.output_precision,
            "n_per_class": args.n_per_class,
            "seed": args.seed,
        }
        cells.append(_runner.Cell(f"{name}/seed{args.seed}", params))
    data = {"method": "data", "n_per_class": args.n_per_class, "seed": args.seed}
    cells.append(_runner.Cell(f"data/seed{args.seed}", data))
    return cells


def reference(params: dict) -> dict:
    """The scores of real images: `n_per_class` training images per class."""
    (images, labels), (test_images, _) = load_data()
    features, predict = classifier()
    n = params["n_per_class"]
    classes = np.argmax(labels, -1)
    rng = np.random.default_rng(params["seed"])
    rows = np.stack(
        [rng.permutation(np.flatnonzero(classes == c))[:n] for c in range(N_CLASSES)]
    )
    chosen = images[rows.ravel()]
    target = np.repeat(np.arange(N_CLASSES), n)
    return {
        "frechet_distance": frechet_distance(features(chosen), features(test_images)),
        "sample_accuracy": 100 * float(np.mean(np.asarray(predict(chosen)) == target)),
        "samples": np.round(255 * images[rows[:, :N_SHOWN]]).astype(int).tolist(),
    }


def run_cell(params: dict) -> dict:
    return reference(params) if params["method"] == "data" else train(params)


# ------------------------------------------------------------------------- outputs


def collect(args, done: dict) -> dict:
    """`{method: result}` of the finished planned cells."""
    return {
        cell.params["method"]: done[cell.key]["result"]
        for cell in plan(args, {})
        if cell.key in done
    }


def save_figure(results: dict, path: Path) -> None:
    """Sample grids (rows: labels 0-9) of each method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 5))
    for ax, (name, run) in zip(np.atleast_1d(axes), results.items()):
        grid = np.asarray(run["samples"], np.float64) / 255
        n_classes, n_shown = grid.shape[:2]
        grid = grid.reshape(n_classes, n_shown, 28, 28).transpose(0, 2, 1, 3)
        ax.imshow(grid.reshape(n_classes * 28, n_shown * 28), cmap="gray")
        ax.set_title(
            f"{name}: Fréchet dist. {run['frechet_distance']:.1f}, "
            f"acc. {run['sample_accuracy']:.0f}%"
        )
        ax.axis("off")
    fig.suptitle("Samples of p(image | label), one row per label ('data': real images)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(args, results: dict) -> str:
    lines = [
        f"MNIST label → image, {args.n_train} training images, {args.epochs} epochs, "
        f"width {args.width}, T = {args.n_inference_steps}, η = {args.activity_lr}, "
        f"λ = {args.output_precision}",
        "",
        "| method | Fréchet distance ↓ | sample accuracy (%) ↑ | test energy ↓ "
        "| ms / step |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        energy = f"{r['test_energy']:.2f}" if "test_energy" in r else "–"
        ms = f"{1e3 * r['median_step_seconds']:.0f}" if name != "data" else "–"
        lines.append(
            f"| {name} | {r['frechet_distance']:.2f} | {r['sample_accuracy']:.1f} "
            f"| {energy} | {ms} |"
        )
    lines += [
        "",
        "`data`: real training images (the same number per class), scored alike.",
    ]
    return "\n".join(lines) + "\n"


def summarize(args, done: dict) -> None:
    results = collect(args, done)
    table = {
        k: {m: v for m, v in r.items() if m != "samples"} for k, r in results.items()
    }
    _runner.write_summary(args, format_table(args, results), {"results": table})
    if results:
        figure = (
            FIGURE if args.out_dir == DEFAULT_OUT_DIR else args.out_dir / FIGURE.name
        )
        save_figure(results, figure)
        print(f"Wrote {figure}")


def main(argv=None) -> dict:
    print(f"{jax_versions()}, backend {jax.default_backend()}")
    return _runner.main(
        "experiments.mcpc_mnist", build_parser(), argv, check_args=check_args
    )


if __name__ == "__main__":
    main()
