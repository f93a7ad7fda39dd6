"""A training step compiled in one process is loaded from JAX's persistent
compilation cache in the next, and computes the same numbers.

Each process runs the default ODE `jpc.make_pc_step` on the same model and
batch, counting with `jax.monitoring` the compilations that consult the cache and
its hits and misses. The first process fills an empty cache; in the second, every
compilation must be a hit (JAX never writes a program holding a host callback to
the cache, so such a program would be compiled again, with neither a hit nor a
miss), and the parameters must be bitwise the same.
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
    events = {
        "/jax/compilation_cache/compile_requests_use_cache": "requests",
        "/jax/compilation_cache/cache_hits": "hits",
        "/jax/compilation_cache/cache_misses": "misses",
    }
    counts = dict.fromkeys(events.values(), 0)

    def listen(event, **kwargs):
        if event in events:
            counts[events[event]] += 1

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
    assert second["hits"] == second["requests"] == first["requests"] >= 1
    for a, b in zip(first["params"], second["params"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
