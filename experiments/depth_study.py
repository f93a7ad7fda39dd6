"""Deep residual PC networks layer by layer: which layers learn, does accuracy need it?

Accuracy alone cannot tell a trained deep stack from a trained top: a residual network
whose lower blocks stay at their initialisation is close to a random projection followed
by a few trained layers, which already classifies MNIST well. This study therefore
records, besides accuracy, the per-layer evidence of [`jpc.compute_layer_learning`][]:
for every weight layer, the norm of its PC gradient relative to backprop's on the same
batch (divided by the output precision λ, so that 1 means "as large as backprop's") and
its cosine to backprop's.

Networks: residual ReLU MLPs of width 128 (`jpc.make_mlp` with `use_bias=False` and the
identity skips of `jpc.make_skip_model`), batch 64, MSE on one-hot targets, Adam on the
weights, T = depth inference steps per batch. Methods:

- `PC`: standard parameterisation (Equinox's initialisation), activity step
  `jpc.per_example(optax.sgd(0.1))`;
- `muPC`: μPC (Innocenti et al., 2025) as in its notebook: `param_type="mupc"` and
  `optax.sgd(0.5)` on the batch-mean energy (a step of 0.5/64 per example);
- `muPC-prec`: μPC with the layer precisions λ = N·L on the output and κ = L on every
  hidden term, activity step `jpc.per_example(optax.sgd(0.25 / L))` (η·κ = 1/4);
- `ePC`: error-based PC (Goemaere et al., 2025) on the μPC network, errors from zero,
  error step `jpc.per_example(optax.sgd(0.1))`;
- `BP`: backprop on the μPC network.

The Adam learning rate of every method is chosen on a validation split (the last 10,000
training images) from `--lr-grid`, by a `--select-iters` run at each depth up to
`--max-select-depth`; deeper networks reuse the choice of that depth. The chosen rate
then trains for `--iters` iterations (one value per depth: fewer for the deepest
networks, whose steps cost most), with validation accuracy every `--eval-every`
iterations, test accuracy at the end, and the per-layer evidence on a fixed validation
batch at the iterations `--record-at`. Controls:

- `frozen`: the same training with every layer but the top `--n-trainable` frozen at
  its initialisation, for `BP` at every depth and for `muPC` up to
  `--max-select-depth`: if the accuracy barely drops, the accuracy does not show
  whether the lower layers learned.
- `push`: at the deepest depths, the per-layer evidence at initialisation (no training)
  for a grid of inference settings (steps T, per-example step, precisions, ePC), to find
  one under which every layer's update is within 10× of backprop's norm at a cosine
  above 0.5; longer inference (`--push-long-t`) for the PC settings that reached
  deepest, as long as T × L stays within `--push-budget` layer-steps per batch, or
  beyond it where the same setting got every layer learning at a shallower depth.

Every run is a cell of the resumable runner (`experiments/_runner.py`):

    python -m experiments.depth_study                    # everything
    python -m experiments.depth_study summary            # tables and figures
    python -m experiments.depth_study --quick            # depths 4 and 8, a few steps

Writes `summary.md`, `summary.json`, `accuracy.png` and `layers_<dataset>_depth<L>.png`
(heat-maps: layer × iteration, one column per method) to `--out-dir`.
"""

