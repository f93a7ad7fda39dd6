"""A small vision transformer trained by predictive coding and by backprop.

The network is `jpc.make_vit` (Dosovitskiy et al., ICLR 2021): 7×7 patches of a
28×28 image (16 tokens), `--depth` pre-norm transformer blocks of width `--width`
with `--heads` attention heads, a mean-pooling head, cross-entropy output. The same
initial network (same seed) is trained on MNIST and Fashion-MNIST

- by PC: `jpc.make_pc_step` with discrete inference fused into the compiled step
  (`--n-inference-steps` SGD steps on the activities from the feedforward state,
  per-example step size `--activity-lr`), then Adam on the parameters;
- by backprop: `jpc.make_bp_step`, Adam with the same learning rate.

Records the mean training loss and the test accuracy after every epoch, and the time
per epoch (the first epoch includes compilation and is reported separately), for each
seed; the summary gives the final test accuracy as mean ± std over seeds.

    JPC_DATA_DIR=/path/to/data python -m experiments.vit_mnist
    python -m experiments.vit_mnist --quick       # 1 epoch, 2k images, 1 seed

The default (10k training images, 3 epochs, 3 seeds) takes minutes on a laptop CPU;
`--n-train 60000 --epochs 10` is the full setting. Each (method, dataset, seed) cell
writes its own JSON under `--out-dir/cells/` and is skipped when that file exists
with the same settings, so an interrupted run resumes where it stopped. Writes
`results.json` and `vit_mnist.png` to `--out-dir`.
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


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "vit_mnist"
LOADERS = {"mnist": datasets.load_mnist, "fashion_mnist": datasets.load_fashion_mnist}
CELL_KEYS = (
    "epochs batch_size n_train width depth heads patch mlp_ratio lr activity_lr "
    "n_inference_steps"
).split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.vit_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument(
        "--datasets", nargs="+", choices=list(LOADERS), default=list(LOADERS)
    )
    parser.add_argument(
        "--methods", nargs="+", choices=["pc", "bp"], default=["pc", "bp"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=10000, help="training subset")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=7)
    parser.add_argument("--mlp-ratio", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--activity-lr", type=float, default=0.1, help="per-example activity step"
    )
    parser.add_argument("--n-inference-steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 2k images")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train, args.seeds = 1, 2000, args.seeds[:1]
    return args


def load(name: str, args) -> tuple:
    x_train, y_train = LOADERS[name]("train", args.data_dir)
    x_test, y_test = LOADERS[name]("test", args.data_dir)
    x_train, y_train = x_train[: args.n_train], y_train[: args.n_train]
    return (
        x_train,
        datasets.one_hot(y_train, 10),
        jnp.asarray(x_test),
        jnp.asarray(datasets.one_hot(y_test, 10)),
    )


def make_step(method: str, args):
    """A function `(model, optim, state, x, y) -> (model, state, loss)`."""
    if method == "bp":

        def step(model, optim, state, x, y):
            out = jpc.make_bp_step(model, optim, state, y, input=x, loss_id="ce")
            return out["model"], out["opt_state"], out["loss"]

        return step
    # The energy is a batch mean, so a per-example step of `activity_lr` is an
    # SGD step of `activity_lr * batch_size` on the activities.
    activity_optim = optax.sgd(args.activity_lr * args.batch_size)

    def step(model, optim, state, x, y):
        out = jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            loss_id="ce",
            activity_optim=activity_optim,
            n_inference_steps=args.n_inference_steps,
        )
        return out["model"], out["opt_state"], out["loss"]

    return step


def run_cell(method: str, name: str, seed: int, data: tuple, args) -> dict:
    x_train, y_train, x_test, y_test = data
    model = jpc.make_vit(
        jr.PRNGKey(seed),
        image_size=28,
        patch_size=args.patch,
        width=args.width,
        depth=args.depth,
        n_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
    )
    optim = optax.adam(args.lr)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    step = make_step(method, args)
    n_batches = len(x_train) // args.batch_size
    batches = datasets.batches(x_train, y_train, args.batch_size, seed)
    log = dict(train_loss=[], test_acc=[], epoch_seconds=[])
    for epoch in range(args.epochs):
        start, losses = time.perf_counter(), []
        desc = f"{method} {name} seed {seed} epoch {epoch + 1}"
        for _ in tqdm(range(n_batches), desc=desc, leave=False):
            x, y = next(batches)
            model, state, loss = step(model, optim, state, jnp.asarray(x), y)
            losses.append(loss)
        jax.block_until_ready(model)
        log["epoch_seconds"].append(time.perf_counter() - start)
        log["train_loss"].append(float(np.mean(jax.device_get(losses))))
        _, acc = jpc.test_discriminative_pc(model, y_test, x_test, loss="ce")
        log["test_acc"].append(float(acc))
        tqdm.write(f"{desc}: test accuracy {float(acc):.2f}%")
    return log


def cell_config(args) -> dict:
    return {k: getattr(args, k) for k in CELL_KEYS}


def run_or_load(method, name, seed, data_fn, args) -> dict:
    """Run one cell unless its JSON exists with the same settings."""
    path = args.out_dir / "cells" / f"{name}_{method}_seed{seed}.json"
    config = cell_config(args)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("config") == config:
            return saved
    log = run_cell(method, name, seed, data_fn(), args)
    cell = dict(method=method, dataset=name, seed=seed, config=config, **log)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell, indent=2))
    return cell


def summarise(cells: list[dict]) -> dict:
    summary = {}
    for cell in cells:
        entry = summary.setdefault(cell["dataset"], {}).setdefault(
            cell["method"], dict(final_test_acc=[], seconds_per_epoch=[], first=[])
        )
        later = cell["epoch_seconds"][1:] or cell["epoch_seconds"]
        entry["final_test_acc"].append(cell["test_acc"][-1])
        entry["seconds_per_epoch"].append(float(np.mean(later)))
        entry["first"].append(cell["epoch_seconds"][0])
    for methods in summary.values():
        for method, entry in methods.items():
            accs = np.array(entry["final_test_acc"])
            methods[method] = dict(
                test_acc_mean=float(accs.mean()),
                test_acc_std=float(accs.std()),
                test_acc_per_seed=entry["final_test_acc"],
                seconds_per_epoch=float(np.mean(entry["seconds_per_epoch"])),
                first_epoch_seconds=float(np.mean(entry["first"])),
            )
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    cells = []
    for name in args.datasets:
        cache = {}

        def data_fn(name=name, cache=cache):
            if not cache:
                cache["data"] = load(name, args)
            return cache["data"]

        for seed in args.seeds:
            for method in args.methods:
                cells.append(run_or_load(method, name, seed, data_fn, args))
    summary = summarise(cells)
    results = dict(
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        machine=f"{jax.devices()[0].platform}, JAX {jax.__version__}",
        summary=summary,
        cells=cells,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    save_plot(cells, args, args.out_dir / "vit_mnist.png")
    for name, methods in summary.items():
        for method, s in methods.items():
            print(
                f"{name:14s} {method}: test accuracy {s['test_acc_mean']:.2f} ± "
                f"{s['test_acc_std']:.2f}% over {len(s['test_acc_per_seed'])} seeds, "
                f"{s['seconds_per_epoch']:.1f} s/epoch (first epoch, with "
                f"compilation, {s['first_epoch_seconds']:.1f} s)"
            )
    return results


def save_plot(cells: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(c["dataset"] for c in cells))
    fig, axes = plt.subplots(
        2, len(names), figsize=(4.5 * len(names), 6), squeeze=False
    )
    colours = {"pc": "C0", "bp": "C1"}
    for col, name in enumerate(names):
        for method in colours:
            runs = [c for c in cells if c["dataset"] == name and c["method"] == method]
            for i, run in enumerate(runs):
                epochs = np.arange(1, len(run["test_acc"]) + 1)
                label = method.upper() if i == 0 else None
                kw = dict(color=colours[method], marker="o", alpha=0.7, label=label)
                axes[0, col].plot(epochs, run["train_loss"], **kw)
                axes[1, col].plot(epochs, run["test_acc"], **kw)
        axes[0, col].set(title=name, ylabel="mean train loss (CE)")
        axes[1, col].set(xlabel="epoch", ylabel="test accuracy (%)")
        axes[0, col].legend()
    fig.suptitle(
        f"ViT ({args.depth} blocks, width {args.width}, {args.patch}×{args.patch} "
        f"patches), {args.n_train} training images, one line per seed"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
