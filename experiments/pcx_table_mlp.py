"""The MLP rows of the PC benchmark of Pinchetti et al. (ICLR 2025) on (Fashion-)MNIST.

The setting of the benchmark's MLP experiments: a 784-128-128-128-10 network (4 layers
of width 128, with biases, `jpc.make_mlp`), inputs scaled to [-1, 1], batch 128, 25
epochs; the weights trained with AdamW under the benchmark's warm-up + cosine schedule
(lr → 1.1 lr over the first 10 % of the steps, then down to 0.1 lr), the activities
with SGD with momentum for T ≤ 8 steps fused into the compiled step. Methods:

- `PC-SE`, `PC-CE`: [`jpc.make_pc_step`][] with `loss_id="mse"` / `"ce"`;
- `iPC`: [`jpc.make_ipc_step`][] (a weight step at every inference step);
- `PC-PN`, `PC-NN`, `PC-CN`: positive, negative and centred nudging,
  `make_pc_step(nudging=..., beta=...)`;
- `BP-SE`, `BP-CE`: [`jpc.make_bp_step`][] on the same network.

Each method starts from the benchmark's tuned hyperparameters (activation, T, activity
lr and momentum, weight lr and decay: `DEFAULTS`); a 3 × 3 grid over the weight and
activity learning rates (× 0.5, 1, 2; `--search`, `--search-epochs` epochs from seed 0)
picks, per dataset and method, the setting with the best final accuracy on a
validation split held out from the training set (never the test set). Every method is
then trained from `--seeds` seeds on the rest of the training set and scored on the
test set after every epoch: mean ± std over seeds of the last epoch's accuracy and of
the best epoch's (the benchmark keeps the best test accuracy over the epochs).

The work is cut into cells (one search trial, or one seed of one method on one
dataset), each saved to its own JSON file under `--cells-dir` as soon as it ends;
rerunning the same command skips the finished cells (see `experiments/_runner.py`):

    python -m experiments.pcx_table_mlp                  # full: 25 epochs, 5 seeds
    python -m experiments.pcx_table_mlp --jobs 2         # two cells at a time
    python -m experiments.pcx_table_mlp summary          # tables, plot from the cells
    python -m experiments.pcx_table_mlp --quick          # a minute-scale smoke run

Writes `summary.md`, `summary.json` and `pcx_table_mlp.png` to `--out-dir`.
"""

import argparse
import functools
import itertools
import os
import time
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import jpc
from experiments import _runner
from experiments._progress import progress
from jpc import datasets
from jpc._compat import jax_versions


N_CLASSES = 10
WIDTH, DEPTH = 128, 4
METHODS = ("PC-SE", "PC-CE", "iPC", "PC-PN", "PC-NN", "PC-CN", "BP-SE", "BP-CE")
DATASETS = ("mnist", "fashion_mnist")
# The order in which the rows run (see `plan`).
PRIORITY = ("PC-SE", "iPC", "BP-SE", "BP-CE", "PC-CE", "PC-CN", "PC-PN", "PC-NN")
# Test accuracies (%) reported by Pinchetti et al. (ICLR 2025) for this MLP, rounded
# (the rows we have a number for).
PUBLISHED = {
    "mnist": {"PC-SE": 98.3, "iPC": 98.45},
    "fashion_mnist": {"PC-SE": 89.6, "iPC": 89.9},
}
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "pcx_table_mlp"
DEFAULT_CELLS_DIR = Path(__file__).parent / "cells" / "pcx_table_mlp"
QUICK_CELLS_DIR = DEFAULT_OUT_DIR.with_name("pcx_table_mlp_quick") / "cells"


class MethodConfig(NamedTuple):
    """One method's hyperparameters.

    `activity_lr` is the step size per example: jpc's energy is a batch mean, so the
    activity optimiser's optax learning rate is `activity_lr * batch_size`.
    """

    kind: str  # "pc", "ipc", "pn" / "nn" / "cn" (nudging) or "bp"
    loss_id: str
    act_fn: str
    n_steps: int  # inference steps T (unused by backprop)
    activity_lr: float
    momentum: float
    param_lr: float
    weight_decay: float


