"""Is every layer learning? Per-layer PC updates of a deep μPC network vs backprop.

A 16-layer μPC residual network (`jpc.make_mlp(64, 128, depth=16, 10, "relu",
param_type="mupc")` with identity skips) on one batch of 64 of scikit-learn's digits,
at initialisation. Inference from the feedforward state with T = 16 SGD steps on the
activities, either

- `optax.sgd(0.5)` on the batch-mean energy (the μPC notebook's setting: a step of
  0.5/64 per example), or
- a per-example step of 0.5 (`optax.sgd(1.0)` with `activity_lr = 0.5 · 64`).

For each layer, `jpc.compute_layer_learning` gives the norm of the PC weight gradient
relative to backprop's on the same batch, the cosine between them and whether the PC
gradient is exactly zero, below round-off or live.

    python -m experiments.layer_learning_figure

Writes `results.json` to `--out-dir` and the figure to
`experiments/figures/layer_learning.png` (copied to `docs/figures/` for the docs).
"""

import argparse
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
import optax

import jpc
from experiments._progress import progress
from jpc import datasets


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ROOT = Path(__file__).parent
DEFAULT_OUT_DIR = ROOT / "results" / "layer_learning"
FIGURE = ROOT / "figures" / "layer_learning.png"
DOCS_FIGURE = ROOT.parent / "docs" / "figures" / "layer_learning.png"
DEPTH, WIDTH, BATCH, STEP = 16, 128, 64, 0.5
SETTINGS = {
    "sgd(0.5) on the batch-mean energy": dict(activity_optim=optax.sgd(STEP)),
    "per-example step 0.5 (activity_lr = 0.5·B)": dict(
        activity_optim=optax.sgd(1.0), activity_lr=STEP * BATCH
    ),
}
COLOURS = ("tab:red", "tab:blue")


def measure(seed: int = 0) -> dict:
    (x, labels), _ = datasets.load_digits_data(seed=seed)
    x = jnp.asarray(x[:BATCH])
    y = jax.nn.one_hot(jnp.asarray(labels[:BATCH]), 10)
    model = jpc.make_mlp(
        jr.PRNGKey(seed), x.shape[1], WIDTH, DEPTH, 10, "relu", param_type="mupc"
    )
    skip = jpc.make_skip_model(DEPTH)
    results = {}
    for name, options in progress(SETTINGS.items(), desc="settings"):
        out = jpc.compute_layer_learning(
            model,
            x,
            y,
            skip_model=skip,
            param_type="mupc",
            n_inference_steps=DEPTH,
            **options,
        )
        print(f"\n{name}\n{jpc.format_layer_learning(out)}")
        results[name] = {k: np.asarray(v).tolist() for k, v in out.items()}
    return results


def plot(results: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.3))
    for (name, r), colour in zip(results.items(), COLOURS):
        layers = np.asarray(r["layer"]) + 1
        ratio, status = np.asarray(r["ratio"]), np.asarray(r["status"])
        floor = np.asarray(r["round_off"]) / np.asarray(r["bp_norm"])
        shown = np.where(status == 0, np.nan, ratio)
        left.semilogy(layers, shown, "o-", color=colour, label=name)
        if colour == COLOURS[0]:  # the floor is the same for both settings
            left.semilogy(layers, floor, ":", color="grey", label="round-off floor")
        zero = layers[status == 0]
        left.plot(zero, np.full(zero.size, 1e-12), "x", color=colour, ms=7)
        right.plot(layers, r["cosine"], "o-", color=colour, label=name)
    left.set(
        xlabel="layer",
        ylabel="‖PC update‖ / ‖backprop gradient‖",
        title="ratio to backprop (×: exactly 0)",
        ylim=(3e-13, 3),
    )
    right.set(xlabel="layer", ylabel="cosine to backprop", ylim=(-0.2, 1.05))
    right.set_title("cosine (missing: gradient exactly 0)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{DEPTH}-layer μPC residual network, batch {BATCH}, T = {DEPTH}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = measure(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, FIGURE)
    DOCS_FIGURE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIGURE, DOCS_FIGURE)
    print(f"wrote {FIGURE} and {DOCS_FIGURE}")


if __name__ == "__main__":
    main()
