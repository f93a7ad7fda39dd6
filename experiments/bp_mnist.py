"""Backprop baseline on MNIST with `jpc.make_bp_step`.

The setting of JPC's backprop tutorial: a 784-128-128-128-10 tanh MLP
(`jpc.make_mlp`, 4 layers, standard parameterisation, with biases; `--no-bias` for
none), batch 256, Adam(1e-3), 4 epochs, MSE on one-hot labels by default
(`--loss ce` for cross-entropy). Reports the test accuracy after every epoch and the
time per epoch (the first epoch includes compilation and is reported separately).

    JPC_DATA_DIR=/path/to/mnist python -m experiments.bp_mnist
    python -m experiments.bp_mnist --quick     # 1 epoch on 10k training images

Writes `results.json` and `bp_mnist.png` to `--out-dir`.
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
from jpc._compat import jax_versions


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "bp_mnist"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bp_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4, help="number of layers")
    parser.add_argument("--act-fn", default="tanh")
    parser.add_argument(
        "--bias", action=argparse.BooleanOptionalAction, default=True, help="biases"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--loss", choices=["mse", "ce"], default="mse")
    parser.add_argument("--n-train", type=int, default=None, help="subset of train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 10k images")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train = 1, 10000
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    x_train, y_train = datasets.load_mnist("train", args.data_dir)
    x_test, y_test = datasets.load_mnist("test", args.data_dir)
    if args.n_train is not None:
        x_train, y_train = x_train[: args.n_train], y_train[: args.n_train]
    y_train, y_test = datasets.one_hot(y_train, 10), datasets.one_hot(y_test, 10)
    model = jpc.make_mlp(
        jr.PRNGKey(args.seed), 784, args.width, args.depth, 10, args.act_fn, args.bias
    )
    optim = optax.adam(args.lr)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    n_batches = len(x_train) // args.batch_size
    batches = datasets.batches(x_train, y_train, args.batch_size, args.seed)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    log = dict(test_acc=[], epoch_seconds=[], train_loss=[])
    for _ in range(args.epochs):
        start, losses = time.perf_counter(), []
        for _ in progress(range(n_batches), desc=f"epoch {len(log['test_acc']) + 1}"):
            x, y = next(batches)
            out = jpc.make_bp_step(
                model, optim, state, jnp.asarray(y), input=jnp.asarray(x),
                loss_id=args.loss,
            )  # fmt: skip
            model, state = out["model"], out["opt_state"]
            losses.append(out["loss"])
        jax.block_until_ready(model)
        log["epoch_seconds"].append(time.perf_counter() - start)
        log["train_loss"].append(float(np.mean(jax.device_get(losses))))
        _, acc = jpc.test_discriminative_pc(model, y_test, x_test, loss=args.loss)
        log["test_acc"].append(float(acc))
        print(f"test accuracy {float(acc):.2f}%")
    later = log["epoch_seconds"][1:] or log["epoch_seconds"]
    results = dict(
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        machine=f"{jax.devices()[0].platform}, {jax_versions()}",
        final_test_acc=log["test_acc"][-1],
        seconds_per_epoch=float(np.mean(later)),
        first_epoch_seconds=log["epoch_seconds"][0],
        **log,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    save_plot(log, args.out_dir / "bp_mnist.png")
    print(
        f"final test accuracy {results['final_test_acc']:.2f}%, "
        f"{results['seconds_per_epoch']:.2f} s/epoch "
        f"(first epoch, with compilation: {results['first_epoch_seconds']:.2f} s)"
    )
    return results


def save_plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(log["test_acc"]) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.5))
    ax1.plot(epochs, log["train_loss"], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("mean train loss")
    ax2.plot(epochs, log["test_acc"], marker="o")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    fig.suptitle("Backprop on MNIST, 784-128-128-128-10 tanh")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