import argparse
import functools
import os
import warnings
from pathlib import Path

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
N_VALIDATION = 10_000
METHODS = ("PC", "muPC", "muPC-prec", "ePC", "BP")
PC_METHODS = METHODS[:4]
FROZEN_METHODS = ("BP", "muPC")  # μPC's frozen control only up to the selection depth
DATASETS = ("mnist", "fashion_mnist")
LEARNS_RATIO, LEARNS_COSINE = 0.1, 0.5  # "within 10× of backprop, cosine above 0.5"
DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "depth_study"
DEFAULT_CELLS_DIR = Path(__file__).parent / "cells" / "depth_study"
QUICK_DIR = DEFAULT_OUT_DIR.with_name("depth_study_quick")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.depth_study",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _runner.add_runner_args(parser, DEFAULT_CELLS_DIR)
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument(
        "--iters",
        type=int,
        nargs="+",
        default=[400, 400, 400, 200, 100],
        help="training iterations, one per depth",
    )
    parser.add_argument(
        "--fmnist-depths", type=int, nargs="*", default=[8, 16, 32], help="FMNIST"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--select-iters", type=int, default=100)
    parser.add_argument("--max-select-depth", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--record-at", type=int, nargs="+", default=[0, 10, 25, 50, 100, 200, 400]
    )
    parser.add_argument("--n-trainable", type=int, default=4, help="frozen control")
    parser.add_argument("--push-depths", type=int, nargs="*", default=[64, 128])
    parser.add_argument(
        "--push-t", type=int, nargs="+", default=[1, 4], help="T in units of L"
    )
    parser.add_argument(
        "--push-long-t",
        type=int,
        nargs="*",
        default=[16, 64],
        help="longer inference (T in units of L) for the PC settings, within "
        "--push-budget",
    )
    parser.add_argument(
        "--push-budget",
        type=int,
        default=64**3,
        help="largest T × L (layer-steps of inference per batch) of a push setting",
    )
    parser.add_argument("--seed", type=int, default=0, help="init and batch order")
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files")
    parser.add_argument("--quick", action="store_true", help="depths 4 and 8, briefly")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser


def check_args(args, parser) -> None:
    if args.quick:
        args.depths, args.iters, args.fmnist_depths = [4, 8], [20, 20], [4]
        args.select_iters, args.eval_every, args.record_at = 10, 10, [0, 20]
        args.lr_grid, args.push_depths, args.push_t = [1e-2, 1e-1], [8], [1, 4]
        args.push_long_t = [16]
        if args.cells_dir == DEFAULT_CELLS_DIR:
            args.cells_dir = QUICK_DIR / "cells"
        if args.out_dir == DEFAULT_OUT_DIR:
            args.out_dir = QUICK_DIR
    if len(args.iters) != len(args.depths):
        parser.error(
            f"--iters needs one value per depth ({len(args.depths)}), got "
            f"{len(args.iters)}"
        )
    depths = args.depths + args.fmnist_depths + args.push_depths
    if min(depths) < 3:
        parser.error("every depth must be at least 3 (a block needs a hidden layer)")
    if not 1 <= args.n_trainable:
        parser.error("--n-trainable must be positive")
    for name in ("width", "batch_size", "eval_every", "select_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.iters) < 1 or min(args.push_t) < 1 or min(args.lr_grid) <= 0:
        parser.error("--iters, --push-t and --lr-grid must be positive")
    if args.data_dir is not None:  # read by every cell, also in worker processes
        os.environ["JPC_DATA_DIR"] = str(args.data_dir)


@functools.cache
def load_data(name: str) -> dict:
    """Train / validation / test splits, standardised with the train split's stats."""
    load = datasets.load_mnist if name == "mnist" else datasets.load_fashion_mnist
    x, y = load("train")
    x_test, y_test = load("test")
    mean, std = x[:-N_VALIDATION].mean(), x[:-N_VALIDATION].std()

    def prepare(x, y):
        return np.asarray((x - mean) / std, np.float32), datasets.one_hot(y, N_CLASSES)

    return {
        "train": prepare(x[:-N_VALIDATION], y[:-N_VALIDATION]),
        "val": tuple(map(jnp.asarray, prepare(x[-N_VALIDATION:], y[-N_VALIDATION:]))),
        "test": tuple(map(jnp.asarray, prepare(x_test, y_test))),
    }


# ------------------------------------------------------------------------- methods


def frozen_optim(optim, model, n_trainable: int):
    """`optim` on the top `n_trainable` weight layers; the rest stay at their init."""
    n_layers = len(model)

    def labels(params):
        layers, skips = params
        first_trained = n_layers - n_trainable
        tags = [
            jax.tree.map(
                lambda _, t=("train" if i >= first_trained else "freeze"): t, layer
            )
            for i, layer in enumerate(layers)
        ]
        return type(layers)(tags), jax.tree.map(lambda _: "freeze", skips)

    return optax.multi_transform(
        {"train": optim, "freeze": optax.set_to_zero()}, labels
    )


class Method:
    """One method on one residual network: its model, optimisers, step and evidence."""

    def __init__(self, params: dict):
        name, depth, width = params["method"], params["depth"], params["width"]
        self.name, self.depth = name, depth
        self.param_type = "sp" if name == "PC" else "mupc"
        self.model = jpc.make_mlp(
            jr.PRNGKey(params["seed"]),
            28 * 28,
            width,
            depth,
            N_CLASSES,
            "relu",
            use_bias=False,
            param_type=self.param_type,
        )
        self.skip_model = jpc.make_skip_model(depth)
        self.layer_sizes = [28 * 28] + [width] * (depth - 1) + [N_CLASSES]
        self.n_steps = params.get("n_steps", depth)
        self.options = {}  # energy options shared by the step and the evidence
        if name == "muPC-prec":
            self.options = dict(
                output_energy_scaling=float(width * depth),
                hidden_energy_scaling=float(depth),
            )
        step = params.get("activity_step")
        if step is None:
            step = {"PC": 0.1, "muPC": 0.5, "muPC-prec": 0.25 / depth, "ePC": 0.1}.get(
                name
            )
        if name == "muPC" and not params.get("per_example", False):
            self.activity_optim = optax.sgd(step)  # the notebook's batch-mean step
        elif name != "BP":
            self.activity_optim = jpc.per_example(optax.sgd(step))
        optim = optax.adam(params.get("param_lr", 1e-3))  # push: never stepped
        if params.get("n_trainable"):
            optim = frozen_optim(optim, self.model, params["n_trainable"])
        self.optim = optim
        self.opt_state = optim.init(
            (eqx.filter(self.model, eqx.is_array), self.skip_model)
        )
        self.scale = self.options.get("output_energy_scaling", 1.0)

    @property
    def params(self):
        return self.model, self.skip_model

    def step(self, x, y) -> float:
        if self.name == "ePC":
            (self.model, _), self.opt_state, loss = epc_step(
                self.params,
                self.opt_state,
                x,
                y,
                optim=self.optim,
                error_optim=self.activity_optim,
                layer_sizes=tuple(self.layer_sizes),
                n_steps=self.n_steps,
            )
            return float(loss)
        kwargs = dict(input=x, skip_model=self.skip_model, param_type=self.param_type)
        if self.name == "BP":
            result = jpc.make_bp_step(
                self.model, self.optim, self.opt_state, y, **kwargs
            )
        else:
            result = jpc.make_pc_step(
                self.model,
                self.optim,
                self.opt_state,
                y,
                activity_optim=self.activity_optim,
                n_inference_steps=self.n_steps,
                **kwargs,
                **self.options,
            )
        self.model, self.opt_state = result["model"], result["opt_state"]
        return float(result["loss"])

    def accuracy(self, data) -> float:
        x, y = data
        _, acc = jpc.test_discriminative_pc(
            self.model, y, x, skip_model=self.skip_model, param_type=self.param_type
        )
        return float(acc)

    def layer_evidence(self, x, y) -> dict:
        """Per layer: PC/BP gradient norm ratio over λ, and cosine, on one batch."""
        if self.name == "BP":
            raise ValueError("backprop is its own reference")
        if self.name == "ePC":
            ratio, cosine = epc_layer_evidence(
                self.params,
                x,
                y,
                error_optim=self.activity_optim,
                layer_sizes=tuple(self.layer_sizes),
                n_steps=self.n_steps,
            )
            status = np.where(np.asarray(ratio) == 0, 0, 2)
        else:
            result = jpc.compute_layer_learning(
                self.model,
                x,
                y,
                skip_model=self.skip_model,
                param_type=self.param_type,
                activity_optim=self.activity_optim,
                n_inference_steps=self.n_steps,
                **self.options,
            )
            ratio = np.asarray(result["ratio"]) / self.scale
            cosine, status = result["cosine"], result["status"]
        return {
            "ratio": [float(r) for r in np.asarray(ratio)],
            "cosine": [None if np.isnan(c) else float(c) for c in np.asarray(cosine)],
            "status": [int(s) for s in np.asarray(status)],
        }


def _epc_errors(params, x, y, error_optim, layer_sizes, n_steps):
    errors = jpc.init_epc_errors(list(layer_sizes), batch_size=x.shape[0])

    def inference_step(carry, _):
        errors, state = carry
        out = jpc.update_epc_errors(
            params, errors, error_optim, state, y, input=x, param_type="mupc"
        )
        return (out["errors"], out["opt_state"]), None

    (errors, _), _ = jax.lax.scan(
        inference_step, (errors, error_optim.init(errors)), length=n_steps
    )
    return errors


@eqx.filter_jit
def epc_step(params, opt_state, x, y, *, optim, error_optim, layer_sizes, n_steps):
    """ePC: `n_steps` error steps from zero, then one weight update."""
    errors = _epc_errors(params, x, y, error_optim, layer_sizes, n_steps)
    out = jpc.update_epc_params(
        params, errors, optim, opt_state, y, input=x, param_type="mupc"
    )
    loss = jpc.mse_loss(
        jpc.init_activities_with_ffwd(
            params[0], x, skip_model=params[1], param_type="mupc"
        )[-1],
        y,
    )
    return (out["model"], out["skip_model"]), out["opt_state"], loss


@eqx.filter_jit
def epc_layer_evidence(params, x, y, *, error_optim, layer_sizes, n_steps):
    """ePC's per-layer gradient ratio and cosine to backprop's.

    At zero errors the ePC energy is the loss of the feedforward pass, so its weight
    gradient there is backprop's: the reference comes from the same function.
    """
    zeros = jpc.init_epc_errors(list(layer_sizes), batch_size=x.shape[0])
    errors = _epc_errors(params, x, y, error_optim, layer_sizes, n_steps)
    grads = [
        jpc.compute_epc_param_grads(params, e, y, x=x, param_type="mupc")[0]
        for e in (errors, zeros)
    ]
    ratios = [
        jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(pc)))
        / jnp.sqrt(sum(jnp.sum(b**2) for b in jax.tree.leaves(bp)))
        for pc, bp in zip(*grads)
    ]
    cosines = jpc.compute_grad_cosine_similarity(*grads)["per_layer"]
    return jnp.stack(ratios), jnp.asarray(cosines)