# The benchmark's tuned MLP settings (its published MNIST / Fashion-MNIST configs,
# rounded). Its activity learning rates act per example: scaled by the batch size for
# jpc's batch-mean energy they train far better than unscaled (measured: 1 epoch on
# 20k MNIST examples, PC-SE 55 % unscaled vs 85 % scaled on the validation split).
DEFAULTS = {
    "PC-SE": MethodConfig("pc", "mse", "gelu", 5, 0.026, 0.1, 3e-4, 2e-3),
    "PC-CE": MethodConfig("pc", "ce", "gelu", 5, 0.018, 0.35, 3e-4, 3e-3),
    "iPC": MethodConfig("ipc", "mse", "leaky_relu", 8, 0.8, 0.3, 2.6e-4, 2e-2),
    # The three nudgings start from the benchmark's negative-nudging configuration.
    "PC-PN": MethodConfig("pn", "mse", "leaky_relu", 6, 0.028, 0.15, 2.8e-4, 2.5e-4),
    "PC-NN": MethodConfig("nn", "mse", "leaky_relu", 6, 0.028, 0.15, 2.8e-4, 2.5e-4),
    "PC-CN": MethodConfig("cn", "mse", "leaky_relu", 6, 0.028, 0.15, 2.8e-4, 2.5e-4),
    "BP-SE": MethodConfig("bp", "mse", "relu", 0, 0.0, 0.0, 2.75e-4, 1.7e-4),
    "BP-CE": MethodConfig("bp", "ce", "relu", 0, 0.0, 0.0, 2.75e-4, 1.7e-4),
}
# The search multiplies the defaults' learning rates by these factors.
PARAM_LR_FACTORS = (0.5, 1.0, 2.0)
ACTIVITY_LR_FACTORS = (0.5, 1.0, 2.0)

NUDGING = {"pn": "positive", "nn": "negative", "cn": "centred"}

# Optimisers are built once: a new optax object is a new compiled program. The weight
# optimiser's learning rate and decay live in its state, so they change for free.
PARAM_OPTIM = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)


