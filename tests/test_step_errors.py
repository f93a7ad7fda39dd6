"""When a training step reports a failed runtime check (`jpc.set_step_error_timing`).

By default a failed check of `make_pc_step` is raised at the next call, so that no
call waits for its step; with `"call"` it is raised at the failing call. Either
way the program holds no host callback (which would make JAX's CPU client run it
synchronously) when called directly.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc
from jpc import _jit


MESSAGE = "make_pc_step: the energy at the inferred activities is not finite."
LATER = "This check failed in the previous call of `make_pc_step`"


@pytest.fixture
def problem(key):
    k1, k2 = jr.split(jr.PRNGKey(3))
    x = jr.normal(k1, (16, 4))
    y = jnp.tanh(x @ jr.normal(k2, (4, 3)))
    model = jpc.make_mlp(key, 4, 16, 3, 3, "tanh")
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(model, eqx.is_array), None))

    def step(activity_lr, model=model):
        return jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            activity_optim=optax.sgd(activity_lr),
            n_inference_steps=5,
        )

    return step


@pytest.fixture
def timing():
    """Restore the module-level timing after the test."""
    previous = jpc.set_step_error_timing("next_call")
    yield
    jpc.set_step_error_timing(previous)


def weights(out):
    return [np.asarray(layer.layers[1].weight) for layer in out["model"]]


@pytest.mark.slow
def test_failed_step_is_raised_at_the_next_call(problem, timing):
    good = weights(problem(0.1))
    bad = problem(1e300)  # inference diverges; returns at once
    # The failing call's results are the non-finite ones the check is about.
    assert not all(np.isfinite(w).all() for w in weights(bad))
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"^{MESSAGE} \\({LATER}"):
        problem(0.1)
    # Reported once: the next calls run normally and give the same update as
    # before the failure (the same inputs, so bitwise the same program output).
    for _ in range(2):
        again = weights(problem(0.1))
        for a, b in zip(again, good):
            np.testing.assert_array_equal(a, b)


def test_call_timing_raises_at_the_failing_call(problem, timing):
    assert jpc.set_step_error_timing("call") == "next_call"
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"^{MESSAGE}$"):
        problem(1e300)
    problem(0.1)  # nothing left pending
    assert not _jit._pending


def test_pending_check_raised_at_the_next_call_after_switching(problem, timing):
    problem(1e300)
    jpc.set_step_error_timing("call")
    with pytest.raises(eqx.EquinoxRuntimeError, match=LATER):
        problem(0.1)


@pytest.mark.slow
def test_raise_pending_step_errors(problem, timing):
    problem(0.1)
    jpc.raise_pending_step_errors()  # the last call succeeded: nothing raised
    problem(1e300)
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"^{MESSAGE} \\({LATER}"):
        jpc.raise_pending_step_errors()
    jpc.raise_pending_step_errors()  # reported once
    problem(0.1)


@pytest.mark.parametrize("when", ["now", "", None, 1])
def test_set_step_error_timing_rejects_other_values(when, timing):
    with pytest.raises(ValueError, match='`when` must be "next_call" or "call"'):
        jpc.set_step_error_timing(when)
    assert jpc.set_step_error_timing("next_call") == "next_call"


def _cache(f):
    (cache,) = [
        c.cell_contents
        for c in f.__closure__
        if isinstance(c.cell_contents, dict) and c.cell_contents is not _jit._kinds
    ]
    return cache


def test_training_step_program_has_no_host_callback(problem, timing):
    """Called directly, the step never waits: its program holds no callback."""
    _cache(jpc.make_pc_step.jitted).clear()  # only this call's program is checked
    problem(0.1)
    entries = list(_cache(jpc.make_pc_step.jitted).values())
    assert len(entries) == 1 and all(wait is False for _, wait in entries)


def _checked(x):
    return _jit.error_if(x * 2, x > 0, "positive input")


def test_collected_check_raises_at_the_call_for_other_functions():
    f = _jit.lean_jit(_checked)
    np.testing.assert_array_equal(f(jnp.asarray(-1.0)), -2.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="^positive input$"):
        f(jnp.asarray(1.0))
    assert not _jit._pending
    ((_, wait),) = _cache(f).values()
    assert wait is False  # a flag output, not a callback


def test_collected_check_inside_outer_transformations():
    f = _jit.lean_jit(_checked)
    # Inside another `lean_jit`: the flag is passed on to the outer call.
    outer = _jit.lean_jit(lambda x: f(x) + 1)
    np.testing.assert_array_equal(outer(jnp.asarray(-1.0)), -1.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="^positive input$"):
        outer(jnp.asarray(1.0))
    # Inside `jax.jit` / `jax.vmap`: checked in the program (host callback).
    jitted = jax.jit(lambda x: f(x) + 1)
    np.testing.assert_array_equal(jitted(jnp.asarray(-1.0)), -1.0)
    with pytest.raises(Exception, match="positive input"):
        jax.block_until_ready(jitted(jnp.asarray(1.0)))
    g = _jit.lean_jit(jax.vmap(_checked))
    np.testing.assert_array_equal(g(jnp.asarray([-1.0, -2.0])), [-2.0, -4.0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="positive input"):
        g(jnp.asarray([-1.0, 2.0]))