# ----------------------------------------------------------------------- training


def train(params: dict) -> dict:
    data = load_data(params["dataset"])
    method = Method(params)
    x_train, y_train = data["train"]
    batches = datasets.batches(x_train, y_train, params["batch_size"], params["seed"])
    x_diag, y_diag = (a[: params["batch_size"]] for a in data["val"])
    record_at = set(params.get("record_at", []))
    log = {"eval_iter": [0], "val_acc": [method.accuracy(data["val"])]}
    log.update(train_loss=[], diverged=False, layers={})
    n_iters = params["iters"]
    desc = f"{params['dataset']} {method.name} L={method.depth}"
    for it in progress(range(n_iters + 1), desc=desc, dynamic_ncols=True, leave=False):
        if it in record_at:
            log["layers"][str(it)] = method.layer_evidence(x_diag, y_diag)
        if it == n_iters:
            break
        x, y = next(batches)
        try:
            loss = method.step(x, y)
        except Exception as e:  # eqx.error_if on a non-finite energy
            if "not finite" not in str(e):
                raise
            loss = float("nan")
        log["train_loss"].append(loss if np.isfinite(loss) else None)
        log["diverged"] = not np.isfinite(loss)
        if log["diverged"] or (it + 1) % params["eval_every"] == 0:
            log["eval_iter"].append(it + 1)
            log["val_acc"].append(method.accuracy(data["val"]))
        if log["diverged"]:
            break
    log["final_val_acc"] = log["val_acc"][-1]
    if params.get("test", False):
        log["test_acc"] = method.accuracy(data["test"])
    return log


