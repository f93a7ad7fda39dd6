"""The default ODE solve: Heun's method sharing each step's final field with the
steady-state stop (`jpc._infer.FieldCachingHeun` with `SteadyStateStop`).

References: `diffrax.Heun` itself, one step at a time, and the same solve with
`diffrax.Heun` and the stop as a `diffrax.Event` (a subclass of `diffrax.Heun`
takes that path): the same accepted steps, the same stop decision and the same
states to float32 round-off.
"""

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jpc
from jpc._infer import FieldCachingHeun, SteadyStateStop


class EventHeun(diffrax.Heun):
    """`diffrax.Heun` under another type: the solve uses the stop's `Event`."""


def _field(t, y, args):
    a, b = y
    a_drive = args * jnp.tanh(jnp.sum(b, axis=1, keepdims=True))
    return [-a + a_drive, -(b**3) - 0.5 * jnp.mean(a, axis=1, keepdims=True)]


def test_one_step_equals_diffrax_heun():
    """y1, the error estimate and the dense output equal `diffrax.Heun`'s step;
    the returned state is the field at y1."""
    term = diffrax.ODETerm(_field)
    y0 = [jr.normal(jr.PRNGKey(0), (3, 4)), jr.normal(jr.PRNGKey(1), (3, 2))]
    args = jnp.asarray(0.7)
    t0, t1 = jnp.asarray(0.2), jnp.asarray(0.45)
    heun = diffrax.Heun()
    want = heun.step(term, t0, t1, y0, args, heun.init(term, t0, t1, y0, args), False)
    ours = FieldCachingHeun()
    state = ours.init(term, t0, t1, y0, args)
    got = ours.step(term, t0, t1, y0, args, state, False)
    for g, w in zip(got[:3], want[:3], strict=True):
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got[3], _field(t1, got[0], args), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert ours.order(term) == heun.order(term)
    assert ours.error_order(term) == heun.error_order(term)


def test_stop_controller_passes_the_controller_through():
    """With a test that never fires, the wrapped PID controller's decisions are
    returned unchanged; with one that always fires, only the result changes, and
    only on an accepted step."""
    pid = diffrax.PIDController(rtol=1e-3, atol=1e-3)
    y0 = [jnp.ones((2, 3))]
    y1 = [jnp.full((2, 3), 1.01)]
    t0, t1 = jnp.asarray(0.0), jnp.asarray(0.1)
    term = diffrax.ODETerm(lambda t, y, args: [-z for z in y])
    _, state = pid.init(term, t0, t1, y0, 0.1, None, FieldCachingHeun().func, 3)
    for error, kept in ((1e-5, True), (1.0, False)):
        y_error = [jnp.full((2, 3), error)]
        args = (t0, t1, y0, y1, None, y_error, 3, state)
        want = pid.adapt_step_size(*args)
        assert bool(want[0]) == kept
        never = SteadyStateStop(pid, lambda t, y, a: (y, jnp.array(False)))
        always = SteadyStateStop(pid, lambda t, y, a: (y, jnp.array(True)))
        for got, result in (
            (never.adapt_step_size(*args), want[-1]),
            (always.adapt_step_size(*args), diffrax.RESULTS.event_occurred),
        ):
            for g, w in zip(got[:-1], want[:-1], strict=True):
                assert jnp.array_equal(g, w)
            assert got[-1] == (result if kept else want[-1])


def _problem(width, depth, act, batch, seed):
    model = jpc.make_mlp(jr.PRNGKey(seed), 12, width, depth, 5, act)
    x = jr.normal(jr.PRNGKey(seed + 1), (batch, 12))
    y = jax.nn.one_hot(jnp.arange(batch) % 5, 5)
    return model, x, y


def _both(model, x, y, **kw):
    acts = jpc.init_activities_with_ffwd(model, x)
    return [
        jpc.solve_inference(
            (model, None), acts, y, input=x, solver=s, return_info=True, **kw
        )
        for s in (diffrax.Heun(), EventHeun())
    ]


def _assert_same(ours, reference, atol):
    (zs, info), (ref, ref_info) = ours, reference
    assert int(info.n_accepted_steps) == int(ref_info.n_accepted_steps)
    assert bool(info.steady_state_reached) == bool(ref_info.steady_state_reached)
    np.testing.assert_allclose(info.times, ref_info.times, rtol=1e-5)
    for a, b in zip(zs, ref, strict=True):
        assert a.shape == b.shape
        both_inf = jnp.isinf(a) & jnp.isinf(b)  # unused rows of a trajectory
        np.testing.assert_allclose(
            jnp.where(both_inf, 0, a), jnp.where(both_inf, 0, b), rtol=0, atol=atol
        )


# (width, depth, activation, batch, seed, options, whether the stop fires)
CASES = [
    (8, 3, "tanh", 4, 0, dict(max_t1=2000), True),  # stops at its stability limit
    (8, 3, "tanh", 4, 0, dict(max_t1=20), False),  # horizon first
    (32, 4, "tanh", 8, 2, dict(max_t1=500), True),
    (8, 3, "tanh", 4, 0, dict(max_t1=2000, record_iters=True), True),
    (8, 3, "tanh", 4, 0, dict(max_t1=200, record_every=10.0), True),
    (8, 3, "relu", 4, 1, dict(max_t1=50, steady_state_rtol=1e-6), False),
]


