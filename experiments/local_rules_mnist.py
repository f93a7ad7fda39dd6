"""Local learning rules on MNIST: the "microlearning" comparison.

One hidden layer of 500 sigmoid units (784-500-10 with biases, `jpc.make_mlp` layout),
MSE on one-hot labels, batch 200, 3 epochs of plain SGD, for six rules from the same
initialisation and the same batches:

- weight perturbation (WP) and node perturbation (NP): `jpc.compute_wp_param_grads`,
  `jpc.compute_np_param_grads` (one perturbation per step by default);
- feedback alignment (FA) and Kolen-Pollack (KP): `jpc.compute_fa_param_grads`,
  `jpc.compute_kp_updates` with feedback from `jpc.init_feedback_weights`;
- backprop (BP): `jpc.make_bp_step`;
- predictive coding (PC): `jpc.make_pc_step` with T SGD inference steps.

Recorded: the training loss of every step (feedforward loss before the update), test
accuracy per epoch, the gradient signal-to-noise ratio at initialisation
(`jpc.compute_grad_snr` over estimates on `--snr-batches` different minibatches), and
the cosine similarity of each rule's update to the backprop gradient of its own current
model on a fixed probe batch, per epoch (`jpc.compute_grad_cosine_similarity`).

    python -m experiments.local_rules_mnist [--quick]
    python -m experiments.local_rules_mnist --preset tutorial

`--preset tutorial` is the setting of the Microlearning tutorial instead of ours: a
sigmoid on the hidden *and* the output units, weights and biases drawn from
N(0, 0.1²), 3 epochs on the first 50 000 training images, SGD at 0.001 on the
batch-summed update (0.2 on jpc's batch mean, for every rule), perturbation noise
σ = 0.1 for WP and NP, test accuracy on the first 1 000 test images.

Writes `results.json` and `local_rules.png` to `--out-dir`.
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
from jpc._compat import jax_info


METHODS = ("WP", "NP", "FA", "KP", "BP", "PC")
N_CLASSES = 10
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "local_rules_mnist"
# The Microlearning tutorial's setting (`--preset tutorial`).
TUTORIAL = dict(
    init_std=0.1,
    output_sigmoid=True,
    n_train=50_000,
    n_test=1_000,
    lr=0.2,
    wp_lr=0.2,
    sigma=0.1,
    out_dir=DEFAULT_OUT_DIR.with_name("local_rules_mnist_tutorial"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.local_rules_mnist",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=["ours", "tutorial"],
        default="ours",
        help="`tutorial`: the Microlearning tutorial's setting (overrides the "
        "initialisation, output, data size, learning rates and noise)",
    )
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.01, help="SGD lr (all but WP)")
    parser.add_argument("--wp-lr", type=float, default=1e-4, help="SGD lr of WP")
    parser.add_argument("--sigma", type=float, default=1e-3, help="perturbation std")
    parser.add_argument("--n-samples", type=int, default=1, help="perturbations/step")
    parser.add_argument("--kp-weight-decay", type=float, default=1e-2)
    parser.add_argument("--pc-steps", type=int, default=20, help="inference steps T")
    parser.add_argument(
        "--pc-activity-lr",
        type=float,
        default=0.1,
        help="per-example activity step (the optax lr is this times the batch size)",
    )
    parser.add_argument("--snr-batches", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=None, help="subset of MNIST")
    parser.add_argument("--n-test", type=int, default=None, help="test subset")
    parser.add_argument(
        "--init-std",
        type=float,
        default=None,
        help="draw weights and biases from N(0, std²) (default: Equinox's init)",
    )
    parser.add_argument(
        "--output-sigmoid",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a sigmoid on the output units",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 6000 examples")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.preset == "tutorial":
        for name, value in TUTORIAL.items():
            if name != "out_dir" or args.out_dir == DEFAULT_OUT_DIR:
                setattr(args, name, value)
    if args.quick:
        args.epochs, args.n_train, args.snr_batches = 1, 6000, 5
    return args


# ---------------------------------------------------------------------------- rules


def mse_of(model, x, y):
    return jpc.mse_loss(jpc.init_activities_with_ffwd(model, x)[-1], y)


def sgd_apply(tree, grads, lr):
    return jax.tree_util.tree_map(
        lambda p, g: p if g is None else p - lr * g,
        tree,
        grads,
        is_leaf=lambda v: v is None,
    )


def make_rules(args) -> dict:
    """Per method: `update(state, x, y, key)` → its weight update (model-shaped)."""
    activity_optim = optax.sgd(args.pc_activity_lr * args.batch_size)
    noise = dict(sigma=args.sigma, n_samples=args.n_samples)

    def pc_update(state, x, y, key):
        model = state["model"]
        acts = jpc.init_activities_with_ffwd(model, x)

        def step(carry, _):
            z, opt_state = carry
            _, g = jpc.compute_pc_activity_grad((model, None), z, y, x=x)
            updates, opt_state = activity_optim.update(g, opt_state, z)
            return (optax.apply_updates(z, updates), opt_state), None

        carry = (acts, activity_optim.init(acts))
        (acts, _), _ = jax.lax.scan(step, carry, length=args.pc_steps)
        return jpc.compute_pc_param_grads((model, None), acts, y, x=x)[0]

    return {
        "WP": lambda s, x, y, k: jpc.compute_wp_param_grads(
            k, s["model"], x, y, **noise
        ),
        "NP": lambda s, x, y, k: jpc.compute_np_param_grads(
            k, s["model"], x, y, **noise
        ),
        "FA": lambda s, x, y, k: jpc.compute_fa_param_grads(
            s["model"], s["feedback"], x, y
        ),
        "KP": lambda s, x, y, k: jpc.compute_fa_param_grads(
            s["model"], s["feedback"], x, y
        ),
        "BP": lambda s, x, y, k: eqx.filter_grad(mse_of)(s["model"], x, y),
        "PC": pc_update,
    }


def make_steps(args) -> dict:
    """Per method: a jitted `step(state, x, y, key)` → `(state, loss)`."""
    rules = make_rules(args)
    optim = optax.sgd(args.lr)
    activity_optim = optax.sgd(args.pc_activity_lr * args.batch_size)

    def plain(name, lr):
        @eqx.filter_jit
        def step(state, x, y, key):
            loss = mse_of(state["model"], x, y)
            grads = rules[name](state, x, y, key)
            return {**state, "model": sgd_apply(state["model"], grads, lr)}, loss

        return step

    @eqx.filter_jit
    def kp_step(state, x, y, key):
        model, feedback = state["model"], state["feedback"]
        loss = mse_of(model, x, y)
        grads, fb_grads = jpc.compute_kp_updates(
            model, feedback, x, y, weight_decay=args.kp_weight_decay
        )
        feedback = [None] + [
            b - args.lr * g for b, g in zip(feedback[1:], fb_grads[1:])
        ]
        return {"model": sgd_apply(model, grads, args.lr), "feedback": feedback}, loss

    def bp_step(state, x, y, key):
        out = jpc.make_bp_step(state["model"], optim, state["opt_state"], y, input=x)
        return {**state, "model": out["model"], "opt_state": out["opt_state"]}, out[
            "loss"
        ]

    def pc_step(state, x, y, key):
        out = jpc.make_pc_step(
            state["model"],
            optim,
            state["opt_state"],
            y,
            input=x,
            activity_optim=activity_optim,
            n_inference_steps=args.pc_steps,
        )
        return {**state, "model": out["model"], "opt_state": out["opt_state"]}, out[
            "loss"
        ]

    return {
        "WP": plain("WP", args.wp_lr),
        "NP": plain("NP", args.lr),
        "FA": plain("FA", args.lr),
        "KP": kp_step,
        "BP": bp_step,
        "PC": pc_step,
    }


# ---------------------------------------------------------------------------- runs


def load(args):
    train = datasets.load_mnist("train", args.data_dir)
    test = datasets.load_mnist("test", args.data_dir)
    test = (test[0][: args.n_test], test[1][: args.n_test])
    x_train, y_train = train[0][: args.n_train], train[1][: args.n_train]
    y_train = datasets.one_hot(y_train, N_CLASSES)
    test = (jnp.asarray(test[0]), jnp.asarray(datasets.one_hot(test[1], N_CLASSES)))
    return (x_train, y_train), test


def make_model(args):
    """784-width-10 with biases; optionally N(0, std²) init and a sigmoid output."""
    model = jpc.make_mlp(
        jr.PRNGKey(args.seed),
        784,
        args.width,
        2,
        N_CLASSES,
        jax.nn.sigmoid,
        use_bias=True,
    )
    if args.init_std is not None:
        leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(model, eqx.is_array))
        keys = jr.split(jr.PRNGKey(args.seed), len(leaves))
        new = [
            args.init_std * jr.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)
        ]
        arrays = jax.tree_util.tree_unflatten(treedef, new)
        model = eqx.combine(arrays, eqx.filter(model, eqx.is_array, inverse=True))
    if args.output_sigmoid:  # the output layer becomes sigmoid(W h + b)
        last = model[-1]
        model = [
            *model[:-1],
            eqx.nn.Sequential([*last.layers, eqx.nn.Lambda(jax.nn.sigmoid)]),
        ]
    return model


def initial_state(model, key) -> dict:
    optim_state = optax.sgd(1.0).init((eqx.filter(model, eqx.is_array), None))
    return {
        "model": model,
        "feedback": jpc.init_feedback_weights(key, model),
        "opt_state": optim_state,
    }


def accuracy(model, test) -> float:
    return float(jpc.test_discriminative_pc(model, test[1], test[0])[1])


def alignment(rule, state, probe, key) -> dict:
    """Cosine of the rule's update with the backprop gradient, both on `probe`."""
    x, y = probe
    bp = eqx.filter_grad(mse_of)(state["model"], x, y)
    cos = jpc.compute_grad_cosine_similarity(rule(state, x, y, key), bp)
    return {k: np.asarray(v).tolist() for k, v in cos.items()}


