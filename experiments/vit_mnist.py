"""A small vision transformer trained by predictive coding and by backprop.

The network is `jpc.make_vit` (Dosovitskiy et al., ICLR 2021): 7×7 patches of a
28×28 image (16 tokens), `--depth` pre-norm transformer blocks of width `--width`
with `--heads` attention heads, a mean-pooling head, cross-entropy output. The same
initial network (same seed) is trained on MNIST and Fashion-MNIST

- by PC: `jpc.make_pc_step` with discrete inference fused into the compiled step
  (`--n-inference-steps` SGD steps on the activities from the feedforward state,
  with a per-example step size), then Adam on the parameters;
- by backprop: `jpc.make_bp_step`, Adam.

The learning rates are chosen per dataset and method on a validation split held out
from the training subset (never the test set): for PC a grid of Adam learning rates
(`--lrs`) × per-example activity step sizes (`--activity-lrs`), for backprop the Adam
learning rates alone, each trained `--search-epochs` epochs from seed 0. The chosen
setting is then trained from each of `--seeds` on the rest of the training subset and
scored on the test set after every epoch (learning curves, final accuracy as mean ±
std over the seeds, seconds per epoch).

Every search trial and every seed is a cell of the resumable runner
(`experiments/_runner.py`): its JSON file is written as soon as it ends, and rerunning
the same command skips the finished cells.

    JPC_DATA_DIR=/path/to/data python -m experiments.vit_mnist
    python -m experiments.vit_mnist summary       # tables and plot from the cells
    python -m experiments.vit_mnist --quick       # seconds-scale smoke run

The default (10 000 training images of which 2 000 for validation, 3 epochs, 3 seeds,
both datasets: 24 search trials and 12 seeds) takes about half an hour of CPU time;
`--n-train 60000 --val-size 6000 --epochs 10` is a full-data setting. Writes
`summary.md`, `summary.json` and `vit_mnist.png` to `--out-dir`.
"""

import argparse
import functools
import itertools
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
from experiments import _runner
from experiments._progress import progress
from jpc import datasets
from jpc._compat import jax_versions


N_CLASSES = 10
METHODS = ("pc", "bp")
DATASETS = ("mnist", "fashion_mnist")
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "vit_mnist"
DEFAULT_CELLS_DIR = Path(__file__).parent / "cells" / "vit_mnist"
QUICK_DIR = DEFAULT_OUT_DIR.with_name("vit_mnist_quick")
MODEL_KEYS = ("width", "depth", "heads", "patch", "mlp_ratio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.vit_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _runner.add_runner_args(parser, DEFAULT_CELLS_DIR)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=DATASETS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--search-epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=10000, help="training subset")
    parser.add_argument(
        "--val-size", type=int, default=2000, help="held out of the training subset"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=7)
    parser.add_argument("--mlp-ratio", type=int, default=2)
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="Adam"
    )
    parser.add_argument(
        "--activity-lrs",
        type=float,
        nargs="+",
        default=[0.003, 0.01, 0.03],
        help="per-example activity SGD step sizes (PC)",
    )
    parser.add_argument("--n-inference-steps", type=int, default=8)
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--out-dir", type=Path, default=None)
    return parser


def check_args(args, parser) -> None:
    if args.quick:
        args.epochs, args.search_epochs, args.seeds = 1, 1, args.seeds[:1]
        args.n_train, args.val_size = 1280, 256
        args.lrs, args.activity_lrs = [1e-3], [0.01, 0.03]
        if args.cells_dir == DEFAULT_CELLS_DIR:
            args.cells_dir = QUICK_DIR / "cells"
    if args.out_dir is None:
        args.out_dir = QUICK_DIR if args.quick else DEFAULT_OUT_DIR
    if args.val_size >= args.n_train:
        parser.error(
            f"--val-size ({args.val_size}) must be smaller than --n-train "
            f"({args.n_train})"
        )
    for name in ("epochs", "search_epochs", "batch_size", "n_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


# ---------------------------------------------------------------------------- data


@functools.cache
def load_data(name: str, n_train: int, val_size: int, data_dir: str | None) -> dict:
    """`{"train", "val", "test"}`: the first `n_train` training images split at
    random (seed 0) into validation and training parts, one-hot targets."""
    loader = {
        "mnist": datasets.load_mnist,
        "fashion_mnist": datasets.load_fashion_mnist,
    }
    x, y = loader[name]("train", data_dir)
    x_test, y_test = loader[name]("test", data_dir)
    order = np.random.default_rng(0).permutation(n_train)
    val, train = order[:val_size], order[val_size:]

    def prepare(images, labels, device):
        pair = (images, datasets.one_hot(labels, N_CLASSES))
        return tuple(jnp.asarray(a) for a in pair) if device else pair

    return {
        "train": prepare(x[train], y[train], device=False),
        "val": prepare(x[val], y[val], device=True),
        "test": prepare(x_test, y_test, device=True),
    }


# ------------------------------------------------------------------------ training


def make_step(params: dict):
    """A function `(model, optim, state, x, y) -> (model, state, loss)`."""
    if params["method"] == "bp":

        def step(model, optim, state, x, y):
            out = jpc.make_bp_step(model, optim, state, y, input=x, loss_id="ce")
            return out["model"], out["opt_state"], out["loss"]

        return step
    # The energy is a batch mean, so a per-example step of `activity_lr` is an
    # SGD step of `activity_lr * batch_size` on the activities.
    activity_optim = optax.sgd(params["activity_lr"] * params["batch_size"])

    def step(model, optim, state, x, y):
        out = jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            loss_id="ce",
            activity_optim=activity_optim,
            n_inference_steps=params["n_inference_steps"],
        )
        return out["model"], out["opt_state"], out["loss"]

    return step