def push_profile(params: dict) -> dict:
    """Per-layer evidence at initialisation for one inference setting (no training)."""
    data = load_data("mnist")
    method = Method(params)
    x, y = (a[: params["batch_size"]] for a in data["val"])
    return method.layer_evidence(x, y)


# -------------------------------------------------------------------------- cells


def _base(args, dataset, depth, method) -> dict:
    return {
        "dataset": dataset,
        "depth": depth,
        "method": method,
        "width": args.width,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }


def select_depth(args, depth: int) -> int:
    return min(depth, max(d for d in args.depths if d <= args.max_select_depth))


def selection_key(dataset, depth, method, lr) -> str:
    return f"select/{dataset}/depth{depth}/{method}/lr{lr:g}"


def chosen_lr(args, done, dataset, depth, method) -> float | None:
    """The grid rate of best final validation accuracy (None until all are done)."""
    sel = select_depth(args, depth)
    runs = [done.get(selection_key(dataset, sel, method, lr)) for lr in args.lr_grid]
    if any(r is None for r in runs):
        return None
    accs = [r["final_val_acc"] for r in runs]
    accs = [a if not r["diverged"] else -1 for a, r in zip(accs, runs)]
    return args.lr_grid[int(np.argmax(accs))]


def push_settings(args, depth: int) -> list[tuple[str, dict]]:
    settings = []
    for t in args.push_t:
        n = t * depth
        settings += [
            (f"PC_pe0.1_T{t}L", dict(method="PC", activity_step=0.1, n_steps=n)),
            (f"muPC_sgd0.5_T{t}L", dict(method="muPC", activity_step=0.5, n_steps=n)),
        ]
        for step in (0.1, 0.25):
            settings.append(
                (
                    f"muPC_pe{step:g}_T{t}L",
                    dict(
                        method="muPC", activity_step=step, per_example=True, n_steps=n
                    ),
                )
            )
        for c in (0.1, 0.25):
            settings.append(
                (
                    f"muPC-prec_pe{c:g}overL_T{t}L",
                    dict(method="muPC-prec", activity_step=c / depth, n_steps=n),
                )
            )
        for step in (0.1, 0.5):
            settings.append(
                (
                    f"ePC_pe{step:g}_T{t}L",
                    dict(method="ePC", activity_step=step, n_steps=n),
                )
            )
    # Longer inference for the PC settings that went deepest, within the budget.
    for t in args.push_long_t:
        n = t * depth
        if n * depth > args.push_budget:
            continue
        settings += long_settings(t, depth)
    return settings


