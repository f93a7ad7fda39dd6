"""A small resumable runner for long experiments.

An experiment is cut into *cells* (one method × dataset × seed, one depth, ...). Every
finished cell is written at once to its own small JSON file,
`<cells-dir>/<cell key>.json`, so an interrupted run loses at most the cells that were
in flight, and rerunning the same command skips the finished cells and continues.
`--jobs N` runs up to N cells at a time in separate processes (spawned, so each has
its own JAX runtime). `summary` rebuilds the tables and plots from the JSON files
alone, without training anything.

An experiment module provides three functions:

- `plan(args, done) -> list[Cell]`: every cell that can run now, in priority order,
  given `done`, a dict `{key: result}` of the finished cells. Cells that depend on
  others (the seeds of a method after its learning-rate search) are simply left out
  until what they need is in `done`; the runner calls `plan` again after each cell.
- `run_cell(params) -> dict`: runs one cell and returns its JSON-able result. It must
  be a module-level function: with `--jobs > 1` it is looked up by name in a fresh
  process.
- `summarize(args, done) -> None`: tables and plots from the finished cells.

and calls [`main`][] from its own `main()` with an argparse parser it has filled with
its own options. The parser gets a positional `command` (`run`, the default, or
`summary`) and the options `--jobs`, `--cells-dir` and `--max-cells`.

A cell file holds the cell's key and parameters, its result, how long it took, when it
finished, and the JAX version and backend. A cell whose file exists with different
parameters is an error (the command changed under an existing folder): use another
`--cells-dir` or delete the stale files.
"""

import argparse
import concurrent.futures
import datetime
import importlib
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple


class Cell(NamedTuple):
    """One unit of work: `key` names its JSON file (`/` makes sub-folders)."""

    key: str
    params: dict


def add_runner_args(parser: argparse.ArgumentParser, default_cells_dir: Path) -> None:
    """Adds `command`, `--jobs`, `--cells-dir` and `--max-cells` to `parser`."""
    parser.add_argument(
        "command",
        nargs="?",
        choices=("run", "summary"),
        default="run",
        help="run the missing cells then summarise, or only summarise",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells run at once (processes)"
    )
    parser.add_argument(
        "--cells-dir",
        type=Path,
        default=default_cells_dir,
        help="one JSON file per finished cell",
    )
    parser.add_argument(
        "--max-cells",
        type=int,
        default=None,
        help="stop after this many new cells (default: run all)",
    )


def cell_path(cells_dir: Path, key: str) -> Path:
    return Path(cells_dir) / f"{key}.json"


def load_done(cells_dir: Path) -> dict:
    """`{key: record}` of every finished cell under `cells_dir`."""
    cells_dir = Path(cells_dir)
    done = {}
    if not cells_dir.is_dir():
        return done
    for path in sorted(cells_dir.rglob("*.json")):
        record = json.loads(path.read_text())
        done[record["key"]] = record
    return done


def _canonical(params: dict) -> dict:
    """`params` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(params))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees a half-written cell


def _jax_info() -> dict | None:
    """JAX's version and backend if the experiment uses JAX (not imported here)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    from jpc._compat import jax_info

    return jax_info()


def execute_cell(module: str, cells_dir: str, key: str, params: dict) -> dict:
    """Runs one cell of `module` and writes its JSON file; returns the record."""
    run_cell = importlib.import_module(module).run_cell
    start = time.perf_counter()
    result = run_cell(params)
    record = {
        "key": key,
        "params": params,
        "result": result,
        "seconds": time.perf_counter() - start,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "jax": _jax_info(),
        "machine": {"processor": platform.machine(), "cpus": os.cpu_count()},
    }
    _write_atomic(cell_path(Path(cells_dir), key), json.dumps(record, indent=1))
    return record


def _pending(plan: Callable, args, done: dict, skip: set) -> list[Cell]:
    """The planned cells that have not run, after checking the finished ones."""
    pending = []
    for cell in plan(args, {k: r["result"] for k, r in done.items()}):
        if cell.key in done:
            if done[cell.key]["params"] != _canonical(cell.params):
                raise ValueError(
                    f"Cell {cell.key!r} already exists in {args.cells_dir} with "
                    f"different parameters ({done[cell.key]['params']} vs "
                    f"{cell.params}). Use another --cells-dir or remove the file."
                )
        elif cell.key not in skip:
            pending.append(cell)
    return pending


def run_cells(module: str, plan: Callable, args) -> dict:
    """Runs every missing cell that `plan` yields, until none is left.

    Returns `{key: record}` of all finished cells (old and new).
    """
    done = load_done(args.cells_dir)
    n_old, n_new = len(done), 0
    limit = args.max_cells
    print(f"{n_old} finished cells in {args.cells_dir}")
    if args.jobs == 1:
        while limit is None or n_new < limit:
            pending = _pending(plan, args, done, set())
            if not pending:
                break
            cell = pending[0]
            print(f"cell {cell.key}: running", flush=True)
            done[cell.key] = execute_cell(
                module, str(args.cells_dir), cell.key, cell.params
            )
            n_new += 1
            print(f"cell {cell.key}: done in {done[cell.key]['seconds']:.1f} s")
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=context
        ) as ex:
            running: dict = {}
            while True:
                budget = None if limit is None else limit - n_new - len(running)
                pending = _pending(plan, args, done, set(running.values()))
                for cell in pending[: args.jobs - len(running)]:
                    if budget is not None and budget <= 0:
                        break
                    print(f"cell {cell.key}: running", flush=True)
                    future = ex.submit(
                        execute_cell, module, str(args.cells_dir), cell.key, cell.params
                    )
                    running[future] = cell.key
                    budget = None if budget is None else budget - 1
                if not running:
                    break
                finished, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    key = running.pop(future)
                    done[key] = future.result()
                    n_new += 1
                    print(f"cell {key}: done in {done[key]['seconds']:.1f} s")
    print(f"{n_new} new cells; {len(done)} finished in all")
    return done


def write_summary(
    args, text: str, data: dict, extra_config: dict | None = None
) -> None:
    """Prints `text` and writes it to `<args.out_dir>/summary.md`, and `data` with
    the run's configuration (the parsed arguments, plus `extra_config`) to
    `<args.out_dir>/summary.json`."""
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.md").write_text(text)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    output = {"config": {**config, **(extra_config or {})}, **data}
    (args.out_dir / "summary.json").write_text(json.dumps(output, indent=1))


def main(module: str, parser: argparse.ArgumentParser, argv=None, check_args=None):
    """Parses the arguments, runs the missing cells (`run`) and summarises.

    `module` is the experiment's importable name (`"experiments.pcx_table_mlp"`); it
    must define `plan`, `run_cell` and `summarize`. `check_args(args, parser)`, if
    given, validates and completes the parsed arguments.
    """
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.max_cells is not None and args.max_cells < 0:
        parser.error(f"--max-cells must be non-negative, got {args.max_cells}")
    if check_args is not None:
        check_args(args, parser)
    experiment = importlib.import_module(module)
    if args.command == "run":
        done = run_cells(module, experiment.plan, args)
    else:
        done = load_done(args.cells_dir)
        _pending(experiment.plan, args, done, set())  # checks the parameters
    results = {k: r for k, r in done.items()}
    experiment.summarize(args, results)
    return results
