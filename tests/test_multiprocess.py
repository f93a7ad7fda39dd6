"""Data parallelism over two processes equals one process (float64, rtol 1e-10).

Two CPU processes with two host devices each are joined by
`jax.distributed.initialize` on the loopback address (collectives over gloo) and
run `multiprocess_worker.py`: each passes its half of every batch to
`jpc.shard_batch` over the global 4-device mesh and trains with
`jpc.make_pc_step` and `jpc.run_steps`. The parameters must equal those of the
same training in this single process on the full batches.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import multiprocess_worker as worker
import numpy as np
import pytest


WORKER = Path(__file__).with_name("multiprocess_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(out: Path) -> list[subprocess.CompletedProcess]:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
    )
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "process", str(i), port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(
            subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        )
    return results


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "params.npz"
    results = run_two_processes(out)
    for r in results:
        if r.returncode == 3:
            pytest.skip(
                "jax.distributed over gloo is not available: " + r.stdout.strip()
            )
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    got = np.load(out)
    state, x, y, kwargs = worker.problem()
    steps_model, epoch_model = worker.train(state, x, y, kwargs)
    for name, model in (("steps", steps_model), ("epoch", epoch_model)):
        want = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
        assert len(want) == sum(k.startswith(name) for k in got.files)
        for i, leaf in enumerate(want):
            np.testing.assert_allclose(got[f"{name}_{i}"], np.asarray(leaf), rtol=1e-10)
    # The training moved the parameters (the comparison is not of initial values).
    initial = jax.tree_util.tree_leaves(eqx.filter(state["model"], eqx.is_array))
    assert not np.allclose(got["steps_0"], np.asarray(initial[0]))