def feedback_alignment(state) -> float:
    """Cosine between the output layer's feedback matrix and its transposed weight."""
    weight = state["model"][-1].layers[1].weight
    cos = jpc.compute_grad_cosine_similarity([state["feedback"][-1]], [weight.T])
    return float(cos["overall"])


def snr_at_init(rule, state, train, args, key) -> dict:
    """SNR of the rule's estimate across `snr_batches` minibatches (fresh noise)."""
    batches = datasets.batches(*train, args.batch_size, args.seed + 1)
    keys = jr.split(key, args.snr_batches)
    estimates = [rule(state, *next(batches), k) for k in keys]
    stacked = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *estimates)
    snr = jpc.compute_grad_snr(stacked)
    return {k: np.asarray(v).tolist() for k, v in snr.items()}


def run_method(name, step, rule, model, train, test, probe, args) -> dict:
    key = jr.PRNGKey(args.seed + 100)
    state = initial_state(model, jr.PRNGKey(args.seed + 7))
    snr = snr_at_init(rule, state, train, args, key)
    log = {"train_loss": [], "test_acc": [accuracy(model, test)], "snr_init": snr}
    log["cosine"] = [alignment(rule, state, probe, key)]
    uses_feedback = name in ("FA", "KP")
    if uses_feedback:
        log["feedback_alignment"] = [feedback_alignment(state)]
    batches = datasets.batches(*train, args.batch_size, args.seed, n_epochs=args.epochs)
    n_per_epoch = len(train[0]) // args.batch_size
    start = time.perf_counter()
    bar = progress(total=n_per_epoch * args.epochs, desc=name, dynamic_ncols=True)
    for it, (x, y) in enumerate(batches, 1):
        key, sub = jr.split(key)
        state, loss = step(state, jnp.asarray(x), jnp.asarray(y), sub)
        log["train_loss"].append(float(loss))
        bar.update()
        if it % n_per_epoch == 0:
            log["test_acc"].append(accuracy(state["model"], test))
            log["cosine"].append(alignment(rule, state, probe, sub))
            if uses_feedback:
                log["feedback_alignment"].append(feedback_alignment(state))
            bar.set_postfix(
                loss=f"{log['train_loss'][-1]:.4f}", acc=log["test_acc"][-1]
            )
    bar.close()
    log["train_seconds"] = time.perf_counter() - start
    return log


