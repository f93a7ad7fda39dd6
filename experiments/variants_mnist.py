"""Hybrid, bidirectional and error-based PC on MNIST.

Each variant trains tanh MLPs with Adam on the parameters and plain SGD on its
inference variables (activities, or errors for ePC), `--n-inference-steps` steps per
batch fused into one compiled step. The inference step size is per example: the optax
rate is it times the batch size (the energies are batch means). MSE energies on
one-hot labels throughout.

- `hpc` (Tschantz et al. 2023): generator label -> image (10-W-W-784) and amortiser
  image -> label (784-W-W-10), [`jpc.make_hpc_step`][] with the label clamped.
  Reported: the amortiser's feedforward accuracy on the whole test set, and the
  amortiser / hybrid (amortised guess + generator inference) / generator
  (inference from random activities) accuracies of [`jpc.test_hpc`][] on
  `--hpc-test-size` test images, inferring for `--hpc-test-max-t1` per-example time
  units (`max_t1` is that times the batch size, as the energy is a batch mean).
- `bpc` (Oliviers, Tang & Bogacz 2025): top-down 784-W-W-10 and bottom-up 10-W-W-784
  sharing the activities, [`jpc.update_bpc_activities`][] /
  [`jpc.update_bpc_params`][]; feedforward accuracy of the top-down network.
- `epc` (Goemaere et al. 2025): 784-W-W-10 with free per-layer errors,
  [`jpc.update_epc_errors`][] / [`jpc.update_epc_params`][]; feedforward accuracy.
- `pc`, `bp`: baselines on the same 784-W-W-10 network, standard PC
  ([`jpc.make_pc_step`][], same inference budget) and backprop
  ([`jpc.make_bp_step`][]).

These are the three papers' MNIST set-ups in kind (MLPs, MSE, Adam on the weights,
tens of inference steps), not their exact hyperparameter grids, which were tuned over
more epochs than a shared 2-core CPU allows; the defaults (width 256, batch 64, 20
inference steps, 2 epochs) say what was run.

    JPC_DATA_DIR=/path/to/mnist python -m experiments.variants_mnist
    python -m experiments.variants_mnist --quick   # 1 epoch on 10k training images

Writes `results.json` and `variants_mnist.png` to `--out-dir`.
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


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "variants_mnist"
METHODS = ("hpc", "bpc", "epc", "pc", "bp")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.variants_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--param-lr", type=float, default=1e-3, help="Adam")
    parser.add_argument("--activity-lr", type=float, default=0.1, help="per example")
    parser.add_argument("--n-inference-steps", type=int, default=20)
    parser.add_argument(
        "--bpc-backward-weight", type=float, default=1.0, help="bPC's alpha_b"
    )
    parser.add_argument("--n-train", type=int, default=None, help="subset of train")
    parser.add_argument("--hpc-test-size", type=int, default=512)
    parser.add_argument(
        "--hpc-test-max-t1",
        type=float,
        default=20.0,
        help="per-example inference time of test_hpc (times the test batch size)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 10k images")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.n_train = 1, 10000
    return args


def mlp(key, d_in, width, d_out):
    return jpc.make_mlp(key, d_in, width, 3, d_out, "tanh")


# ------------------------------------------------------------------- the variants


def make_hpc(args, key):
    k1, k2 = jr.split(key)
    nets = (mlp(k1, 10, args.width, 784), mlp(k2, 784, args.width, 10))
    optims = (optax.adam(args.param_lr), optax.adam(args.param_lr))
    states = (
        optims[0].init((eqx.filter(nets[0], eqx.is_array), None)),
        optims[1].init(eqx.filter(nets[1], eqx.is_array)),
    )
    activity_optim = optax.sgd(args.activity_lr * args.batch_size)

    def step(nets, states, x, y):
        out = jpc.make_hpc_step(
            *nets,
            optims,
            states,
            x,
            input=y,
            activity_optim=activity_optim,
            n_inference_steps=args.n_inference_steps,
        )
        return (out["generator"], out["amortiser"]), out["opt_states"]

    return nets, states, step, nets[1]


def make_bpc(args, key):
    k1, k2 = jr.split(key)
    nets = (mlp(k1, 784, args.width, 10), mlp(k2, 10, args.width, 784)[::-1])
    optims = (optax.adam(args.param_lr), optax.adam(args.param_lr))
    states = tuple(
        o.init(eqx.filter(m, eqx.is_array)) for o, m in zip(optims, nets, strict=True)
    )
    activity_optim = optax.sgd(args.activity_lr * args.batch_size)
    alpha = args.bpc_backward_weight

    @eqx.filter_jit
    def step(nets, states, x, y):
        z = jpc.init_activities_with_ffwd(nets[0], x)

        def infer(carry, _):
            z, s = carry
            out = jpc.update_bpc_activities(
                *nets, z, activity_optim, s, y, input=x, backward_energy_weight=alpha
            )
            return (out["activities"], out["opt_state"]), None

        init = (z, activity_optim.init(z))
        (z, _), _ = jax.lax.scan(infer, init, length=args.n_inference_steps)
        out = jpc.update_bpc_params(
            *nets, z, *optims, *states, y, input=x, backward_energy_weight=alpha
        )
        return tuple(out["models"]), out["opt_states"]

    return nets, states, step, nets[0]


def make_epc(args, key):
    nets = (mlp(key, 784, args.width, 10), None)
    optim = optax.adam(args.param_lr)
    state = optim.init((eqx.filter(nets[0], eqx.is_array), None))
    error_optim = optax.sgd(args.activity_lr * args.batch_size)
    sizes = [784, args.width, args.width, 10]

    @eqx.filter_jit
    def step(params, state, x, y):
        errors = jpc.init_epc_errors(sizes, batch_size=x.shape[0])

        def infer(carry, _):
            e, s = carry
            out = jpc.update_epc_errors(params, e, error_optim, s, y, input=x)
            return (out["errors"], out["opt_state"]), None

        init = (errors, error_optim.init(errors))
        (errors, _), _ = jax.lax.scan(infer, init, length=args.n_inference_steps)
        out = jpc.update_epc_params(params, errors, optim, state, y, input=x)
        return (out["model"], out["skip_model"]), out["opt_state"]

    return nets, state, step, nets[0]


def make_pc(args, key):
    """Baseline: standard PC on the same 784-W-W-10 network and inference budget."""
    nets = (mlp(key, 784, args.width, 10),)
    optim = optax.adam(args.param_lr)
    state = optim.init((eqx.filter(nets[0], eqx.is_array), None))
    activity_optim = optax.sgd(args.activity_lr * args.batch_size)

    def step(nets, state, x, y):
        out = jpc.make_pc_step(
            nets[0],
            optim,
            state,
            y,
            input=x,
            activity_optim=activity_optim,
            n_inference_steps=args.n_inference_steps,
        )
        return (out["model"],), out["opt_state"]

    return nets, state, step, nets[0]


def make_bp(args, key):
    """Baseline: backprop on the same 784-W-W-10 network."""
    nets = (mlp(key, 784, args.width, 10),)
    optim = optax.adam(args.param_lr)
    state = optim.init((eqx.filter(nets[0], eqx.is_array), None))

    def step(nets, state, x, y):
        out = jpc.make_bp_step(nets[0], optim, state, y, input=x)
        return (out["model"],), out["opt_state"]

    return nets, state, step, nets[0]


MAKERS = dict(hpc=make_hpc, bpc=make_bpc, epc=make_epc, pc=make_pc, bp=make_bp)
CLASSIFIER = dict(hpc=1, bpc=0, epc=0, pc=0, bp=0)  # the feedforward classifier


# ------------------------------------------------------------------- training


def run(name, args, train, test) -> dict:
    nets, states, step, _ = MAKERS[name](args, jr.PRNGKey(args.seed))
    x_train, y_train = train
    n_batches = len(x_train) // args.batch_size
    batches = datasets.batches(x_train, y_train, args.batch_size, args.seed)
    log = dict(test_acc=[], epoch_seconds=[])
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for _ in progress(range(n_batches), desc=f"{name} epoch {epoch + 1}"):
            x, y = next(batches)
            nets, states = step(nets, states, jnp.asarray(x), jnp.asarray(y))
        jax.block_until_ready(nets)
        log["epoch_seconds"].append(time.perf_counter() - start)
        classifier = nets[CLASSIFIER[name]]
        _, acc = jpc.test_discriminative_pc(classifier, test[1], test[0])
        log["test_acc"].append(float(acc))
        print(f"{name} epoch {epoch + 1}: test accuracy {float(acc):.2f}%")
    if name == "hpc":
        log["test_hpc"] = hpc_accuracies(nets, args, test)
    later = log["epoch_seconds"][1:] or log["epoch_seconds"]
    log["seconds_per_epoch"] = float(np.mean(later))
    return log


def hpc_accuracies(nets, args, test) -> dict:
    """[`jpc.test_hpc`][] on the first `--hpc-test-size` test images, one batch.

    The energy is a batch mean, so per-example activity gradients scale as 1/B and
    inference over time `t` moves each example as far as time `t/B` would for a
    single example: `max_t1` is the per-example time times the batch size. (The
    steady-state stop and the controller's tolerances act per example, so they stay
    at their defaults.)
    """
    n = args.hpc_test_size
    amort, hybrid, gen, _ = jpc.test_hpc(
        *nets,
        test[0][:n],
        test[1][:n],
        jr.PRNGKey(args.seed + 1),
        layer_sizes=[10, args.width, args.width, 784],
        batch_size=n,
        max_t1=args.hpc_test_max_t1 * n,
    )
    return dict(amortiser=float(amort), hybrid=float(hybrid), generator=float(gen))


def save_plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, log in runs.items():
        epochs = np.arange(1, len(log["test_acc"]) + 1)
        ax.plot(epochs, log["test_acc"], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("feedforward test accuracy (%)")
    ax.set_title("PC variants on MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    x_train, y_train = datasets.load_mnist("train", args.data_dir)
    x_test, y_test = datasets.load_mnist("test", args.data_dir)
    if args.n_train is not None:
        x_train, y_train = x_train[: args.n_train], y_train[: args.n_train]
    train = (x_train, datasets.one_hot(y_train, 10))
    test = (jnp.asarray(x_test), jnp.asarray(datasets.one_hot(y_test, 10)))
    runs = {name: run(name, args, train, test) for name in args.methods}
    results = dict(
        config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        machine=f"{jax.devices()[0].platform}, {jax_versions()}",
        methods=runs,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    save_plot(runs, args.out_dir / "variants_mnist.png")
    for name, log in runs.items():
        extra = f", test_hpc {log['test_hpc']}" if "test_hpc" in log else ""
        print(
            f"{name}: final test accuracy {log['test_acc'][-1]:.2f}%, "
            f"{log['seconds_per_epoch']:.1f} s/epoch{extra}"
        )
    return results


if __name__ == "__main__":
    main()
