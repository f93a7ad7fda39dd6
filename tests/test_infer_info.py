"""`solve_inference(return_info=True)`: times, step counts, the steady-state flag;
half-precision activities keep an exact float32 time grid."""

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jpc
from jpc import _infer


# Each test compiles a few ODE solves (several seconds each on a small CPU).
pytestmark = pytest.mark.slow


def _linear_problem(dtype=jnp.float32):
    model = jpc.make_mlp(jr.PRNGKey(0), 4, 6, 3, 2, "linear")
    model = jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model
    )
    x = jr.normal(jr.PRNGKey(1), (5, 4), dtype)
    y = jr.normal(jr.PRNGKey(2), (5, 2), dtype)
    return model, x, y, jpc.init_activities_with_ffwd(model, x)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The resolution warning is given once per dtype: start from none given."""
    monkeypatch.setattr(_infer, "_WARNED_RESOLUTION", set())


def test_default_return_is_unchanged():
    model, x, y, z = _linear_problem()
    plain = jpc.solve_inference((model, None), z, y, input=x)
    got, info = jpc.solve_inference((model, None), z, y, input=x, return_info=True)
    assert isinstance(plain, list) and isinstance(info, jpc.InferenceInfo)
    for a, b in zip(plain, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info.times.shape == (1,)


def test_record_iters_times_and_step_count():
    """Constant step 0.05 to t = 1 with the stop out of reach: row k is the state
    after step k + 1, at time 0.05 (k + 1); 20 accepted steps, 20 rows."""
    model, x, y, z = _linear_problem()
    out, info = jpc.solve_inference(
        (model, None),
        z,
        y,
        input=x,
        max_t1=1.0,
        dt=0.05,
        stepsize_controller=diffrax.ConstantStepSize(),
        record_iters=True,
        steady_state_rtol=1e-12,
        steady_state_atol=1e-12,
        return_info=True,
    )
    n = int(info.n_accepted_steps)
    assert n == 20
    assert n == int(jpc.get_t_max(out)) + 1  # rows up to t_max
    assert int(jnp.sum(jnp.isfinite(info.times))) == n
    np.testing.assert_allclose(info.times[:n], 0.05 * np.arange(1, 21), rtol=1e-6)
    assert not bool(info.steady_state_reached)
    # the rows and times of an independent diffrax solve of the same field
    args = ((model, None), y, x, "mse", "sp", 0.0, 0.0, 0.0)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(jpc.neg_pc_activity_grad),
        diffrax.Heun(),
        0.0,
        1.0,
        0.05,
        z,
        args=args,
        saveat=diffrax.SaveAt(steps=True),
    )
    np.testing.assert_allclose(info.times[:n], sol.ts[:n], rtol=1e-6)
    np.testing.assert_allclose(out[1][:n], sol.ys[1][:n], rtol=1e-5, atol=1e-6)


def test_steady_state_flag_on_a_converged_linear_problem():
    """Reached: the state is the closed-form equilibrium; not reached when
    `max_t1` is too short (the solve ends at `max_t1`)."""
    model, x, y, z = _linear_problem()
    exact = jpc.compute_linear_activity_solution(model, x, y)
    got, info = jpc.solve_inference(
        (model, None), z, y, input=x, max_t1=500, return_info=True
    )
    assert bool(info.steady_state_reached)
    assert 0 < float(info.times[-1]) < 500
    for a, b in zip(got[:-1], exact[:-1], strict=True):
        np.testing.assert_allclose(a[-1], b, atol=5e-3)
    short, info = jpc.solve_inference(
        (model, None), z, y, input=x, max_t1=0.01, return_info=True
    )
    assert not bool(info.steady_state_reached)
    assert float(info.times[-1]) == pytest.approx(0.01)
    assert int(info.n_accepted_steps) >= 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_keeps_an_exact_time_grid(dtype, fresh_warnings):
    """400 steps of 0.05 to t = 20 (bfloat16 times used to give 234 steps ending
    at 8.2): float32 times, the `record_every` rows at `np.arange`, the results in
    the activities' dtype."""
    model, x, y, z = _linear_problem(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stop is switched off on purpose
        out, info = jpc.solve_inference(
            (model, None),
            z,
            y,
            input=x,
            max_t1=20.0,
            dt=0.05,
            stepsize_controller=diffrax.ConstantStepSize(),
            record_every=0.05,
            steady_state_rtol=1e-30,
            steady_state_atol=1e-30,
            return_info=True,
        )
    assert info.times.dtype == jnp.float32
    assert int(info.n_accepted_steps) == 400
    grid = np.arange(0, 20.0, 0.05).astype(np.float32)
    assert info.times.shape == (401,)
    np.testing.assert_array_equal(np.asarray(info.times[:400]), grid)
    assert float(info.times[400]) == 20.0
    assert {a.dtype for a in out} == {jnp.dtype(dtype)}
    assert out[0].shape[0] == 401


def test_half_precision_stop_warns_once_below_resolution(fresh_warnings):
    model, x, y, z = _linear_problem(jnp.bfloat16)
    with pytest.warns(UserWarning, match="steady_state_rtol.*bfloat16.*eps=0.00781"):
        jpc.solve_inference((model, None), z, y, input=x, max_t1=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        jpc.solve_inference((model, None), z, y, input=x, max_t1=2.0)
        # tolerances at the resolution: no warning
        jpc.solve_inference(
            (model, None),
            z,
            y,
            input=x,
            max_t1=1.0,
            steady_state_rtol=1e-2,
            steady_state_atol=1e-2,
        )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_no_resolution_warning_for_the_default_in_wider_types(dtype, fresh_warnings):
    """float16's epsilon (9.8e-4) is below the default 1e-3: no warning."""
    model, x, y, z = _linear_problem(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jpc.solve_inference((model, None), z, y, input=x, max_t1=1.0)
