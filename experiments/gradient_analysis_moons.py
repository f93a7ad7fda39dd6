"""Gradient analysis of a PCN on two moons: activity learning rate vs width.

A 4-layer leaky-ReLU MLP with biases (`jpc.make_mlp`, standard parameterisation)
trained as a PCN with a cross-entropy output energy (`loss_id="ce"`) on scikit-learn's
two moons (standardised). Each training step: feedforward initialisation, T=8 SGD steps
on the activities, one SGD step on the weights at the inferred activities
(`jpc.update_pc_params`). Plain SGD on the weights keeps the size of each layer's
gradient meaningful (Adam would rescale the small gradients of the early layers).

For every hidden width in `--widths` and activity learning rate in `--activity-lrs`
(the per-example step: the optax learning rate is this times the batch size, because
the energy is a batch mean), the run records the test accuracy after training and, for
every epoch, the variance of each layer's weight gradient relative to the output
layer's (`jpc.compute_layer_grad_variance_ratios`, averaged over the epoch's steps).

    python -m experiments.gradient_analysis_moons [--quick]
    python -m experiments.gradient_analysis_moons --preset tutorial

`--preset tutorial` is the setting of JPC's gradient-analysis tutorial instead of our
wider study: plain SGD on the activities with rates 1e-3 … 5e-1 applied to the
gradient of the *batch-mean* energy (`--lr-convention batch-mean`: a per-example step
of rate/64 at its batch of 64), widths 16 … 2048, T = 8, AdamW(1e-2) on the weights,
512 training and 256 test points (noise 0.2), batch 64, 4 epochs; then its
gradient-variance study at widths 50 … 1600, rate 1e-3, T = 16.

Writes `results.json` and `gradient_analysis.png` to `--out-dir`.

    python -m experiments.gradient_analysis_moons --sweep-timing [--quick]

measures instead how long the whole activity-rate sweep takes with the public
training step `jpc.make_pc_step` (see `sweep_timing`) and writes `sweep_timing.json`.
"""