def long_settings(t: int, depth: int) -> list[tuple[str, dict]]:
    n = t * depth
    return [
        (f"PC_pe0.1_T{t}L", dict(method="PC", activity_step=0.1, n_steps=n)),
        (
            f"muPC_pe0.25_T{t}L",
            dict(method="muPC", activity_step=0.25, per_example=True, n_steps=n),
        ),
        (
            f"muPC-prec_pe0.25overL_T{t}L",
            dict(method="muPC-prec", activity_step=0.25 / depth, n_steps=n),
        ),
    ]


def follow_ups(args, done: dict, depth: int) -> list[tuple[str, dict]]:
    """Long settings over the budget at `depth` that got every layer learning at a
    shallower push depth: the one way to see whether they still do deeper."""
    settings = []
    shallower = [d for d in args.push_depths if d < depth]
    for t in args.push_long_t:
        if t * depth * depth <= args.push_budget:
            continue  # already planned
        for name, setting in long_settings(t, depth):
            if any(
                (ev := done.get(f"push/depth{d}/{name}")) is not None
                and learning_layers(ev).all()
                for d in shallower
            ):
                settings.append((name, setting))
    return settings


def plan(args, done: dict) -> list[_runner.Cell]:
    """Cheap and decisive cells first: per MNIST depth up to `--max-select-depth`,
    selection then training; the push profiles; the frozen controls (μPC's only at
    those depths); the deeper MNIST networks but the deepest; Fashion-MNIST; the
    deepest network last."""
    iters = dict(zip(args.depths, args.iters))
    mnist, frozen, fmnist = [], [], []
    deep = {d: [] for d in args.depths if d > args.max_select_depth}
    work = [("mnist", d, iters[d]) for d in args.depths]
    work += [
        ("fashion_mnist", d, iters.get(d, max(args.iters))) for d in args.fmnist_depths
    ]
    for dataset, depth, n_iters in work:
        cells = mnist if dataset == "mnist" else fmnist
        if dataset == "mnist" and depth in deep:
            cells = deep[depth]
        for method in args.methods:
            if select_depth(args, depth) == depth:
                for lr in args.lr_grid:
                    p = _base(args, dataset, depth, method)
                    p.update(
                        iters=args.select_iters,
                        eval_every=args.select_iters,
                        param_lr=lr,
                    )
                    key = selection_key(dataset, depth, method, lr)
                    cells.append(_runner.Cell(key, p))
            lr = chosen_lr(args, done, dataset, depth, method)
            if lr is None:
                continue
            p = _base(args, dataset, depth, method)
            p.update(iters=n_iters, eval_every=args.eval_every, param_lr=lr, test=True)
            if method != "BP":
                p["record_at"] = sorted(r for r in args.record_at if r <= n_iters)
            cells.append(_runner.Cell(f"train/{dataset}/depth{depth}/{method}", p))
            if dataset == "mnist" and (
                method == "BP" or (method in FROZEN_METHODS and depth not in deep)
            ):
                p = dict(p, n_trainable=args.n_trainable, record_at=[])
                frozen.append(
                    _runner.Cell(f"frozen/{dataset}/depth{depth}/{method}", p)
                )
    push = []
    for depth in args.push_depths:
        settings = push_settings(args, depth) + follow_ups(args, done, depth)
        for name, setting in settings:
            p = _base(args, "mnist", depth, setting["method"])
            p.update(setting)
            push.append(_runner.Cell(f"push/depth{depth}/{name}", p))
    deep_cells = [deep[d] for d in sorted(deep)]
    last = deep_cells.pop() if deep_cells else []
    return mnist + push + frozen + sum(deep_cells, []) + fmnist + last