@functools.cache
def activity_optim(lr: float, momentum: float) -> optax.GradientTransformation:
    """The activity optimiser for one setting, built once per setting."""
    return optax.sgd(lr, momentum=momentum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pcx_table_mlp",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _runner.add_runner_args(parser, DEFAULT_CELLS_DIR)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=DATASETS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.5, help="nudging β")
    parser.add_argument(
        "--search",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="grid-search the learning rates on the validation split",
    )
    parser.add_argument("--search-epochs", type=int, default=3)
    parser.add_argument("--val-size", type=int, default=6000, help="held-out examples")
    parser.add_argument("--n-train", type=int, default=None, help="training subset")
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument(
        "--quick", action="store_true", help="MNIST, 10k examples, 1 epoch, 1 seed"
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def check_args(args, parser) -> None:
    if args.quick:
        args.datasets, args.epochs, args.seeds = ["mnist"], 1, 1
        args.search, args.n_train, args.val_size = False, 10000, 2000
        if args.cells_dir == DEFAULT_CELLS_DIR:
            args.cells_dir = QUICK_CELLS_DIR
        if args.out_dir == DEFAULT_OUT_DIR:
            args.out_dir = QUICK_CELLS_DIR.parent
    for name in ("epochs", "seeds", "batch_size", "search_epochs", "val_size"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.data_dir is not None:  # read by every cell, also in worker processes
        os.environ["JPC_DATA_DIR"] = str(args.data_dir)


# ---------------------------------------------------------------------------- data


@functools.cache
def load_data(name: str, val_size: int, n_train: int | None) -> dict:
    """`{"train", "val", "test"}` splits, inputs in [-1, 1], one-hot targets.

    The validation split is a fixed random subset of the training set (seed 0); the
    training split is the rest (optionally cut to `--n-train`). The evaluation
    splits are moved to the device once.
    """
    x, y = datasets.load_idx_dataset(name, "train")
    x_test, y_test = datasets.load_idx_dataset(name, "test")
    order = np.random.default_rng(0).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    train = train[:n_train] if n_train else train

    def prepare(images, labels, device):
        pair = (2.0 * images - 1.0, datasets.one_hot(labels, N_CLASSES))
        return tuple(jnp.asarray(a) for a in pair) if device else pair

    return {
        "train": prepare(x[train], y[train], device=False),
        "val": prepare(x[val], y[val], device=True),
        "test": prepare(x_test, y_test, device=True),
    }


# ------------------------------------------------------------------------ training


def make_step(cfg: MethodConfig, batch_size: int, beta: float):
    """`step(model, opt_state, x, y) -> (model, opt_state, loss)` for one method."""
    if cfg.kind == "bp":

        def bp_step(model, opt_state, x, y):
            result = jpc.make_bp_step(
                model, PARAM_OPTIM, opt_state, y, input=x, loss_id=cfg.loss_id
            )
            return result["model"], result["opt_state"], result["loss"]

        return bp_step

    fn = jpc.make_ipc_step if cfg.kind == "ipc" else jpc.make_pc_step
    kwargs = dict(
        loss_id=cfg.loss_id,
        activity_optim=activity_optim(cfg.activity_lr * batch_size, cfg.momentum),
        n_inference_steps=cfg.n_steps,
    )
    if cfg.kind in NUDGING:
        kwargs.update(nudging=NUDGING[cfg.kind], beta=beta)

    def pc_step(model, opt_state, x, y):
        result = fn(model, PARAM_OPTIM, opt_state, y, input=x, **kwargs)
        return result["model"], result["opt_state"], result["loss"]

    return pc_step


def lr_schedule(lr: float, total_steps: int) -> optax.Schedule:
    """The benchmark's schedule: warm-up to 1.1 lr (10 % of steps), cosine to 0.1 lr."""
    return optax.warmup_cosine_decay_schedule(
        init_value=lr,
        peak_value=1.1 * lr,
        warmup_steps=max(1, int(0.1 * total_steps)),
        decay_steps=total_steps,
        end_value=0.1 * lr,
    )


def init_opt_state(model, cfg: MethodConfig):
    opt_state = PARAM_OPTIM.init((eqx.filter(model, eqx.is_array), None))
    opt_state.hyperparams["weight_decay"] = jnp.asarray(cfg.weight_decay, jnp.float32)
    return opt_state


def evaluate(model, split, loss_id: str) -> float:
    """Feedforward accuracy (percent) on a whole split."""
    x, y = split
    return float(jpc.test_discriminative_pc(model, y, x, loss=loss_id)[1])


def train_run(cfg, data, epochs, seed, batch_size, beta, eval_splits, desc=""):
    """Train one method from one seed; per-epoch accuracies and timings.

    A run whose energy or loss stops being finite is stopped and marked `diverged`.
    """
    x_train, y_train = data["train"]
    model = jpc.make_mlp(
        jr.PRNGKey(seed), x_train.shape[1], WIDTH, DEPTH, N_CLASSES, cfg.act_fn, True
    )
    opt_state = init_opt_state(model, cfg)
    step = make_step(cfg, batch_size, beta)
    per_epoch = len(x_train) // batch_size
    schedule = lr_schedule(cfg.param_lr, epochs * per_epoch)
    batches = datasets.batches(x_train, y_train, batch_size, seed)
    log = {f"{s}_acc": [] for s in eval_splits}
    log.update(train_loss=[], epoch_seconds=[], epoch_cpu_seconds=[], diverged=False)
    for epoch in progress(range(epochs), desc=desc, dynamic_ncols=True, leave=False):
        start, cpu_start, losses = time.perf_counter(), time.process_time(), []
        for it in range(per_epoch):
            lr = schedule(epoch * per_epoch + it)
            opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
            x, y = next(batches)
            try:
                model, opt_state, loss = step(model, opt_state, x, y)
            except Exception as e:  # eqx.error_if on a non-finite energy
                if "not finite" not in str(e):
                    raise
                loss = jnp.nan
            losses.append(loss)
        mean_loss = float(jnp.mean(jnp.stack(losses)))  # waits for the epoch
        log["epoch_seconds"].append(time.perf_counter() - start)
        log["epoch_cpu_seconds"].append(time.process_time() - cpu_start)
        log["train_loss"].append(mean_loss)
        if not np.isfinite(mean_loss):
            log["diverged"] = True
            break
        for s in eval_splits:
            log[f"{s}_acc"].append(evaluate(model, data[s], cfg.loss_id))
    return log


# ------------------------------------------------------------------------- cells


def search_grid(cfg: MethodConfig) -> list[tuple[str, MethodConfig]]:
    """`(name, setting)` of the learning-rate settings tried for one method."""
    activity = (1.0,) if cfg.kind == "bp" else ACTIVITY_LR_FACTORS
    return [
        (
            f"p{p:g}_a{a:g}",
            cfg._replace(param_lr=cfg.param_lr * p, activity_lr=cfg.activity_lr * a),
        )
        for p, a in itertools.product(PARAM_LR_FACTORS, activity)
    ]


def _common(args, dataset: str, method: str) -> dict:
    return {
        "dataset": dataset,
        "method": method,
        "batch_size": args.batch_size,
        "beta": args.beta,
        "val_size": args.val_size,
        "n_train": args.n_train,
    }


def search_cells(args, dataset: str, method: str) -> list[_runner.Cell]:
    return [
        _runner.Cell(
            f"{dataset}/{method}/search/{name}",
            {
                **_common(args, dataset, method),
                "config": cfg._asdict(),
                "epochs": args.search_epochs,
                "seed": 0,
                "eval": ["val"],
            },
        )
        for name, cfg in search_grid(DEFAULTS[method])
    ]


def chosen_config(cells: list[_runner.Cell], done: dict) -> MethodConfig | None:
    """The best search trial by final validation accuracy, or None if unfinished."""
    if any(c.key not in done for c in cells):
        return None
    best = max(cells, key=lambda c: search_score(done[c.key]))
    return MethodConfig(**best.params["config"])


def search_score(result: dict) -> float:
    return result["val_acc"][-1] if not result["diverged"] else float("-inf")


def plan(args, done: dict) -> list[_runner.Cell]:
    """Row by row: a method's search, then its seeds; MNIST first.

    Rows finish one after the other, so a partial run gives complete rows. Methods
    run in `PRIORITY` order (those with published numbers and the cheap baselines
    first); the table keeps `METHODS` order.
    """
    cells = []
    tag = "searched" if args.search else "default"
    methods = sorted(args.methods, key=PRIORITY.index)
    for dataset in args.datasets:
        for method in methods:
            cfg = DEFAULTS[method]
            if args.search:
                trials = search_cells(args, dataset, method)
                cells += trials
                cfg = chosen_config(trials, done)
                if cfg is None:
                    continue
            for seed in range(args.seeds):
                params = {
                    **_common(args, dataset, method),
                    "config": cfg._asdict(),
                    "epochs": args.epochs,
                    "seed": seed,
                    "eval": ["val", "test"],
                }
                key = f"{dataset}/{method}/{tag}/seed{seed}"
                cells.append(_runner.Cell(key, params))
    return cells


def run_cell(params: dict) -> dict:
    """Trains one setting from one seed; per-epoch accuracies, losses and times."""
    data = load_data(params["dataset"], params["val_size"], params["n_train"])
    desc = f"{params['dataset']} {params['method']} seed {params['seed']}"
    return train_run(
        MethodConfig(**params["config"]),
        data,
        params["epochs"],
        params["seed"],
        params["batch_size"],
        params["beta"],
        tuple(params["eval"]),
        desc,
    )


# ------------------------------------------------------------------------- outputs


def _median_cpu(runs: list) -> float | None:
    """Median CPU seconds per epoch (first epoch, with compilation, left out)."""
    cpu = [r.get("epoch_cpu_seconds") for r in runs]
    if any(c is None for c in cpu):
        return None
    return float(np.median([t for c in cpu for t in c[1:] or c]))


def _mean_std(values: list) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def collect(args, done: dict) -> dict:
    """`{dataset: {method: row}}` from the finished cells of the planned runs."""
    planned = {c.key: c for c in plan(args, {k: r["result"] for k, r in done.items()})}
    table = {}
    for dataset in args.datasets:
        table[dataset] = {}
        for method in args.methods:
            prefix = f"{dataset}/{method}/"
            keys = [k for k in planned if k.startswith(prefix) and k in done]
            trials = [k for k in keys if "/search/" in k]
            seeds = [done[k] for k in keys if k not in trials]
            row = {
                "n_seeds": len(seeds),
                "n_search": len(trials),
                "search": [
                    {
                        "name": k.rsplit("/", 1)[1],
                        "config": done[k]["params"]["config"],
                        "val_acc": search_score(done[k]["result"]),
                    }
                    for k in trials
                ],
            }
            if seeds:
                runs = [s["result"] for s in seeds]
                last = [r["test_acc"][-1] if r["test_acc"] else np.nan for r in runs]
                best = [max(r["test_acc"]) if r["test_acc"] else np.nan for r in runs]
                complete = [len(r["test_acc"]) == args.epochs for r in runs]
                seconds = [
                    t
                    for r in runs
                    for t in r["epoch_seconds"][1:] or r["epoch_seconds"]
                ]
                row.update(
                    config=seeds[0]["params"]["config"],
                    seeds=[s["params"]["seed"] for s in seeds],
                    last=last,
                    best=best,
                    last_mean_std=_mean_std(last),
                    best_mean_std=_mean_std(best),
                    diverged=[r["diverged"] or not c for r, c in zip(runs, complete)],
                    epoch_seconds_median=float(np.median(seconds or [np.nan])),
                    epoch_cpu_seconds_median=_median_cpu(runs),
                    mean_curve=np.mean([r["test_acc"] for r in runs], 0).tolist()
                    if all(complete)
                    else None,
                )
            table[dataset][method] = row
    return table


def format_table(args, table: dict) -> str:
    lines = []
    for dataset, rows in table.items():
        lines += [
            f"\n{dataset}: test accuracy (%), mean ± std over the finished seeds "
            f"(of {args.seeds}), {args.epochs} epochs",
            "",
            "| method | seeds | last epoch | best epoch | published | s / epoch (CPU) "
            "| weight lr | activity lr |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, row in rows.items():
            published = PUBLISHED.get(dataset, {}).get(method)
            pub = f"{published}" if published else "–"
            if not row["n_seeds"]:
                n_grid = len(search_grid(DEFAULTS[method]))
                state = f"search {row['n_search']}/{n_grid}" if args.search else "–"
                lines.append(f"| {method} | 0 | {state} | | {pub} | | | |")
                continue
            (lm, ls), (bm, bs) = row["last_mean_std"], row["best_mean_std"]
            cfg = row["config"]
            act = f"{cfg['activity_lr']:.3g}" if cfg["kind"] != "bp" else "–"
            flag = " (diverged)" if any(row["diverged"]) else ""
            cpu = row["epoch_cpu_seconds_median"]
            cpu = "" if cpu is None else f" ({cpu:.1f})"
            lines.append(
                f"| {method} | {row['n_seeds']} | {lm:.2f} ± {ls:.2f}{flag} "
                f"| {bm:.2f} ± {bs:.2f} | {pub} "
                f"| {row['epoch_seconds_median']:.1f}{cpu} "
                f"| {cfg['param_lr']:.3g} | {act} |"
            )
    return "\n".join(lines + format_search(args, table)) + "\n"


def format_search(args, table: dict) -> list[str]:
    """Validation accuracy of every finished search trial, the chosen one in bold."""
    if not args.search:
        return []
    names = [name for name, _ in search_grid(DEFAULTS["PC-SE"])]
    lines = [
        f"\nSearch: validation accuracy (%) after {args.search_epochs} epochs from "
        "seed 0 (`pW_aA`: W × the default weight lr, A × the default activity lr; "
        "backprop has no activity lr; in bold the trial chosen)",
        "",
        "| dataset | method | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for dataset, rows in table.items():
        for method, row in rows.items():
            trials = {t["name"]: t["val_acc"] for t in row["search"]}
            if not trials:
                continue
            # The seeds were trained with the chosen trial's setting.
            chosen = [
                t["name"] for t in row["search"] if t["config"] == row.get("config")
            ]
            best = chosen[0] if chosen else None
            cells = [
                "–"
                if name not in trials
                else f"**{trials[name]:.2f}**"
                if name == best
                else f"{trials[name]:.2f}"
                for name in names
            ]
            lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + " |")
    return lines


def save_plot(table: dict, path: Path) -> None:
    """Mean ± std test accuracy per method, one panel per dataset; published marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        methods = [m for m, r in table[name].items() if r["n_seeds"]]
        if not methods:
            ax.set_title(f"{name}: no finished seed yet")
            continue
        x = np.arange(len(methods))
        for shift, kind, colour in (
            (-0.2, "last", "tab:blue"),
            (0.2, "best", "tab:cyan"),
        ):
            means = [table[name][m][f"{kind}_mean_std"][0] for m in methods]
            stds = [table[name][m][f"{kind}_mean_std"][1] for m in methods]
            ax.bar(
                x + shift,
                means,
                0.4,
                yerr=stds,
                capsize=3,
                color=colour,
                label=f"{kind} epoch",
            )
        for i, m in enumerate(methods):
            if m in PUBLISHED.get(name, {}):
                ax.plot(i, PUBLISHED[name][m], "r_", ms=25, mew=2, label="published")
        low = min(table[name][m]["last_mean_std"][0] for m in methods)
        high = max(
            [sum(table[name][m]["best_mean_std"]) for m in methods]
            + list(PUBLISHED.get(name, {}).values())
        )
        ax.set_xticks(x, [f"{m}\n({table[name][m]['n_seeds']} s.)" for m in methods])
        top = min(100.0, high + 0.4 * (high - low) + 0.5)  # room for the legend
        ax.set(ylim=(max(0.0, low - 3), top), ylabel="test accuracy (%)", title=name)
        ax.grid(axis="y", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right", ncol=3)
    fig.suptitle("PC benchmark MLP (4×128): test accuracy, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(args, done: dict) -> None:
    table = collect(args, done)
    data = {"published": PUBLISHED, "table": table}
    _runner.write_summary(args, format_table(args, table), data)
    save_plot(table, args.out_dir / "pcx_table_mlp.png")
    print(f"Wrote summary.md, summary.json and pcx_table_mlp.png to {args.out_dir}")


def main(argv=None) -> dict:
    print(f"{jax_versions()}, backend {jax.default_backend()}")
    return _runner.main(
        "experiments.pcx_table_mlp", build_parser(), argv, check_args=check_args
    )


if __name__ == "__main__":
    main()
