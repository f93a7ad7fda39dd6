"""Execute every example notebook in quick mode; fail loudly on the first error.

    python docs/run_notebooks.py                 # all of docs/examples/*.ipynb
    python docs/run_notebooks.py pc_from_scratch # only notebooks whose name matches

Each notebook runs top to bottom in a fresh `python3` kernel with `JPC_QUICK=1` (the
notebooks read it in their first code cell and shorten training), its working directory
set to `docs/examples/`, and a timeout per cell. Outputs are never written back: the
saved outputs in the files come from full runs. The exit status is non-zero if any
notebook fails, and the message names the notebook and the cell.

Needs `nbclient`, `nbformat` and `ipykernel` (the `docs` extra).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError


EXAMPLES = Path(__file__).resolve().parent / "examples"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only notebooks matching these")
    parser.add_argument(
        "--timeout", type=int, default=300, help="seconds allowed per cell"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="run at the full setting (JPC_QUICK unset) instead of quick mode",
    )
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    return parser.parse_args(argv)


def _failing_cell(nb, exc: Exception) -> str:
    """Index and first source line of the cell that failed (the last one run)."""
    ran = [
        (i, c)
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and c.get("execution_count") is not None
    ]
    if isinstance(exc, CellTimeoutError) or not ran:
        # A timed-out cell may not have an execution count yet: find the first
        # code cell without outputs after the last one that finished.
        pending = [
            (i, c)
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and c.get("execution_count") is None
        ]
        ran = pending[:1] or ran
    if not ran:
        return "cell ?"
    index, cell = ran[-1]
    first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
    return f"cell {index} ({first[:60]!r})"


def run_notebook(path: Path, timeout: int, kernel: str) -> float:
    """Execute one notebook in memory; return its wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        msg = f"{path.name}: {_failing_cell(nb, exc)} failed:\n{exc}"
        raise RuntimeError(msg) from exc
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.full:
        os.environ.pop("JPC_QUICK", None)
    else:
        os.environ["JPC_QUICK"] = "1"  # inherited by the kernels nbclient starts
    paths = sorted(EXAMPLES.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(n in p.stem for n in args.names)]
    if not paths:
        print(f"no notebooks found in {EXAMPLES}", file=sys.stderr)
        return 1
    mode = "full" if args.full else "quick (JPC_QUICK=1)"
    print(f"Executing {len(paths)} notebooks, {mode}, timeout {args.timeout}s/cell")
    failures, total = [], 0.0
    for path in paths:
        try:
            seconds = run_notebook(path, args.timeout, args.kernel)
        except RuntimeError as err:
            print(f"FAIL {err}", file=sys.stderr, flush=True)
            failures.append(path.name)
            continue
        total += seconds
        print(f"  ok  {path.name:32} {seconds:6.1f} s", flush=True)
    print(f"total {total:.1f} s")
    if failures:
        print(f"{len(failures)} notebook(s) failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