def run_cell(params: dict) -> dict:
    # Every cell builds its own optimisers: the compile-count warnings are expected.
    warnings.filterwarnings("ignore", message=".*has compiled .* programs")
    if "iters" in params:
        return train(params)
    return push_profile(params)


# ------------------------------------------------------------------------ outputs


def learning_layers(evidence: dict) -> np.ndarray:
    """Mask of the layers within 10× of backprop's norm at a cosine above 0.5."""
    ratio = np.asarray(evidence["ratio"], float)
    cosine = np.asarray([np.nan if c is None else c for c in evidence["cosine"]])
    return (
        (ratio >= LEARNS_RATIO) & (ratio <= 1 / LEARNS_RATIO) & (cosine > LEARNS_COSINE)
    )


def describe_layers(evidence: dict | None) -> str:
    """`n/L (lowest k)`: how many layers learn, and the lowest one that does."""
    if evidence is None:
        return "–"
    learns = learning_layers(evidence)
    zeros = int(np.sum(np.asarray(evidence["status"]) == 0))
    lowest = int(np.argmax(learns)) + 1 if learns.any() else None
    text = f"{int(learns.sum())}/{len(learns)}"
    text += f", lowest {lowest}" if lowest else ""
    return text + (f", {zeros} exactly 0" if zeros else "")


def _result(done, key):
    return done.get(key)