import argparse
import itertools
import json
import time
import warnings
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


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "gradient_analysis_moons"
WIDTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
ACTIVITY_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
# The tutorial's setting (`--preset tutorial`); its rates are optax rates on the
# batch-mean energy, and its variance study runs at other widths with T = 16.
TUTORIAL = dict(
    widths=list(WIDTHS),
    activity_lrs=[1e-3, 5e-3, 1e-2, 5e-2, 1e-1, 5e-1],
    lr_convention="batch-mean",
    n_inference_steps=8,
    epochs=4,
    batch_size=64,
    param_optim="adamw",
    param_lr=1e-2,
    n_samples=768,
    test_fraction=1 / 3,
    noise=0.2,
    ratio_width=128,
    ratio_study_widths=[50, 100, 200, 400, 800, 1600],
    ratio_study_lr=1e-3,
    ratio_study_steps=16,
    out_dir=DEFAULT_OUT_DIR.with_name("gradient_analysis_moons_tutorial"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gradient_analysis_moons",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        choices=["wide", "tutorial"],
        default="wide",
        help="`tutorial`: the gradient-analysis tutorial's own setting (overrides the "
        "grid, optimiser, data and epochs)",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument(
        "--activity-lrs", type=float, nargs="+", default=list(ACTIVITY_LRS)
    )
    parser.add_argument(
        "--lr-convention",
        choices=["per-example", "batch-mean"],
        default="per-example",
        help="per-example: the optax rate is lr × batch size (a step of lr per "
        "example); batch-mean: the optax rate on the batch-mean energy is lr",
    )
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--n-inference-steps", type=int, default=8, help="T")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--param-lr", type=float, default=0.1, help="weights' lr")
    parser.add_argument(
        "--param-optim", choices=["sgd", "adam", "adamw"], default="sgd"
    )
    parser.add_argument("--n-samples", type=int, default=1000, help="moons points")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--noise", type=float, default=0.2, help="moons noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratio-width", type=int, default=128, help="width plotted")
    parser.add_argument("--quick", action="store_true", help="3 widths, 3 lrs, 2 ep")
    parser.add_argument(
        "--sweep-timing",
        action="store_true",
        help="only time the sweep over --activity-lrs at --sweep-width with "
        "jpc.make_pc_step: a new optimiser per rate, a traced activity_lr, and a "
        "vmap over the rates (writes sweep_timing.json)",
    )
    parser.add_argument("--sweep-width", type=int, default=128)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    args.ratio_study_widths = []
    if args.preset == "tutorial":
        for name, value in TUTORIAL.items():
            if name != "out_dir" or args.out_dir == DEFAULT_OUT_DIR:
                setattr(args, name, value)
    if args.quick:
        args.widths, args.activity_lrs, args.epochs = (
            [16, 128, 512],
            [0.01, 0.1, 1.0],
            2,
        )
        args.ratio_width = 128
        args.ratio_study_widths = args.ratio_study_widths[:2]
    return args


# ---------------------------------------------------------------------------- training


def optax_activity_lr(activity_lr: float, args) -> float:
    """The optax rate on jpc's batch-mean energy for `--lr-convention`."""
    if args.lr_convention == "batch-mean":
        return activity_lr
    return activity_lr * args.batch_size


_STEPS: dict = {}


def make_step(args, n_steps: int):
    """A jitted PC training step that also returns each layer's gradient variance.

    `step(model, opt_state, x, y, rate)`: `n_steps` plain SGD steps of optax rate
    `rate` on the activities (the gradient of the batch-mean energy), then one
    `--param-optim` step on the weights. `rate` is traced, so the sweep over rates
    compiles once per width and `n_steps`; built once per `n_steps`.
    """
    if n_steps in _STEPS:
        return _STEPS[n_steps]
    optim = getattr(optax, args.param_optim)(args.param_lr)
    energy = dict(loss_id="ce")

    @eqx.filter_jit
    def step(model, opt_state, x, y, rate):
        acts = jpc.init_activities_with_ffwd(model, x)

        def infer(z, _):
            _, grads = jpc.compute_pc_activity_grad((model, None), z, y, x=x, **energy)
            return jax.tree_util.tree_map(lambda a, g: a - rate * g, z, grads), None

        acts, _ = jax.lax.scan(infer, acts, length=n_steps)
        out = jpc.update_pc_params(
            (model, None), acts, optim, opt_state, y, input=x, **energy
        )
        variances = jpc.compute_layer_grad_variance_ratios(out["grads"][0])
        return out["model"], out["opt_state"], variances["variances"]

    _STEPS[n_steps] = step, optim
    return step, optim


def load(args):
    train, test = datasets.load_moons(
        args.n_samples, args.noise, seed=args.seed, test_fraction=args.test_fraction
    )
    mean, std = train[0].mean(0), train[0].std(0)
    train = ((train[0] - mean) / std, datasets.one_hot(train[1], 2))
    test = (
        jnp.asarray((test[0] - mean) / std),
        jnp.asarray(datasets.one_hot(test[1], 2)),
    )
    return train, test


def run(width, activity_lr, data, args, n_steps=None) -> dict:
    """Trains one (width, activity lr); test accuracy and layer variances per epoch."""
    n_steps = args.n_inference_steps if n_steps is None else n_steps
    (x_train, y_train), (x_test, y_test) = data
    model = jpc.make_mlp(
        jr.PRNGKey(args.seed), 2, width, args.depth, 2, "leaky_relu", use_bias=True
    )
    step, optim = make_step(args, n_steps)
    rate = jnp.asarray(optax_activity_lr(activity_lr, args), jnp.float32)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    batches = datasets.batches(x_train, y_train, args.batch_size, args.seed)
    per_epoch = len(x_train) // args.batch_size
    ratios, accs, raw = [], [], []
    for _ in range(args.epochs):
        variances = []
        for _ in range(per_epoch):
            x, y = map(jnp.asarray, next(batches))
            model, opt_state, var = step(model, opt_state, x, y, rate)
            variances.append(var)
        mean_var = np.mean(np.asarray(variances), axis=0)
        ratios.append((mean_var / mean_var[-1]).tolist())
        raw.append(mean_var.tolist())
        _, acc = jpc.test_discriminative_pc(model, y_test, x_test, loss="ce")
        accs.append(float(acc))
    return {"test_acc": accs, "variance_ratios": ratios, "variances": raw}


# ------------------------------------------------------------------ sweep timing


class _CompileCounter:
    """Counts XLA compilations, and the seconds of tracing, lowering and compiling,
    through `jax.monitoring`."""

    EVENTS = {
        "/jax/core/compile/backend_compile_duration": "xla_compile_seconds",
        "/jax/core/compile/jaxpr_trace_duration": "trace_seconds",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_seconds",
    }

    def __init__(self):
        self.totals = dict.fromkeys(["xla_compilations", *self.EVENTS.values()], 0)
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if event in self.EVENTS:
            self.totals[self.EVENTS[event]] += duration
        if event == "/jax/core/compile/backend_compile_duration":
            self.totals["xla_compilations"] += 1

    def snapshot(self) -> dict:
        return dict(self.totals)


def _max_rel_diff(tree, ref) -> float:
    """max |a - b| / max |b| over the leaves (0 where both are the same NaNs)."""
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf")
        ok = ~np.isnan(b)
        scale = max(np.abs(b[ok]).max(initial=0.0), 1e-30)
        worst = max(worst, float(np.abs(a[ok] - b[ok]).max(initial=0.0) / scale))
    return worst


SWEEP_RTOL = 1e-5  # float32 tolerance of the agreement of the three ways


def sweep_timing(data, args) -> dict:
    """Wall time of the whole sweep over `--activity-lrs` with `jpc.make_pc_step`.

    One width (`--sweep-width`), the same initial network, the same batches
    (`--epochs` epochs), T = `--n-inference-steps` plain SGD steps on the
    activities, trained three ways:

    - `new_optimiser`: a new `optax.sgd(rate)` per rate, the way a sweep was written
      before `activity_lr`: the optimiser is part of the compiled program, so each
      rate compiles one;
    - `activity_lr`: one `optax.sgd(1.0)` and the rate as the traced `activity_lr`,
      one rate after the other: one compilation for the sweep;
    - `vmap`: the same step `eqx.filter_vmap`ped over the array of rates (and over a
      stacked copy of the network per rate) inside one `eqx.filter_jit`: one program
      trains every rate at once.

    Each way's time includes its compilations and ends when every rate's final
    parameters are ready. The final parameters of `activity_lr` and `vmap` are
    compared, per rate, with those of `new_optimiser` (max |difference| / max
    |parameter| over the leaves). Compilations are counted with
    `jpc.make_pc_step.jitted.compilations.count` (programs of the training step)
    and with a `jax.monitoring` listener (every XLA compilation, including the
    outer `eqx.filter_jit`'s).
    """
    counter = _CompileCounter()
    (x_train, y_train), _ = data
    steps_per_epoch = len(x_train) // args.batch_size
    stream = datasets.batches(x_train, y_train, args.batch_size, args.seed)
    batches = [
        tuple(map(jnp.asarray, next(stream)))
        for _ in range(args.epochs * steps_per_epoch)
    ]
    rates = [optax_activity_lr(lr, args) for lr in args.activity_lrs]
    optim = getattr(optax, args.param_optim)(args.param_lr)

    def network(width):
        return jpc.make_mlp(
            jr.PRNGKey(args.seed), 2, width, args.depth, 2, "leaky_relu", use_bias=True
        )

    def train_step(model, opt_state, x, y, activity_optim, activity_lr=None):
        out = jpc.make_pc_step(
            model,
            optim,
            opt_state,
            y,
            input=x,
            loss_id="ce",
            activity_optim=activity_optim,
            n_inference_steps=args.n_inference_steps,
            activity_lr=activity_lr,
        )
        return out["model"], out["opt_state"]

    def params(model):
        return eqx.filter(model, eqx.is_array)

    # Warm-up at another width (one-off tracing and import costs of the library).
    warm = network(8)
    warm_state = optim.init((params(warm), None))
    x, y = batches[0]
    jax.block_until_ready(
        params(train_step(warm, warm_state, x, y, optax.sgd(1.0), 0.1)[0])
    )

    model = network(args.sweep_width)
    opt_state = optim.init((params(model), None))

    def train(activity_optim, activity_lr=None):
        m, s = model, opt_state
        for x, y in batches:
            m, s = train_step(m, s, x, y, activity_optim, activity_lr)
        return params(m)

    def new_optimiser():
        return [train(optax.sgd(rate)) for rate in rates]

    def activity_lr():
        unit = optax.sgd(1.0)
        return [train(unit, rate) for rate in rates]

    # A copy of the network and optimiser state per rate for `vmap` (set up before
    # the clock starts, like the network itself).
    stack = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jnp.broadcast_to(a, (len(rates), *a.shape)), tree
    )
    models, opt_states = eqx.combine(stack(params(model)), model), stack(opt_state)
    lrs = jnp.asarray(rates, jnp.float32)

    def vmapped():
        unit = optax.sgd(1.0)
        m, s = models, opt_states

        @eqx.filter_jit
        def sweep_step(m, s, x, y, lrs):
            batched = eqx.filter_vmap(lambda m, s, lr: train_step(m, s, x, y, unit, lr))
            return batched(m, s, lrs)

        for x, y in batches:
            m, s = sweep_step(m, s, x, y, lrs)
        return params(m)  # stacked: one row per rate

    ways = {"new_optimiser": new_optimiser, "activity_lr": activity_lr, "vmap": vmapped}
    timing, finals = {}, {}
    library_counter = jpc.make_pc_step.jitted.compilations
    with warnings.catch_warnings():  # the recompile warning: on purpose here
        warnings.filterwarnings("ignore", message=".*has compiled")
        for name, way in ways.items():
            steps_before, before = library_counter.count, counter.snapshot()
            start = time.perf_counter()
            finals[name] = jax.block_until_ready(way())
            seconds = time.perf_counter() - start
            after = counter.snapshot()
            timing[name] = {
                "seconds": seconds,
                "step_programs": library_counter.count - steps_before,
                **{k: after[k] - before[k] for k in after},
            }
            print(f"{name:>14}: {seconds:7.2f} s, {timing[name]}")
    jpc.raise_pending_step_errors()
    finals["vmap"] = [
        jax.tree_util.tree_map(lambda a, i=i: a[i], finals["vmap"])
        for i in range(len(rates))
    ]
    # The check means something only if the rates train different networks.
    finite = [
        all(bool(np.isfinite(a).all()) for a in jax.tree_util.tree_leaves(p))
        for p in finals["new_optimiser"]
    ]
    spread = {
        str(lr): _max_rel_diff(finals["new_optimiser"][i], finals["new_optimiser"][0])
        for i, lr in enumerate(args.activity_lrs)
    }
    agreement = {
        name: {
            str(lr): _max_rel_diff(finals[name][i], finals["new_optimiser"][i])
            for i, lr in enumerate(args.activity_lrs)
        }
        for name in ("activity_lr", "vmap")
    }
    agree = all(d <= SWEEP_RTOL for row in agreement.values() for d in row.values())
    base = timing["new_optimiser"]["seconds"]
    speed_up = {name: base / t["seconds"] for name, t in timing.items()}
    print(f"speed-up over a new optimiser per rate: {speed_up}")
    print(f"max relative difference of the final parameters: {agreement}")
    if not agree:
        print(f"WARNING: the three ways disagree by more than {SWEEP_RTOL:g}")
    print(f"finite: {finite}; difference from the first rate's network: {spread}")
    return {
        "width": args.sweep_width,
        "activity_lrs": list(args.activity_lrs),
        "optax_activity_lrs": rates,
        "n_steps": len(batches),
        "timing": timing,
        "speed_up": speed_up,
        "max_rel_diff_vs_new_optimiser": agreement,
        "agree_within": SWEEP_RTOL,
        "agree": agree,
        "finite": dict(zip(map(str, args.activity_lrs), finite)),
        "max_rel_diff_vs_first_rate": spread,
    }