def run_cell(params: dict) -> dict:
    """Trains one (method, dataset, setting, seed) and scores it after every epoch
    on `params["eval"]` (`"val"` for a search trial, `"test"` otherwise)."""
    data = load_data(
        params["dataset"], params["n_train"], params["val_size"], params["data_dir"]
    )
    (x_train, y_train), (x_eval, y_eval) = data["train"], data[params["eval"]]
    model = jpc.make_vit(
        jr.PRNGKey(params["seed"]),
        image_size=28,
        patch_size=params["patch"],
        width=params["width"],
        depth=params["depth"],
        n_heads=params["heads"],
        mlp_ratio=params["mlp_ratio"],
    )
    optim = optax.adam(params["lr"])
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    step = make_step(params)
    n_batches = len(x_train) // params["batch_size"]
    batches = datasets.batches(x_train, y_train, params["batch_size"], params["seed"])
    log = dict(train_loss=[], acc=[], epoch_seconds=[], epoch_cpu_seconds=[])
    for epoch in range(params["epochs"]):
        start, cpu, losses = time.perf_counter(), time.process_time(), []
        desc = f"{params['method']} {params['dataset']} epoch {epoch + 1}"
        for _ in progress(range(n_batches), desc=desc, leave=False):
            x, y = next(batches)
            model, state, loss = step(model, optim, state, jnp.asarray(x), y)
            losses.append(loss)
        jax.block_until_ready(model)
        log["epoch_seconds"].append(time.perf_counter() - start)
        log["epoch_cpu_seconds"].append(time.process_time() - cpu)
        log["train_loss"].append(float(np.mean(jax.device_get(losses))))
        _, acc = jpc.test_discriminative_pc(model, y_eval, x_eval, loss="ce")
        log["acc"].append(float(acc))
        tqdm.write(f"{desc}: {params['eval']} accuracy {float(acc):.2f}%")
    return log


# ------------------------------------------------------------------------ planning


def _grid(args, method: str) -> list[tuple[float, float | None]]:
    """`(lr, activity_lr)` settings searched for `method`."""
    if method == "bp":
        return [(lr, None) for lr in args.lrs]
    return list(itertools.product(args.lrs, args.activity_lrs))


def _trial_key(dataset: str, method: str, lr: float, activity_lr) -> str:
    setting = f"lr{lr:g}" if activity_lr is None else f"lr{lr:g}_a{activity_lr:g}"
    return f"{dataset}/{method}/search/{setting}"


def _common(args, dataset: str, method: str) -> dict:
    return {
        "dataset": dataset,
        "method": method,
        "n_train": args.n_train,
        "val_size": args.val_size,
        "data_dir": args.data_dir,
        "batch_size": args.batch_size,
        "n_inference_steps": args.n_inference_steps,
        **{k: getattr(args, k) for k in MODEL_KEYS},
    }


def chosen(args, done: dict, dataset: str, method: str) -> dict | None:
    """The search trial with the best final validation accuracy, once all ran."""
    trials = []
    for lr, activity_lr in _grid(args, method):
        result = done.get(_trial_key(dataset, method, lr, activity_lr))
        if result is None:
            return None
        trials.append((result["acc"][-1], lr, activity_lr))
    acc, lr, activity_lr = max(trials, key=lambda t: t[0])
    return {"lr": lr, "activity_lr": activity_lr, "val_acc": acc}


def plan(args, done: dict) -> list[_runner.Cell]:
    cells = []
    for dataset, method in itertools.product(args.datasets, args.methods):
        common = _common(args, dataset, method)
        for lr, activity_lr in _grid(args, method):
            params = dict(
                common,
                lr=lr,
                activity_lr=activity_lr,
                epochs=args.search_epochs,
                seed=0,
                eval="val",
            )
            cells.append(
                _runner.Cell(_trial_key(dataset, method, lr, activity_lr), params)
            )
        best = chosen(args, done, dataset, method)
        if best is None:
            continue
        for seed in args.seeds:
            params = dict(
                common,
                lr=best["lr"],
                activity_lr=best["activity_lr"],
                epochs=args.epochs,
                seed=seed,
                eval="test",
            )
            cells.append(_runner.Cell(f"{dataset}/{method}/seed{seed}", params))
    return cells


