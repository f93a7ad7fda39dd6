"""`solve_inference(return_info=True)`: times, step counts, the steady-state flag;
half-precision activities keep an exact float32 time grid."""

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
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


# --------------------------------------------- the flag at every inference entry point


@pytest.mark.parametrize("max_t1", [0.01, 500])
def test_make_pc_step_flag_is_solve_inferences(max_t1):
    """`make_pc_step` reports the flag of the same solve done by hand; `None` with
    discrete inference (which has no stop)."""
    model, x, y, z = _linear_problem()
    optim = optax.sgd(0.0)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    _, info = jpc.solve_inference(
        (model, None), z, y, input=x, max_t1=max_t1, return_info=True
    )
    result = jpc.make_pc_step(model, optim, opt_state, y, input=x, max_t1=max_t1)
    assert bool(result["steady_state_reached"]) == bool(info.steady_state_reached)
    assert bool(info.steady_state_reached) == (max_t1 == 500)
    recorded = jpc.make_pc_step(
        model, optim, opt_state, y, input=x, max_t1=max_t1, record_energies=True
    )
    assert bool(recorded["steady_state_reached"]) == (max_t1 == 500)
    discrete = jpc.make_pc_step(
        model,
        optim,
        opt_state,
        y,
        input=x,
        activity_optim=optax.sgd(0.1),
        n_inference_steps=3,
    )
    assert discrete["steady_state_reached"] is None


def test_nudged_make_pc_step_flag_needs_every_phase():
    """Centred nudging solves twice (output precisions +β and −β): the flag is
    the conjunction of the two solves' flags, done by hand."""
    model, x, y, z = _linear_problem()
    optim = optax.sgd(0.0)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    beta = 0.5
    flags = []
    for sign in (1, -1):
        _, info = jpc.solve_inference(
            (model, None),
            z,
            y,
            input=x,
            max_t1=500,
            output_energy_scaling=sign * beta,
            return_info=True,
        )
        flags.append(bool(info.steady_state_reached))
    result = jpc.make_pc_step(
        model,
        optim,
        opt_state,
        y,
        input=x,
        max_t1=500,
        nudging="centred",
        beta=beta,
    )
    assert bool(result["steady_state_reached"]) == all(flags)


def _generative_problem():
    model = jpc.make_mlp(jr.PRNGKey(3), 3, 5, 2, 4, "linear")
    labels = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    images = jr.normal(jr.PRNGKey(4), (6, 4))
    return model, labels, images


@pytest.mark.parametrize("max_t1", [0.01, 500])
def test_test_generative_pc_info_is_solve_inferences(max_t1):
    """The info of `test_generative_pc` is that of `solve_inference` from the same
    random start with only the data clamped; discrete inference gives `None`."""
    model, labels, images = _generative_problem()
    key, sizes = jr.PRNGKey(5), [3, 5, 4]
    start = jpc.init_activities_from_normal(key, sizes, "unsupervised", 6, 0.05)
    final, info = jpc.solve_inference(
        (model, None), start, images, max_t1=max_t1, return_info=True
    )
    acc, _, got = jpc.test_generative_pc(
        model, images, labels, key, sizes, 6, max_t1=max_t1, return_info=True
    )
    assert bool(got.steady_state_reached) == bool(info.steady_state_reached)
    assert int(got.n_accepted_steps) == int(info.n_accepted_steps)
    expected = 100 * np.mean(
        np.argmax(np.asarray(final[0][-1]), 1) == np.argmax(np.asarray(labels), 1)
    )
    assert float(acc) == pytest.approx(expected)
    assert len(jpc.test_generative_pc(model, images, labels, key, sizes, 6)) == 2
    *_, none = jpc.test_generative_pc(
        model,
        images,
        labels,
        key,
        sizes,
        6,
        activity_optim=optax.sgd(0.1),
        n_inference_steps=2,
        return_info=True,
    )
    assert none is None


def test_hybrid_pc_flags_are_solve_inferences():
    """`make_hpc_step` and `test_hpc` report the flags of the solves from the
    amortised guesses (and, for `test_hpc`, from the random start), done by hand."""
    generator, labels, images = _generative_problem()
    amortiser = jpc.make_mlp(jr.PRNGKey(6), 4, 5, 2, 3, "linear")
    amortised = jpc.init_activities_with_amort(amortiser, generator, images)
    key, sizes = jr.PRNGKey(7), [3, 5, 4]
    random = jpc.init_activities_from_normal(key, sizes, "unsupervised", 6, 0.05)
    reference = {}
    # Loose tolerances at max_t1 = 500, so that the stop fires there.
    for max_t1, tol in ((0.01, None), (500, 0.1)):
        stop = dict(max_t1=max_t1, steady_state_rtol=tol, steady_state_atol=tol)
        for name, start in (("hybrid", amortised), ("random", random)):
            _, info = jpc.solve_inference(
                (generator, None), start, images, return_info=True, **stop
            )
            reference[name, max_t1] = bool(info.steady_state_reached)
        *_, (hybrid, generative) = jpc.test_hpc(
            generator,
            amortiser,
            images,
            labels,
            key,
            sizes,
            6,
            return_info=True,
            **stop,
        )
        assert bool(hybrid.steady_state_reached) == reference["hybrid", max_t1]
        assert bool(generative.steady_state_reached) == reference["random", max_t1]
        optim = optax.sgd(0.0)
        states = (
            optim.init((eqx.filter(generator, eqx.is_array), None)),
            optim.init(eqx.filter(amortiser, eqx.is_array)),
        )
        step = jpc.make_hpc_step(
            generator, amortiser, (optim, optim), states, images, **stop
        )
        assert bool(step["steady_state_reached"]) == reference["hybrid", max_t1]
    assert reference["hybrid", 500] and not reference["hybrid", 0.01]