def accuracy_table(args, done, dataset, depths) -> str:
    lines = [
        f"| depth | method | Adam lr | test acc (%) | top-{args.n_trainable} only (%) "
        "| layers learning at it. 0 | … at the last record | ratio/λ, last record: "
        "lowest layer … top layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for depth in depths:
        for method in args.methods:
            run = _result(done, f"train/{dataset}/depth{depth}/{method}")
            if run is None:
                continue
            lr = chosen_lr(args, done, dataset, depth, method)
            frozen = _result(done, f"frozen/{dataset}/depth{depth}/{method}")
            frozen = "–" if frozen is None else f"{frozen['test_acc']:.2f}"
            acc = f"{run['test_acc']:.2f}" + (" (diverged)" if run["diverged"] else "")
            layers = run["layers"]
            first = layers.get("0")
            last = layers[max(layers, key=int)] if layers else None
            ratios = (
                "–"
                if last is None
                else (f"{last['ratio'][0]:.1e} … {last['ratio'][-1]:.2g}")
            )
            lines.append(
                f"| {depth} | {method} | {lr:g} | {acc} | {frozen} | "
                f"{describe_layers(first)} | {describe_layers(last)} | {ratios} |"
            )
    return "\n".join(lines)


def push_table(args, done) -> str:
    lines = [
        "| depth | setting | layers learning | min ratio | min cosine |",
        "|---|---|---|---|---|",
    ]
    for depth in args.push_depths:
        settings = push_settings(args, depth) + follow_ups(args, done, depth)
        for name, _ in settings:
            ev = _result(done, f"push/depth{depth}/{name}")
            if ev is None:
                continue
            cos = [c for c in ev["cosine"] if c is not None]
            min_cos = f"{min(cos):.2f}" if cos else "–"
            lines.append(
                f"| {depth} | {name} | {describe_layers(ev)} | "
                f"{min(ev['ratio']):.1e} | {min_cos} |"
            )
    return "\n".join(lines)


def save_heatmaps(args, done, dataset, depth, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        m: _result(done, f"train/{dataset}/depth{depth}/{m}")
        for m in args.methods
        if m != "BP"
    }
    runs = {m: r for m, r in runs.items() if r is not None and r["layers"]}
    if not runs:
        return False
    fig, axes = plt.subplots(
        2, len(runs), figsize=(3.2 * len(runs), 6), squeeze=False, sharey=True
    )
    for col, (method, run) in enumerate(runs.items()):
        its = sorted(run["layers"], key=int)
        ratio = np.array([run["layers"][i]["ratio"] for i in its], float).T
        cosine = np.array(
            [
                [np.nan if c is None else c for c in run["layers"][i]["cosine"]]
                for i in its
            ]
        ).T
        with np.errstate(divide="ignore"):
            log_ratio = np.log10(np.where(ratio > 0, ratio, 1e-12))
        extent = (-0.5, len(its) - 0.5, 0.5, ratio.shape[0] + 0.5)
        for row, (values, kw, label) in enumerate(
            [
                (log_ratio, dict(cmap="viridis", vmin=-8, vmax=1), "log₁₀ ratio/λ"),
                (cosine, dict(cmap="coolwarm_r", vmin=-1, vmax=1), "cosine"),
            ]
        ):
            ax = axes[row, col]
            image = ax.imshow(
                values, aspect="auto", origin="lower", extent=extent, **kw
            )
            ax.set_xticks(range(len(its)), its, fontsize=7)
            ax.set_xlabel("training iteration")
            if col == 0:
                ax.set_ylabel("layer")
            ax.set_title(f"{method}: {label}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(
        f"{dataset}, depth {depth}: PC weight gradient vs backprop's, per layer "
        "(ratio 0 shown at 10⁻¹²; blank cosine: gradient exactly 0)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def save_accuracy_plot(args, done, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(12, 4))
    colours = dict(
        zip(METHODS, ["tab:orange", "tab:blue", "tab:purple", "tab:red", "tab:green"])
    )
    for method in args.methods:
        for kind, style in (("train", "o-"), ("frozen", "s--")):
            points = [
                (d, _result(done, f"{kind}/mnist/depth{d}/{method}"))
                for d in args.depths
            ]
            points = [(d, r["test_acc"]) for d, r in points if r is not None]
            if points:
                label = method + (
                    f", top {args.n_trainable} only" if kind == "frozen" else ""
                )
                ax.plot(*zip(*points), style, color=colours[method], label=label)
        run = _result(done, f"train/mnist/depth{max(args.depths)}/{method}")
        if run is not None:
            ax_curve.plot(
                run["eval_iter"], run["val_acc"], color=colours[method], label=method
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.depths, [str(d) for d in args.depths])
    ax.minorticks_off()
    ax.set(xlabel="depth L", ylabel="MNIST test accuracy (%)", ylim=(0, 100))
    ax_curve.set(
        xlabel="iteration",
        ylabel="validation accuracy (%)",
        ylim=(0, 100),
        title=f"depth {max(args.depths)}",
    )
    for a in (ax, ax_curve):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(args, done: dict) -> None:
    done = {key: record["result"] for key, record in done.items()}
    sections = []
    for dataset, depths in (
        ("mnist", args.depths),
        ("fashion_mnist", args.fmnist_depths),
    ):
        sections.append(
            f"### {dataset}\n\n" + accuracy_table(args, done, dataset, depths)
        )
    sections.append(
        "### push: per-layer evidence at initialisation\n\n" + push_table(args, done)
    )
    table = "\n\n".join(sections) + "\n"
    extra = {
        "learns": f"ratio/λ in [{LEARNS_RATIO}, {1 / LEARNS_RATIO:g}], "
        f"cosine > {LEARNS_COSINE}"
    }
    _runner.write_summary(args, table, {"cells": done}, extra)
    if done:
        save_accuracy_plot(args, done, args.out_dir / "accuracy.png")
    for dataset, depths in (
        ("mnist", args.depths),
        ("fashion_mnist", args.fmnist_depths),
    ):
        for depth in depths:
            path = args.out_dir / f"layers_{dataset}_depth{depth}.png"
            save_heatmaps(args, done, dataset, depth, path)
    print(f"Wrote the summary and figures to {args.out_dir}")


def main(argv=None) -> dict:
    print(f"{jax_versions()}, backend {jax.default_backend()}")
    return _runner.main(
        "experiments.depth_study", build_parser(), argv, check_args=check_args
    )


if __name__ == "__main__":
    main()