# ------------------------------------------------------------------------- summary


def collect(args, done: dict) -> dict:
    """Per dataset and method: the search trials, the choice and the seeds."""
    out = {}
    for dataset, method in itertools.product(args.datasets, args.methods):
        trials = []
        for lr, activity_lr in _grid(args, method):
            record = done.get(_trial_key(dataset, method, lr, activity_lr))
            if record is not None:
                trials.append(dict(lr=lr, activity_lr=activity_lr, **record["result"]))
        runs = []
        for seed in args.seeds:
            record = done.get(f"{dataset}/{method}/seed{seed}")
            if record is not None:
                runs.append(dict(**record["params"], **record["result"]))
        final = np.array([r["acc"][-1] for r in runs])
        later = [np.mean(r["epoch_seconds"][1:] or r["epoch_seconds"]) for r in runs]
        out.setdefault(dataset, {})[method] = dict(
            trials=trials,
            n_trials=len(_grid(args, method)),
            choice=chosen(
                args, {k: r["result"] for k, r in done.items()}, dataset, method
            ),
            runs=runs,
            test_acc_mean=float(final.mean()) if runs else None,
            test_acc_std=float(final.std()) if runs else None,
            seconds_per_epoch=float(np.mean(later)) if runs else None,
        )
    return out


def format_table(args, results: dict) -> str:
    lines = [
        f"ViT: {args.depth} blocks, width {args.width}, {args.heads} heads, "
        f"{args.patch}×{args.patch} patches; {args.n_train - args.val_size} training "
        f"images ({args.val_size} held out for the search), {args.epochs} epochs, "
        f"batch {args.batch_size}; PC: {args.n_inference_steps} inference steps",
        "",
        "| dataset | method | seeds | test accuracy (%) | Adam lr | activity lr "
        "(per example) | val. acc. of the choice | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, methods in results.items():
        for method, r in methods.items():
            c = r["choice"]
            if c is None:
                lines.append(
                    f"| {dataset} | {method.upper()} | 0 | search "
                    f"{len(r['trials'])}/{r['n_trials']} | | | | |"
                )
                continue
            acc = (
                f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}"
                if r["runs"]
                else ""
            )
            sec = f"{r['seconds_per_epoch']:.1f}" if r["runs"] else ""
            act = "–" if c["activity_lr"] is None else f"{c['activity_lr']:g}"
            lines.append(
                f"| {dataset} | {method.upper()} | {len(r['runs'])} | {acc} | "
                f"{c['lr']:g} | {act} | {c['val_acc']:.2f} | {sec} |"
            )
    lines += [
        "",
        "Search (seed 0, validation accuracy after each epoch, %):",
        "",
        "| dataset | method | Adam lr | activity lr | val. acc. per epoch |",
        "|---|---|---|---|---|",
    ]
    for dataset, methods in results.items():
        for method, r in methods.items():
            for t in r["trials"]:
                act = "–" if t["activity_lr"] is None else f"{t['activity_lr']:g}"
                accs = " / ".join(f"{a:.2f}" for a in t["acc"])
                lines.append(
                    f"| {dataset} | {method.upper()} | {t['lr']:g} | {act} | {accs} |"
                )
    return "\n".join(lines) + "\n"


def save_plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(
        2, len(names), figsize=(4.5 * len(names), 6), squeeze=False
    )
    colours = {"pc": "C0", "bp": "C1"}
    for col, name in enumerate(names):
        for method, r in results[name].items():
            for i, run in enumerate(r["runs"]):
                epochs = np.arange(1, len(run["acc"]) + 1)
                label = method.upper() if i == 0 else None
                kw = dict(color=colours[method], marker="o", alpha=0.7, label=label)
                axes[0, col].plot(epochs, run["train_loss"], **kw)
                axes[1, col].plot(epochs, run["acc"], **kw)
        axes[0, col].set(title=name, ylabel="mean train loss (CE)")
        axes[1, col].set(xlabel="epoch", ylabel="test accuracy (%)")
        axes[0, col].legend()
    fig.suptitle(
        f"ViT ({args.depth} blocks, width {args.width}, {args.patch}×{args.patch} "
        f"patches), {args.n_train - args.val_size} training images, one line per seed"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(args, done: dict) -> None:
    results = collect(args, done)
    _runner.write_summary(args, format_table(args, results), {"results": results})
    if any(r["runs"] for methods in results.values() for r in methods.values()):
        save_plot(results, args, args.out_dir / "vit_mnist.png")
    print(f"Wrote summary.md, summary.json and vit_mnist.png to {args.out_dir}")


def main(argv=None) -> dict:
    print(f"{jax_versions()}, backend {jax.default_backend()}")
    return _runner.main(
        "experiments.vit_mnist", build_parser(), argv, check_args=check_args
    )


if __name__ == "__main__":
    main()