# ---------------------------------------------------------------------------- outputs


def best_lrs(results: dict, args) -> dict:
    best = {}
    for width in args.widths:
        finals = [results[f"{width}/{lr}"]["test_acc"][-1] for lr in args.activity_lrs]
        best[width] = args.activity_lrs[int(np.argmax(finals))]
    return best


def save_plot(results, best, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    colours = plt.cm.viridis(np.linspace(0, 1, len(args.widths)))
    for width, colour in zip(args.widths, colours):
        accs = [results[f"{width}/{lr}"]["test_acc"][-1] for lr in args.activity_lrs]
        axes[0].plot(
            args.activity_lrs, accs, marker="o", color=colour, label=f"N={width}"
        )
        ratios = results[f"{width}/{best[width]}"]["variance_ratios"][-1]
        axes[2].plot(
            range(1, args.depth + 1),
            ratios,
            marker="o",
            color=colour,
            label=f"N={width}",
        )
    lr_colours = plt.cm.plasma(np.linspace(0, 0.9, len(args.activity_lrs)))
    width = args.ratio_width if args.ratio_width in args.widths else args.widths[0]
    for lr, colour in zip(args.activity_lrs, lr_colours):
        ratios = np.asarray(results[f"{width}/{lr}"]["variance_ratios"])
        epochs = np.arange(1, len(ratios) + 1)
        axes[1].plot(epochs, ratios[:, 0], marker="o", color=colour, label=f"lr={lr}")
    axes[0].set(
        xscale="log",
        xlabel=f"activity learning rate ({args.lr_convention})",
        ylabel="test accuracy (%)",
        title=f"T={args.n_inference_steps}, {args.epochs} epochs",
    )
    axes[1].set(
        yscale="log",
        xlabel="epoch",
        ylabel="Var(∇W_1) / Var(∇W_L)",
        title=f"first / output layer, N={width}",
    )
    axes[2].set(
        yscale="log",
        xlabel="layer",
        ylabel="Var(∇W_l) / Var(∇W_L), last epoch",
        title="at each width's best activity lr",
    )
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("PCN on two moons: 4-layer leaky-ReLU, cross-entropy output")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_study(data, args) -> dict:
    """Layer gradient variances at `--ratio-study-widths` (the tutorial's T and rate).

    Per width: the per-epoch variance of each layer's weight gradient (mean over the
    epoch's steps), its ratio to the output layer's, and the layer-to-layer ratios
    Var(∇W_{l+1}) / Var(∇W_l).
    """
    study = {}
    for width in progress(args.ratio_study_widths, desc="variance study", leave=False):
        lr, steps = args.ratio_study_lr, args.ratio_study_steps
        out = run(width, lr, data, args, n_steps=steps)
        var = np.asarray(out["variances"])
        out["layer_to_layer"] = (var[:, 1:] / var[:, :-1]).tolist()
        study[str(width)] = out
    if study:
        print(
            f"\nvariance study: rate {lr}, T = {steps}; last epoch, "
            "Var(∇W_l+1)/Var(∇W_l)"
        )
        for width, out in study.items():
            ratios = " ".join(f"{r:9.3g}" for r in out["layer_to_layer"][-1])
            print(f"{width:>6} {ratios}   test acc {out['test_acc'][-1]:.1f}%")
    return study


def save_ratio_plot(study: dict, args, path: Path) -> None:
    """Layer-to-layer variance ratios per width (last epoch) and over the epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.cm.viridis(np.linspace(0, 1, len(study)))
    for (width, out), colour in zip(study.items(), colours):
        ratios = np.asarray(out["layer_to_layer"])
        pairs = [f"{i + 2}/{i + 1}" for i in range(ratios.shape[1])]
        axes[0].plot(pairs, ratios[-1], "o-", color=colour, label=f"N={width}")
        epochs = np.arange(1, len(ratios) + 1)
        axes[1].plot(epochs, ratios[:, 0], "o-", color=colour, label=f"N={width}")
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].set(
        yscale="log",
        xlabel="layers l+1 / l",
        ylabel="Var(∇W_l+1) / Var(∇W_l), last epoch",
    )
    axes[1].set(yscale="log", xlabel="epoch", ylabel="Var(∇W_2) / Var(∇W_1)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"layer gradient variances: rate {args.ratio_study_lr} "
        f"({args.lr_convention}), T={args.ratio_study_steps}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = load(args)
    if args.sweep_timing:
        out = sweep_timing(data, args)
        config = {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        }
        out = {
            "config": config,
            "jax": jax_info(),
            **out,
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "sweep_timing.json").write_text(json.dumps(out, indent=2))
        print(f"Wrote {args.out_dir / 'sweep_timing.json'}")
        return out
    results, seconds = {}, {}
    grid = list(itertools.product(args.widths, args.activity_lrs))
    for width, lr in progress(grid, desc="width × activity lr", dynamic_ncols=True):
        start = time.perf_counter()
        results[f"{width}/{lr}"] = run(width, lr, data, args)
        seconds[f"{width}/{lr}"] = time.perf_counter() - start
    best = best_lrs(results, args)
    study = ratio_study(data, args)
    print(
        f"\n{'width':>6}" + "".join(f"{lr:>9}" for lr in args.activity_lrs) + "   best"
    )
    for width in args.widths:
        accs = [results[f"{width}/{lr}"]["test_acc"][-1] for lr in args.activity_lrs]
        print(f"{width:>6}" + "".join(f"{a:9.1f}" for a in accs) + f"   {best[width]}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_plot(results, best, args, args.out_dir / "gradient_analysis.png")
    if study:
        save_ratio_plot(study, args, args.out_dir / "variance_ratios.png")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    out = {
        "config": config,
        "jax": jax_info(),
        "best_activity_lr": {str(k): v for k, v in best.items()},
        "ratio_study": study,
        "runs": results,
        "seconds": seconds,
    }
    (args.out_dir / "results.json").write_text(json.dumps(out, indent=2))
    print(f"Wrote {args.out_dir / 'results.json'} and gradient_analysis.png")
    return out


if __name__ == "__main__":
    main()
