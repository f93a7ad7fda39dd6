"""The resumable experiment runner: an interrupted run, resumed, gives the same table.

The runner lives in `experiments/` and the tests never import it: they run the tiny
demo experiment `python -m experiments._tiny_runner_demo` in subprocesses, kill one
run after some of its cells finished, rerun the same command and compare the summary
table with that of an uninterrupted run (and of a parallel run).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
MODULE = "experiments._tiny_runner_demo"
N_CELLS = 2 + 4  # two search cells, then four seeds


def demo(tmp: Path, name: str, *extra: str, sleep: float = 0.1) -> list[str]:
    return [
        sys.executable,
        "-m",
        MODULE,
        *extra,
        "--cells-dir",
        str(tmp / name / "cells"),
        "--out-dir",
        str(tmp / name / "out"),
        "--sleep",
        str(sleep),
    ]


def run(cmd, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{out.stdout}\n{out.stderr}")
    return out


def cells(tmp: Path, name: str) -> list[Path]:
    return sorted((tmp / name / "cells").rglob("*.json"))


def table(tmp: Path, name: str) -> str:
    return (tmp / name / "out" / "table.md").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's table."""
    tmp = tmp_path_factory.mktemp("runner")
    run(demo(tmp, "full"))
    assert len(cells(tmp, "full")) == N_CELLS
    return tmp, table(tmp, "full")


@pytest.mark.slow
def test_killed_then_resumed_gives_the_uninterrupted_table(reference):
    tmp, expected = reference
    proc = subprocess.Popen(
        demo(tmp, "killed", sleep=0.5),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while len(cells(tmp, "killed")) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in cells(tmp, "killed")}
    # Killed after the search and at least one seed, before the end.
    assert 3 <= len(before) < N_CELLS
    assert not (tmp / "killed" / "out" / "table.md").exists()

    out = run(demo(tmp, "killed", sleep=0.5))
    assert f"{len(before)} finished cells" in out.stdout
    assert f"{N_CELLS - len(before)} new cells; {N_CELLS} finished" in out.stdout
    # The finished cells were skipped, not rerun.
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert table(tmp, "killed") == expected

    # Rerunning a complete experiment runs nothing and rebuilds the same table.
    out = run(demo(tmp, "killed", sleep=0.5))
    assert f"0 new cells; {N_CELLS} finished" in out.stdout
    assert table(tmp, "killed") == expected


def test_stop_after_max_cells_then_resume(reference):
    tmp, expected = reference
    run(demo(tmp, "limited", "--max-cells", "1"))
    assert len(cells(tmp, "limited")) == 1
    run(demo(tmp, "limited", "--max-cells", "2"))
    assert len(cells(tmp, "limited")) == 3
    run(demo(tmp, "limited"))
    assert table(tmp, "limited") == expected


def test_parallel_jobs_give_the_same_table(reference):
    tmp, expected = reference
    run(demo(tmp, "parallel", "--jobs", "3"))
    assert len(cells(tmp, "parallel")) == N_CELLS
    assert table(tmp, "parallel") == expected


def test_summary_rebuilds_from_the_cell_files_alone(reference):
    tmp, expected = reference
    (tmp / "full" / "out" / "table.md").unlink()
    out = run(demo(tmp, "full", "summary"))
    assert "new cells" not in out.stdout  # nothing trained
    assert table(tmp, "full") == expected
    record = json.loads((tmp / "full" / "cells" / "seed0.json").read_text())
    assert record["key"] == "seed0"
    assert set(record) >= {"params", "result", "seconds", "finished", "jax"}


def test_changed_parameters_under_existing_cells_are_refused(reference):
    tmp, _ = reference
    out = run(demo(tmp, "full", sleep=0.0), check=False)
    assert out.returncode != 0
    assert "already exists" in out.stderr and "different parameters" in out.stderr


def test_bad_jobs_is_refused(tmp_path):
    out = run(demo(tmp_path, "x", "--jobs", "0"), check=False)
    assert out.returncode != 0
    assert "--jobs must be at least 1, got 0" in out.stderr
