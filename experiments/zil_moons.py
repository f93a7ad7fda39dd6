"""Z-IL on two moons: Z-IL vs its PC hybrid vs PC vs backprop (PCX's Z-IL study).

A 3-layer leaky-ReLU MLP of width 32 with biases (`jpc.make_mlp`, standard
parameterisation), cross-entropy output, batch 256, 8 epochs, 8 seeds (the seed sets the
initialisation and the batch order; the data set is fixed). Four learners, all with the
same parameter optimiser (SGD by default) from the same initialisation:

- `zil`: [`jpc.make_zil_step`][] (feedforward pass, one Z-IL sweep, one update; with
  SGD this is exactly backprop, so `zil` and `bp` must agree up to float32 rounding);
- `hybrid`: the same sweep, then `--n-inference-steps` more PC inference steps and one
  more PC weight update (`hybrid_steps`);
- `pc`: standard PC ([`jpc.make_pc_step`][]), `--n-inference-steps` SGD steps on the
  activities fused into the step, one weight update at the inferred state;
- `bp`: backprop ([`jpc.make_bp_step`][]).

The activity learning rate is per example: the optax rate is it times the batch size
(the energy is a batch mean). Reported per learner: the best test accuracy over the
epochs and the accuracy after half the epochs, mean ± std over seeds, and the time per
epoch.

    python -m experiments.zil_moons            # 8 seeds, 8 epochs
    python -m experiments.zil_moons --quick    # 2 seeds, 4 epochs
    python -m experiments.zil_moons --preset tutorial

`--preset tutorial` is the setting of PCX's Z-IL tutorial instead of ours: 1 024
training and 1 024 test points (noise 0.2), so 4 steps an epoch at batch 256; SGD at
0.2 with Nesterov momentum 0.9 on the batch-mean gradient; the hybrid takes the Z-IL
sweep (an activity step of 1 per example) and then 7 PC steps of 0.1 per example,
T = 8 in all.

Writes `results.json` and `zil_moons.png` to `--out-dir`.
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


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "zil_moons"
# The Z-IL tutorial's setting (`--preset tutorial`).
TUTORIAL = dict(
    n_samples=2048,
    test_fraction=0.5,
    param_lr=0.2,
    momentum=0.9,
    nesterov=True,
    activity_lr=0.1,
    hybrid_steps=7,
    out_dir=DEFAULT_OUT_DIR.with_name("zil_moons_tutorial"),
)
METHODS = ("zil", "hybrid", "pc", "bp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.zil_moons",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=["ours", "tutorial"],
        default="ours",
        help="`tutorial`: the Z-IL tutorial's setting (data size, optimiser, steps)",
    )
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3, help="number of layers")
    parser.add_argument("--param-optim", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--param-lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    parser.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, default=False
    )
    parser.add_argument(
        "--activity-lr", type=float, default=0.1, help="per-example activity step"
    )
    parser.add_argument("--n-inference-steps", type=int, default=8, help="hybrid, pc")
    parser.add_argument(
        "--hybrid-steps",
        type=int,
        default=None,
        help="PC steps after the hybrid's Z-IL sweep (default: --n-inference-steps)",
    )
    parser.add_argument("--n-samples", type=int, default=10000, help="moons points")
    parser.add_argument("--noise", type=float, default=0.2, help="moons noise")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 epochs")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.preset == "tutorial":
        for name, value in TUTORIAL.items():
            if name != "out_dir" or args.out_dir == DEFAULT_OUT_DIR:
                setattr(args, name, value)
    if args.hybrid_steps is None:
        args.hybrid_steps = args.n_inference_steps
    if args.quick:
        args.seeds, args.epochs = 2, 4
    return args


def make_steps(args, optim) -> dict:
    """One jitted-step callable per method: `(model, opt_state, x, y) -> dict`."""
    activity_optim = optax.sgd(args.activity_lr * args.batch_size)
    T = args.n_inference_steps

    def zil(model, state, x, y):
        return jpc.make_zil_step(model, optim, state, y, input=x, loss_id="ce")

    def hybrid(model, state, x, y):
        return jpc.make_zil_step(
            model,
            optim,
            state,
            y,
            input=x,
            loss_id="ce",
            hybrid_steps=args.hybrid_steps,
            activity_optim=activity_optim,
        )

    def pc(model, state, x, y):
        return jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            loss_id="ce",
            activity_optim=activity_optim,
            n_inference_steps=T,
        )

    def bp(model, state, x, y):
        return jpc.make_bp_step(model, optim, state, y, input=x, loss_id="ce")

    steps = dict(zil=zil, hybrid=hybrid, pc=pc, bp=bp)
    return {name: steps[name] for name in args.methods}


def accuracy(model, x, y) -> float:
    return float(jpc.test_discriminative_pc(model, y, x, loss="ce")[1])


def train(step, model, optim, data, args, seed) -> dict:
    (x_train, y_train), (x_test, y_test) = data
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    batches = datasets.batches(x_train, y_train, args.batch_size, seed + 1000)
    n_batches = len(x_train) // args.batch_size
    accs, epoch_seconds = [], []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for _ in range(n_batches):
            x, y = next(batches)
            out = step(model, state, jnp.asarray(x), jnp.asarray(y))
            model, state = out["model"], out["opt_state"]
        jax.block_until_ready(model)
        epoch_seconds.append(time.perf_counter() - start)
        accs.append(accuracy(model, x_test, y_test))
    return dict(test_acc=accs, epoch_seconds=epoch_seconds)


def summarise(runs: list[dict], epochs: int) -> dict:
    accs = np.array([r["test_acc"] for r in runs])
    best, half = accs.max(axis=1), accs[:, epochs // 2 - 1]
    # The first epoch includes compilation; time the rest when there is a rest.
    secs = np.array([r["epoch_seconds"][1:] or r["epoch_seconds"] for r in runs])
    return dict(
        best_acc_mean=float(best.mean()),
        best_acc_std=float(best.std()),
        half_acc_mean=float(half.mean()),
        half_acc_std=float(half.std()),
        seconds_per_epoch=float(secs.mean()),
    )


def save_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results["methods"].items():
        accs = np.array([r["test_acc"] for r in res["runs"]])
        epochs = np.arange(1, accs.shape[1] + 1)
        mean, std = accs.mean(0), accs.std(0)
        ax.plot(epochs, mean, marker="o", label=name)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Two moons, {results['config']['seeds']} seeds (mean ± std)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test) = datasets.load_moons(
        args.n_samples, args.noise, seed=0, test_fraction=args.test_fraction
    )
    data = (
        (x_train, datasets.one_hot(y_train, 2)),
        (x_test, datasets.one_hot(y_test, 2)),
    )
    if args.param_optim == "sgd":
        optim = optax.sgd(args.param_lr, args.momentum or None, args.nesterov)
    else:
        optim = optax.adam(args.param_lr)
    steps = make_steps(args, optim)
    runs = {name: [] for name in steps}
    jobs = [(s, name) for s in range(args.seeds) for name in steps]
    for seed, name in progress(jobs, desc="zil_moons"):
        model = jpc.make_mlp(
            jr.PRNGKey(seed), 2, args.width, args.depth, 2, "leaky_relu", use_bias=True
        )
        runs[name].append(train(steps[name], model, optim, data, args, seed))
    results = dict(
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        machine=f"{jax.devices()[0].platform}, {jax_versions()}",
        methods={
            name: dict(summary=summarise(r, args.epochs), runs=r)
            for name, r in runs.items()
        },
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    save_plot(results, args.out_dir / "zil_moons.png")
    half = args.epochs // 2
    for name, res in results["methods"].items():
        s = res["summary"]
        print(
            f"{name:>7}: best {s['best_acc_mean']:.2f} ± {s['best_acc_std']:.2f}%, "
            f"epoch {half}: {s['half_acc_mean']:.2f} ± {s['half_acc_std']:.2f}%, "
            f"{s['seconds_per_epoch']:.3f} s/epoch"
        )
    return results


if __name__ == "__main__":
    main()
