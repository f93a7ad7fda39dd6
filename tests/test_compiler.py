"""The installed XLA computes the reductions `jpc` is made of.

jaxlib 0.10.2 miscompiles, on CPU, a per-row sum of squares that XLA fuses with the
matrix product before it, and returns wrong values without an error
(https://github.com/jax-ml/jax/issues/39103); `jpc` excludes that release. PC
energies, the steady-state stop's per-example ratios and per-example losses are
all of that form. These tests fail on it.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jpc
from jpc import _infer


def test_rowwise_sum_of_squares_after_a_matrix_product():
    """The smallest program of that form: each row of `x @ I` squared and summed.

    With rows `(i, 0, 0)` the result is `i**2`; at `i = 32768` that is `2**30`,
    exact in float32, so jit and the closed form must agree exactly.
    """
    n = 32_769
    i = jnp.arange(n, dtype=jnp.float32)
    x = jnp.stack([i, jnp.zeros_like(i), jnp.zeros_like(i)], axis=1)
    matrix = jnp.eye(3, dtype=jnp.float32)

    def rowwise(x):
        return jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2))(x)

    out = np.asarray(jax.jit(rowwise)(x))
    np.testing.assert_allclose(out, np.arange(n, dtype=np.float64) ** 2, rtol=1e-6)
    assert out[-1] == 2.0**30


@pytest.mark.slow
def test_stop_under_vmap_over_states_equals_one_state_at_a_time():
    """The stop's test, mapped over states with `jax.vmap` under `jax.jit`.

    The states are the last two of an ODE solve on a 784-300-300-10 tanh network;
    the line-search check's step is within the tolerance at the second only, so
    mapped, its `jax.lax.cond` becomes a select between branches. Each state must
    get the ratio and the decision it gets alone. (jaxlib 0.10.2 gave the last state a
    line-search ratio of about 1027 against 0.64 alone, so the mapped stop did not
    fire.)
    """
    kmodel, kx, ky = jr.split(jr.PRNGKey(0), 3)
    model = jpc.make_mlp(kmodel, 784, 300, 3, 10, "tanh", use_bias=True)
    x = jr.normal(kx, (64, 784))
    y = jax.nn.one_hot(jr.randint(ky, (64,), 0, 10), 10)
    activities = jpc.init_activities_with_ffwd(model, x)
    rows, info = jpc.solve_inference(
        (model, None),
        activities,
        y,
        input=x,
        max_t1=2000.0,
        record_iters=True,
        return_info=True,
        max_steps=1024,
    )
    n = int(info.n_accepted_steps)
    states = [jnp.stack([r[n - 2], r[n - 1]]) for r in rows]
    args = ((model, None), y, x, "mse", "sp", 0.0, 0.0, 0.0)
    rtol = atol = 1e-3
    test = _infer.steady_state_test(rtol, atol)

    def ratio(z):
        field = jpc.neg_pc_activity_grad(None, z, args)
        return _infer.polished_ratio(z, field, args, rtol, atol)

    def decision(z):
        return test(None, z, args)[1]

    alone = [[r[k] for r in rows] for k in (n - 2, n - 1)]
    ratios_alone = np.array([float(jax.jit(ratio)(z)) for z in alone])
    decisions_alone = np.array([bool(jax.jit(decision)(z)) for z in alone])
    # the line-search step is within the tolerance at the last state only, so the
    # mapped check takes a different branch for each state
    assert ratios_alone[0] > 1 and ratios_alone[1] <= 1 and decisions_alone[1]

    np.testing.assert_allclose(
        np.asarray(jax.jit(jax.vmap(ratio))(states)), ratios_alone, rtol=1e-3
    )
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jax.vmap(decision))(states)), decisions_alone
    )
