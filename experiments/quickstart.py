"""Quickstart: a PC classifier next to the same network trained by backprop.

The classic "PC from scratch" setting: a 784-300-300-10 tanh MLP, batch 64, Adam(1e-3)
on the parameters, MSE on one-hot labels, 500 iterations. Each PC step runs 20 SGD
inference steps on the activities inside one compiled program
([`jpc.make_pc_step`][] with `activity_optim` and `n_inference_steps`), with a step of
`--activity-lr` per example ([`jpc.per_example`][]: the energy is a batch mean, so a
plain `optax.sgd(lr)` would move each example by only `lr / B`); the backprop
baseline ([`jpc.make_bp_step`][]) starts from the identical initialisation and sees the
same batches. Both are scored on the full test set with a feedforward pass.

    python -m experiments.quickstart                      # MNIST if available
    python -m experiments.quickstart --dataset digits     # offline, 8×8 digits

Writes `results.json` and `learning_curves.png` to `--out-dir`.
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpc
from experiments._progress import progress
from jpc import datasets
from jpc._compat import jax_info


N_CLASSES = 10
N_INFERENCE_STEPS = 20
ACTIVITY_LR = 0.1
PARAM_LR = 1e-3
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "quickstart"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (`argv=None` reads `sys.argv`)."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.quickstart",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        choices=["auto", "mnist", "fashion_mnist", "digits"],
        default="auto",
        help="'auto': MNIST if found locally or downloadable, else sklearn digits",
    )
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--iters", type=int, default=500, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=300, help="hidden width")
    parser.add_argument("--depth", type=int, default=3, help="number of layers")
    parser.add_argument("--seed", type=int, default=0, help="init and batch order")
    parser.add_argument("--eval-every", type=int, default=25, help="test every N steps")
    parser.add_argument(
        "--activity-lr",
        type=float,
        default=ACTIVITY_LR,
        help="activity SGD step per example (jpc.per_example), whatever the batch size",
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    for name in ("iters", "batch_size", "width", "depth", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not args.activity_lr > 0:
        parser.error(f"--activity-lr must be positive, got {args.activity_lr}")
    return args


# ---------------------------------------------------------------------------- data


def resolve_dataset(dataset: str, data_dir) -> tuple[str, str]:
    """Pick the dataset for `--dataset auto`; return `(name, where it comes from)`."""
    if dataset == "digits":
        return "digits", "scikit-learn (bundled)"
    if dataset != "auto":
        found = datasets.find_dataset(dataset, data_dir)
        return dataset, str(found) if found else "download"
    found = datasets.find_mnist(data_dir)
    if found is not None:
        return "mnist", str(found)
    try:
        for split in ("train", "test"):
            found = datasets.download_dataset("mnist", split, timeout=10.0)
        return "mnist", f"downloaded to {found}"
    except datasets.DownloadError as e:
        print(f"MNIST is not available locally and could not be downloaded.\n{e}")
        print(
            "To use MNIST, set JPC_DATA_DIR (or pass --data-dir) to a folder holding "
            "its four IDX .gz files. Using scikit-learn's digits instead."
        )
        return "digits", "scikit-learn (bundled), the offline fallback"


def load_data(name: str, data_dir):
    """`((x_train, y_train), (x_test, y_test))` with one-hot float32 targets.

    The training set stays in NumPy (batched on the host); the test set is moved to
    the device once, for the repeated evaluations.
    """
    if name == "digits":
        train, test = datasets.load_digits_data(test_fraction=0.2, seed=0)
    else:
        load = datasets.load_idx_dataset
        train, test = (load(name, split, data_dir) for split in ("train", "test"))
    # Standardise with the training set's pixel mean and std (for MNIST the usual
    # 0.1307 / 0.3081 of the PC-from-scratch lab's torchvision pipeline).
    mean, std = train[0].mean(), train[0].std()
    train = ((train[0] - mean) / std, datasets.one_hot(train[1], N_CLASSES))
    x_test = jnp.asarray((test[0] - mean) / std)
    test = (x_test, jnp.asarray(datasets.one_hot(test[1], N_CLASSES)))
    return train, test


# ------------------------------------------------------------------------ training


def make_steps(optim: optax.GradientTransformation, activity_lr: float) -> dict:
    """One training step per method, each `(model, opt_state, x, y) -> (..., loss)`.

    `activity_lr` is the activity SGD step per example.
    """
    # Built once: a fresh optimiser object per call would recompile every step.
    activity_optim = jpc.per_example(optax.sgd(activity_lr))

    def pc_step(model, opt_state, x, y):
        result = jpc.make_pc_step(
            model,
            optim,
            opt_state,
            y,
            input=x,
            loss_id="mse",
            activity_optim=activity_optim,
            n_inference_steps=N_INFERENCE_STEPS,
        )
        return result["model"], result["opt_state"], result["loss"]

    def bp_step(model, opt_state, x, y):
        result = jpc.make_bp_step(model, optim, opt_state, y, input=x, loss_id="mse")
        return result["model"], result["opt_state"], result["loss"]

    return {"PC": pc_step, "BP": bp_step}


def evaluate(model, x_test, y_test) -> tuple[float, float]:
    """Feedforward test loss and accuracy (percent) on the whole test set."""
    loss, acc = jpc.test_discriminative_pc(model, y_test, x_test)
    return float(loss), float(acc)


def train(name, step, model, optim, data, args) -> dict:
    """Train one method for `args.iters` steps; return its history and timings."""
    (x_train, y_train), (x_test, y_test) = data
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    batches = datasets.batches(x_train, y_train, args.batch_size, args.seed)
    log = {"train_loss": [], "eval_iter": [], "test_loss": [], "test_acc": []}
    step_seconds = []
    _record_eval(log, 0, evaluate(model, x_test, y_test))
    bar = progress(range(1, args.iters + 1), desc=name, dynamic_ncols=True)
    for it in bar:
        x, y = next(batches)
        start = time.perf_counter()
        model, opt_state, loss = step(model, opt_state, x, y)
        log["train_loss"].append(float(loss))  # float() waits for the result
        step_seconds.append(time.perf_counter() - start)
        if it % args.eval_every == 0 or it == args.iters:
            _record_eval(log, it, evaluate(model, x_test, y_test))
            bar.set_postfix(
                loss=f"{log['train_loss'][-1]:.4f}",
                test_acc=f"{log['test_acc'][-1]:.2f}%",
            )
    return {**log, **_timings(step_seconds)}


def _record_eval(log: dict, it: int, loss_and_acc: tuple[float, float]) -> None:
    log["eval_iter"].append(it)
    log["test_loss"].append(loss_and_acc[0])
    log["test_acc"].append(loss_and_acc[1])


def _timings(step_seconds: list[float]) -> dict:
    """The first step includes compilation; the median of the rest is the step time."""
    steady = step_seconds[1:] or step_seconds
    return {
        "first_step_seconds": step_seconds[0],
        "median_step_seconds": float(np.median(steady)),
        "train_seconds": float(np.sum(step_seconds)),
    }


# ------------------------------------------------------------------------- outputs


def save_plot(runs: dict, dataset: str, path: Path) -> None:
    """Train loss per step and test accuracy per evaluation, both methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, run), style in zip(runs.items(), ("-", "--")):
        iters = np.arange(1, len(run["train_loss"]) + 1)
        ax_loss.plot(iters, run["train_loss"], style, label=name, alpha=0.8)
        ax_acc.plot(
            run["eval_iter"], run["test_acc"], style, label=name, marker="o", ms=3
        )
    ax_loss.set(xlabel="iteration", ylabel="train loss (MSE)", yscale="log")
    ax_acc.set(xlabel="iteration", ylabel="test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"PC vs backprop on {dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(runs: dict) -> None:
    """PC and backprop side by side: final test scores and step times."""
    print(f"\n{'':24}{'PC':>10}{'BP':>10}")
    rows = [
        ("test accuracy (%)", "test_acc", lambda v: f"{v[-1]:.2f}"),
        ("test loss", "test_loss", lambda v: f"{v[-1]:.4f}"),
        ("time / iteration (ms)", "median_step_seconds", lambda v: f"{1e3 * v:.2f}"),
        ("first step, compile (s)", "first_step_seconds", lambda v: f"{v:.2f}"),
        ("total train time (s)", "train_seconds", lambda v: f"{v:.2f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:24}" + "".join(f"{fmt(runs[m][key]):>10}" for m in runs))


def main(argv=None) -> dict:
    """Train both methods, print the comparison, write the plot and the JSON."""
    args = parse_args(argv)
    print(f"Results and plots will be written to {args.out_dir.resolve()}")
    name, source = resolve_dataset(args.dataset, args.data_dir)
    print(f"Dataset: {name} ({source})")
    data = load_data(name, args.data_dir)
    (x_train, _), (x_test, _) = data
    print(
        f"{len(x_train)} training / {len(x_test)} test examples, input dim "
        f"{x_train.shape[1]}; JAX backend: {jax.default_backend()}"
    )

    model = jpc.make_mlp(
        jax.random.PRNGKey(args.seed),
        input_dim=x_train.shape[1],
        width=args.width,
        depth=args.depth,
        output_dim=N_CLASSES,
        act_fn="tanh",
    )
    optim = optax.adam(PARAM_LR)
    runs = {
        method: train(method, step, model, optim, data, args)
        for method, step in make_steps(optim, args.activity_lr).items()
    }
    print_summary(runs)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_plot(runs, name, args.out_dir / "learning_curves.png")
    results = _results(args, name, source, x_train, x_test, runs)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Wrote {(args.out_dir / 'results.json').resolve()}")
    print(f"Wrote {(args.out_dir / 'learning_curves.png').resolve()}")
    return results


def _results(args, name, source, x_train, x_test, runs) -> dict:
    """Everything written to `results.json`."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return {
        "dataset": name,
        "data_source": source,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "input_dim": int(x_train.shape[1]),
        "config": {
            **config,
            "act_fn": "tanh",
            "loss": "mse",
            "param_optim": f"adam({PARAM_LR})",
            "activity_optim": f"per_example(sgd({args.activity_lr}))",
            "n_inference_steps": N_INFERENCE_STEPS,
        },
        "jax": jax_info(),
        "runs": runs,
    }


if __name__ == "__main__":
    main()
