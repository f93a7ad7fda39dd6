"""A training step compiled in one process is loaded from JAX's persistent
compilation cache in the next, and computes the same numbers.

Each process runs the default ODE `jpc.make_pc_step` on the same model and
batch, counting the cache's hits and misses with `jax.monitoring`. The first
process fills an empty cache; the second must find every program there (no miss,
which a host callback in the step's program would cause, since JAX's cache key
then holds the callback's address) and give bitwise the same parameters.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import equinox as eqx
    import jax, jax.monitoring, jax.random as jr
    import numpy as np
    import optax
    import jpc

    model = jpc.make_mlp(jr.PRNGKey(0), 6, 8, 3, 2, "tanh", use_bias=True)
    x = jr.normal(jr.PRNGKey(1), (4, 6))
    y = jax.nn.one_hot(np.array([0, 1, 1, 0]), 2)
    optim = optax.adam(1e-2)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    counts = {"hits": 0, "misses": 0}

    def listen(event, **kwargs):
        for kind in counts:
            if event == "/jax/compilation_cache/cache_" + kind:
                counts[kind] += 1

    jax.monitoring.register_event_listener(listen)
    result = jpc.make_pc_step(model, optim, state, y, input=x, max_t1=50)
    jpc.raise_pending_step_errors()
    leaves = jax.tree.leaves(eqx.filter(result["model"], eqx.is_array))
    print(json.dumps(dict(counts, params=[np.asarray(a).tolist() for a in leaves])))
    """
)


def _run(cache_dir) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_default_step_is_loaded_from_the_persistent_cache(tmp_path):
    first = _run(tmp_path)
    assert first["misses"] >= 1 and first["hits"] == 0
    second = _run(tmp_path)
    assert second["misses"] == 0
    assert second["hits"] == first["misses"]
    for a, b in zip(first["params"], second["params"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