@pytest.mark.parametrize("width,depth,act,batch,seed,options,fires", CASES)
@pytest.mark.slow
def test_solve_equals_heun_with_stop_event(
    width, depth, act, batch, seed, options, fires
):
    ours, reference = _both(*_problem(width, depth, act, batch, seed), **options)
    assert bool(reference[1].steady_state_reached) == fires
    _assert_same(ours, reference, atol=2e-6)


@pytest.mark.parametrize("options", [{}, dict(record_every=10.0)])
@pytest.mark.slow
def test_steady_at_the_start_takes_no_step(options):
    """Targets equal to the feedforward prediction: the field is zero at t = 0,
    so both paths stop there, with no step, at the initial state (with save
    times, the rows after it unused)."""
    model, x, _ = _problem(8, 3, "tanh", 4, 0)
    y = jpc.init_activities_with_ffwd(model, x)[-1]
    ours, reference = _both(model, x, y, max_t1=50, **options)
    _assert_same(ours, reference, atol=0)
    assert int(ours[1].n_accepted_steps) == 0
    assert bool(ours[1].steady_state_reached)
    start = jpc.init_activities_with_ffwd(model, x)
    np.testing.assert_array_equal(ours[0][0][0], start[0])


@pytest.mark.slow
def test_make_pc_step_equals_heun_with_stop_event():
    """The whole default step (ODE inference, then the parameter update)."""
    import equinox as eqx
    import optax

    model, x, y = _problem(16, 3, "tanh", 8, 3)
    optim = optax.adam(1e-2)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    results = [
        jpc.make_pc_step(model, optim, state, y, input=x, ode_solver=s, max_t1=200)
        for s in (diffrax.Heun(), EventHeun())
    ]
    assert bool(results[0]["steady_state_reached"]) == bool(
        results[1]["steady_state_reached"]
    )
    leaves = [jax.tree.leaves(eqx.filter(r["model"], eqx.is_array)) for r in results]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_steady_at_the_start_records_the_initial_state():
    """With `record_iters`, a solve that takes no step returns the initial state
    as row 0 (`t_max` = 0), on both paths; so does `make_pc_step` with
    `record_activities`, whose recorded energies there are the layer energies of
    the initial state (all 0: every error is 0 at a feedforward state that
    predicts its target)."""
    import equinox as eqx
    import optax

    model, x, _ = _problem(8, 3, "tanh", 4, 0)
    start = jpc.init_activities_with_ffwd(model, x)
    y = start[-1]
    for zs, info in _both(model, x, y, max_t1=50, record_iters=True):
        assert int(info.n_accepted_steps) == 0
        assert int(jpc.get_t_max(zs)) == 0
        assert float(info.times[0]) == 0.0  # row 0 is at t = 0
        assert bool(jnp.all(jnp.isinf(info.times[1:])))
        for row, z in zip(zs, start, strict=True):
            np.testing.assert_array_equal(row[0], z)
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    result = jpc.make_pc_step(
        model,
        optim,
        state,
        y,
        input=x,
        record_activities=True,
        record_energies=True,
    )
    jpc.raise_pending_step_errors()
    assert int(result["t_max"]) == 0
    np.testing.assert_array_equal(result["activities"][0][0], start[0])
    np.testing.assert_array_equal(result["energies"][:, 0], 0.0)
    assert bool(result["steady_state_reached"])


@pytest.mark.parametrize("options", [{}, dict(record_iters=True)])
@pytest.mark.slow
def test_steady_at_the_start_under_vmap_equals_one_solve_each(options):
    """Under `jax.vmap` over the targets, the instance steady at its start takes
    no step while the other runs on: each equals its own solve."""
    model, x, y = _problem(8, 3, "tanh", 4, 0)
    acts = jpc.init_activities_with_ffwd(model, x)

    def solve(target):
        return jpc.solve_inference(
            (model, None), acts, target, input=x, max_t1=50, return_info=True, **options
        )

    targets = jnp.stack([acts[-1], y])  # the first is the feedforward prediction
    batched = jax.vmap(solve)(targets)
    for i, target in enumerate(targets):
        ours = jax.tree.map(lambda a, i=i: a[i], batched)
        _assert_same(ours, solve(target), atol=1e-6)
    assert int(batched[1].n_accepted_steps[0]) == 0
    assert int(batched[1].n_accepted_steps[1]) > 0


@pytest.mark.slow
def test_the_compiled_solve_keeps_t1_constant():
    """diffrax rounds `t1` down by 100 ULPs with 100 `nextafter`s; with a
    constant `t1` XLA folds them away, with a traced one they stay in the
    compiled program (one long scalar kernel). The default solve keeps `t1`
    constant, a solve steady at the start included; the reference is the same
    diffrax solve with a traced `t1`, where the chain does appear."""
    model, x, y = _problem(8, 3, "tanh", 4, 0)
    acts = jpc.init_activities_with_ffwd(model, x)

    def solve(target):
        return jpc.solve_inference((model, None), acts, target, input=x, max_t1=20)

    def traced(t1):
        term = diffrax.ODETerm(lambda t, z, args: -z)
        controller = diffrax.PIDController(rtol=1e-3, atol=1e-3)
        return diffrax.diffeqsolve(
            term, diffrax.Heun(), 0.0, t1, None, jnp.ones(3),
            stepsize_controller=controller,
        ).ys  # fmt: skip

    def rounding_ops(fn, *args):
        return jax.jit(fn).lower(*args).compile().as_text().count("nextafter")

    assert rounding_ops(traced, jnp.float32(20.0)) >= 100
    assert rounding_ops(solve, y) < 10
