"""A tiny experiment on the resumable runner, used to check its resume path.

Least-squares regression by gradient descent on a fixed random problem: a
"search" over two learning rates (scored on a validation split), then the chosen rate
trained from `--seeds` seeds. It has the shape of the long experiments (search cells,
then seed cells that depend on them) but each cell takes `--sleep` seconds plus a few
milliseconds of NumPy, so the runner's test can interrupt and resume it quickly.

    python -m experiments._tiny_runner_demo --cells-dir /tmp/cells --out-dir /tmp/out
    python -m experiments._tiny_runner_demo summary --cells-dir /tmp/cells

Writes `table.md` (the summary table) to `--out-dir`.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from experiments import _runner


LRS = (0.05, 0.2)


def plan(args, done: dict) -> list[_runner.Cell]:
    cells = [
        _runner.Cell(f"search/lr{lr}", {"lr": lr, "seed": 0, "sleep": args.sleep})
        for lr in LRS
    ]
    scores = [done.get(c.key) for c in cells]
    if all(s is not None for s in scores):
        best = LRS[int(np.argmin([s["val_loss"] for s in scores]))]
        cells += [
            _runner.Cell(f"seed{s}", {"lr": best, "seed": s, "sleep": args.sleep})
            for s in range(args.seeds)
        ]
    return cells


def run_cell(params: dict) -> dict:
    time.sleep(params["sleep"])
    data = np.random.default_rng(1234)
    x = data.normal(size=(60, 5))
    y = x @ data.normal(size=5) + 0.1 * data.normal(size=60)
    (x_tr, y_tr), (x_val, y_val) = (x[:40], y[:40]), (x[40:], y[40:])
    w = np.random.default_rng(params["seed"]).normal(size=5)
    losses = []
    for _ in range(20):
        w -= params["lr"] * x_tr.T @ (x_tr @ w - y_tr) / len(y_tr)
        losses.append(float(np.mean((x_val @ w - y_val) ** 2)))
    return {"val_loss": losses[-1], "curve": losses}


def summarize(args, done: dict) -> None:
    seeds = sorted(k for k in done if k.startswith("seed"))
    lines = ["| cell | lr | final val. loss |", "|---|---|---|"]
    for key in sorted(k for k in done if k.startswith("search")) + seeds:
        r = done[key]
        lines.append(f"| {key} | {r['params']['lr']} | {r['result']['val_loss']!r} |")
    finals = [done[k]["result"]["val_loss"] for k in seeds]
    if finals:
        lines.append(f"\nmean over {len(finals)} seeds: {np.mean(finals)!r}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments._tiny_runner_demo",
        description=__doc__.splitlines()[0],
    )
    _runner.add_runner_args(parser, Path("/tmp/jpc_tiny_runner_cells"))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/jpc_tiny_runner"))
    return _runner.main("experiments._tiny_runner_demo", parser, argv)


if __name__ == "__main__":
    main()
