"""The inverse rescaling 1/S₀₀ of a deep linear μPC network at initialisation.

For a deep linear network with identity skips the inference equilibrium rescales the
loss by S (see the theory page):

    S = I/λ + Σ_{l=2}^{L} (1/κ_{l-1}) (M_L⋯M_l)(M_L⋯M_l)ᵀ,

so for a network with one output, 1/S₀₀ is the factor by which the equilibrium energy
weighs the squared residual. With the μPC scalings and the layer precisions
λ = γ²·N·L (output) and κ_l = L (hidden), the claim to measure is that 1/S₀₀ tends to
the width N as N grows. This script computes 1/S₀₀ with
`jpc.compute_linear_equilib_rescaling` for random μPC networks (`jpc.make_mlp(...,
act_fn="linear", param_type="mupc")` with `jpc.make_skip_model`, weights N(0, 1)) over
a grid of widths N and depths L, for the default precisions (λ = κ = 1) and for the
layer precisions above, and prints the mean and standard deviation over seeds of
1/(N·S₀₀).

    python -m experiments.mupc_precisions [--widths 16 64 256 1024] [--depths 4 16 64]

Writes `results.json` to `--out-dir`. CPU only, about a minute at the defaults.
"""

import argparse
import json
from pathlib import Path

import jax
import jax.random as jr
import numpy as np

import jpc


DEFAULT_OUT_DIR = Path(__file__).parent / "results" / "mupc_precisions"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mupc_precisions",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--input-dim", type=int, default=784, help="D")
    parser.add_argument("--gamma", type=float, default=1.0, help="γ of a_L and λ")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    return parser.parse_args(argv)


def inverse_rescaling(key, width, depth, input_dim, gamma, precisions: bool) -> float:
    """1/S₀₀ of one random one-output μPC network with identity skips."""
    model = jpc.make_mlp(key, input_dim, width, depth, 1, "linear", param_type="mupc")
    skip_model = jpc.make_skip_model(depth)
    x = np.zeros((1, input_dim), np.float32)  # only its width is read
    options = {}
    if precisions:
        options = dict(
            output_energy_scaling=gamma**2 * width * depth,
            hidden_energy_scaling=float(depth),
        )
    rescaling = jpc.compute_linear_equilib_rescaling(
        (model, skip_model), x, param_type="mupc", gamma=gamma, **options
    )
    return 1.0 / float(rescaling[0, 0])


def measure(args) -> list[dict]:
    rows = []
    for precisions in (False, True):
        for depth in args.depths:
            for width in args.widths:
                keys = jr.split(jr.PRNGKey(0), args.seeds)
                values = [
                    inverse_rescaling(
                        k, width, depth, args.input_dim, args.gamma, precisions
                    )
                    / width
                    for k in keys
                ]
                rows.append(
                    dict(
                        precisions=precisions,
                        depth=depth,
                        width=width,
                        ratio_mean=float(np.mean(values)),
                        ratio_std=float(np.std(values)),
                    )
                )
                print(rows[-1], flush=True)
    return rows


def table(rows: list[dict], widths: list[int], precisions: bool) -> str:
    lines = [
        "| L | " + " | ".join(f"N = {n}" for n in widths) + " |",
        "|---|" + "---|" * len(widths),
    ]
    depths = sorted({r["depth"] for r in rows})
    for depth in depths:
        cells = [
            f"{r['ratio_mean']:.3f} ± {r['ratio_std']:.3f}"
            for n in widths
            for r in rows
            if r["depth"] == depth and r["width"] == n and r["precisions"] == precisions
        ]
        lines.append(f"| {depth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # S₀₀ of deep products, in float64
    rows = measure(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows)
    (args.out_dir / "results.json").write_text(json.dumps(out, indent=2))
    for precisions, name in ((False, "λ = κ = 1"), (True, "λ = γ²NL, κ = L")):
        print(f"\n1/(N·S₀₀), μPC with skips, {name}:\n")
        print(table(rows, args.widths, precisions))
    print(f"\nWrote {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