# ---------------------------------------------------------------------------- outputs


def save_plot(runs: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for name, run in runs.items():
        loss = np.asarray(run["train_loss"])
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        axes[0].plot(smooth, label=name)
        axes[1].plot(run["test_acc"], marker="o", label=name)
        first = [c["per_layer"][0] for c in run["cosine"]]
        axes[3].plot(first, marker="o", label=name)
    names = list(runs)
    axes[2].bar(names, [runs[n]["snr_init"]["overall"] for n in names])
    axes[0].set(xlabel="step", ylabel="train loss (MSE, 10-step mean)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)")
    axes[2].set(ylabel="gradient SNR at initialisation", yscale="log")
    axes[3].set(xlabel="epoch", ylabel="cosine to backprop, hidden-layer weights")
    for ax in (axes[0], axes[1], axes[3]):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"Local learning rules, MNIST 784-500(sigmoid)-10, MSE, SGD ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    train, test = load(args)
    probe = (
        jnp.asarray(train[0][: args.batch_size]),
        jnp.asarray(train[1][: args.batch_size]),
    )
    model = make_model(args)
    rules, steps = make_rules(args), make_steps(args)
    rules = {k: eqx.filter_jit(v) for k, v in rules.items()}
    runs = {
        name: run_method(
            name, steps[name], rules[name], model, train, test, probe, args
        )
        for name in METHODS
    }
    header = f"{'test acc per epoch (%)':>34}{'SNR@init':>12}{'cos(BP) W_1':>14}"
    print(f"\n{'':6}{header}")
    for name, run in runs.items():
        accs = " ".join(f"{a:6.2f}" for a in run["test_acc"])
        print(
            f"{name:6}{accs:>34}{run['snr_init']['overall']:12.4f}"
            f"{run['cosine'][-1]['per_layer'][0]:14.4f}"
        )
    for name in ("FA", "KP"):
        trace = ", ".join(f"{c:.3f}" for c in runs[name]["feedback_alignment"])
        print(f"{name}: cos(B_L, W_L^T) per epoch: {trace}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_plot(runs, args.out_dir / "local_rules.png", f"{args.preset} setting")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {
        "config": {
            **config,
            "n_train_used": len(train[0]),
            "n_test_used": len(test[0]),
        },
        "jax": jax_info(),
        "runs": runs,
    }
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"Wrote {args.out_dir / 'results.json'} and local_rules.png")
    return results


if __name__ == "__main__":
    main()
