"""The installed XLA computes the reductions `jpc` is made of.

jaxlib 0.10.2 miscompiles, on CPU, some per-row sums of squares that XLA fuses with
the matrix product before them, and returns wrong values without an error
(https://github.com/jax-ml/jax/issues/39103); `jpc` excludes that release and warns
when it is installed anyway. PC energies, the steady-state stop's per-example ratios
and per-example losses are all of that form. The first two tests check the installed
jaxlib for that fault and fail on jaxlib 0.10.2.
"""

import importlib.metadata
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jpc
from jpc import _compat, _infer


@pytest.mark.parametrize("dtype, n", [(jnp.float32, 32_769), (jnp.float64, 16_385)])
def test_rowwise_sum_of_squares_after_a_matrix_product(dtype, n):
    """The smallest program of that form: each row of `x @ I` squared and summed.

    With rows `(i, 0, 0)` the result is `i**2`; the last, `(n - 1)**2`, is a power
    of two, exact in either dtype, so jit and the closed form must agree exactly.
    """
    i = jnp.arange(n, dtype=dtype)
    x = jnp.stack([i, jnp.zeros_like(i), jnp.zeros_like(i)], axis=1)
    matrix = jnp.eye(3, dtype=dtype)

    def rowwise(x):
        return jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2))(x)

    out = np.asarray(jax.jit(rowwise)(x))
    np.testing.assert_allclose(out, np.arange(n, dtype=np.float64) ** 2, rtol=1e-6)
    assert out[-1] == float(n - 1) ** 2


@pytest.mark.slow
def test_stop_under_vmap_over_states_equals_one_state_at_a_time():
    """The stop's test, mapped over states with `jax.vmap` under `jax.jit`.

    The states are the last two of an ODE solve on a 784-300-300-10 tanh network in
    float32; the line-search check's step is within the tolerance at the second
    only, so mapped, its `jax.lax.cond` becomes a select between branches. Each
    state must get the ratio and the decision it gets alone, and the ratio computed
    op by op (`jax.disable_jit`, nothing fused). (jaxlib 0.10.2 gives the last state
    a line-search ratio of about 1100 against 0.88 alone, so the mapped stop does not
    fire.)
    """
    kmodel, kx, ky = jr.split(jr.PRNGKey(0), 3)
    f32 = jnp.float32
    model = jpc.make_mlp(kmodel, 784, 300, 3, 10, "tanh", use_bias=True)
    model = jax.tree.map(
        lambda a: a.astype(f32) if eqx.is_inexact_array(a) else a, model
    )
    x = jr.normal(kx, (64, 784), f32)
    y = jax.nn.one_hot(jr.randint(ky, (64,), 0, 10), 10, dtype=f32)
    activities = jpc.init_activities_with_ffwd(model, x)
    rows, info = jpc.solve_inference(
        (model, None), activities, y, input=x, max_t1=2000.0, record_iters=True,
        return_info=True, max_steps=1024,
    )  # fmt: skip
    n = int(info.n_accepted_steps)
    assert all(r.dtype == f32 for r in rows)
    rtol = atol = 1e-3
    test = _infer.steady_state_test(rtol, atol)

    def args_of(model, x, y):
        return ((model, None), y, x, "mse", "sp", 0.0, 0.0, 0.0)

    def ratio(z, model, x, y):
        args = args_of(model, x, y)
        field = jpc.neg_pc_activity_grad(None, z, args)
        return _infer.polished_ratio(z, field, args, rtol, atol)

    def decision(z, model, x, y):
        return test(None, z, args_of(model, x, y))[1]

    data = (model, x, y)
    alone = [[r[k] for r in rows] for k in (n - 2, n - 1)]
    # `eqx.filter_jit`: the arrays of the model and data are arguments, not constants
    ratios_alone = np.array([float(eqx.filter_jit(ratio)(z, *data)) for z in alone])
    decisions_alone = np.array(
        [bool(eqx.filter_jit(decision)(z, *data)) for z in alone]
    )
    with jax.disable_jit():
        ratios_unfused = np.array([float(ratio(z, *data)) for z in alone])
    np.testing.assert_allclose(ratios_alone, ratios_unfused, rtol=1e-3)
    assert ratios_alone[0] > 1 and ratios_alone[1] <= 1 and decisions_alone[1], (
        "precondition on the solve's trajectory (not the compiler): the line-search "
        f"ratio must pass at the last state only, got {ratios_alone}"
    )

    states = [jnp.stack([r[n - 2], r[n - 1]]) for r in rows]

    def mapped(fn):
        return eqx.filter_jit(lambda zs, *d: jax.vmap(lambda z: fn(z, *d))(zs))

    np.testing.assert_allclose(
        np.asarray(mapped(ratio)(states, *data)), ratios_alone, rtol=1e-3
    )
    np.testing.assert_array_equal(
        np.asarray(mapped(decision)(states, *data)), decisions_alone
    )


def test_warns_on_jaxlib_0_10_2_unless_the_fusion_is_off(monkeypatch):
    """The import-time check: a warning naming the release and the XLA flag."""
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.warns(UserWarning, match=r"jaxlib 0\.10\.2.*ynn_fusion_type=-reduce"):
        _compat.check_jaxlib()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_jaxlib()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.1")
    monkeypatch.delenv("XLA_FLAGS")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_jaxlib()
