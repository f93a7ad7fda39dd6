"""Inference (SPEC §4): ODE and discrete paths against an independent Newton solve of
the reference energy, energy monotonicity, the steady-state stop (§11.1), recording
(§11.10) and per-layer energies along trajectories (§11.5)."""

import dataclasses
import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    free_slice,
    random_problem,
    ref_activity_grads,
    ref_equilibrium,
    ref_layer_energies,
)

import jpc


WIDTHS = [3, 4, 4, 4, 2]
TIGHT = diffrax.PIDController(rtol=1e-10, atol=1e-10)


def solve(p, activities=None, **kw):
    acts = p.ffwd() if activities is None else activities
    return jpc.solve_inference(
        p.params,
        acts,
        p.y,
        input=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        **kw,
    )


def final(iters):
    return [a[-1] for a in iters]


def _rms(arrays):
    flat = jnp.concatenate([a.ravel() for a in arrays])
    return float(jnp.sqrt(jnp.mean(flat**2)))


# ------------------------------------------------------------------ output format


@pytest.mark.slow
def test_solve_inference_default_returns_length_one_time_axis(key):
    p = random_problem(key, WIDTHS, 3)
    out = solve(p)
    assert len(out) == p.L
    for a, z in zip(out, p.ffwd(), strict=True):
        assert a.shape == (1,) + z.shape
    # inference moved the hidden activities and lowered the energy
    assert float(p.ref(final(out))) < float(p.ref(p.ffwd()))


# ------------------------------------------------------------------ equilibrium


@pytest.mark.parametrize(
    "param_type,skip,loss,gamma",
    [("sp", False, "mse", None), ("mupc", True, "ce", 2.0)],
)
@pytest.mark.slow
def test_ode_reaches_reference_equilibrium(key, param_type, skip, loss, gamma):
    p = random_problem(
        key, WIDTHS, 3, skip=skip, param_type=param_type, loss=loss, gamma=gamma
    )
    eq = ref_equilibrium(p)
    out = solve(
        p,
        solver=diffrax.Tsit5(),
        stepsize_controller=TIGHT,
        max_t1=2000,
        max_steps=100_000,
    )
    for i in free_slice(p):
        np.testing.assert_allclose(out[i][-1], eq[i], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_ode_equilibrium_with_regularisers_and_lambda(key):
    p = random_problem(key, WIDTHS, 3, param_type="ntp", skip=True, gamma=0.7)
    reg = dict(weight_decay=0.1, spectral_penalty=0.1, activity_decay=0.3)
    eq = ref_equilibrium(p, lam=0.4, **reg)
    out = solve(
        p,
        solver=diffrax.Tsit5(),
        stepsize_controller=TIGHT,
        max_t1=2000,
        max_steps=100_000,
        output_energy_scaling=0.4,
        **reg,
    )
    for i in free_slice(p):
        np.testing.assert_allclose(out[i][-1], eq[i], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_ode_constant_step_reaches_equilibrium(key):
    p = random_problem(key, WIDTHS, 3)
    eq = ref_equilibrium(p)
    out = solve(
        p,
        solver=diffrax.Heun(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt=0.05,
        max_t1=200,
        max_steps=10_000,
    )
    # a constant step has no tolerances: the stop uses 1e-3, so the final state meets
    # rms(∂F/∂z) < 1e-3 + 1e-3·rms(z) and is much closer to equilibrium than ffwd
    idx = free_slice(p)
    last = final(out)
    g = ref_activity_grads(p, last)
    assert p.B * _rms([g[i] for i in idx]) < 1e-3 + 1e-3 * _rms([last[i] for i in idx])
    ffwd = p.ffwd()
    d_end = _rms([last[i] - eq[i] for i in idx])
    d_start = _rms([ffwd[i] - eq[i] for i in idx])
    assert d_end < 0.1 * d_start


def _discrete(p, optim, n_steps, activities=None, **kw):
    acts = p.ffwd() if activities is None else list(activities)
    opt_state = optim.init(acts)
    energies = []
    for _ in range(n_steps):
        res = jpc.update_pc_activities(
            p.params,
            acts,
            optim,
            opt_state,
            p.y,
            input=p.x,
            loss_id=p.loss,
            param_type=p.param_type,
            gamma=p.gamma,
            **kw,
        )
        energies.append(float(res["energy"]))
        acts, opt_state = list(res["activities"]), res["opt_state"]
    return acts, np.asarray(energies)


@pytest.mark.parametrize("param_type,skip", [("sp", False), ("mupc", True)])
@pytest.mark.slow
def test_discrete_and_ode_reach_same_equilibrium(key, param_type, skip):
    """ODE (tight tolerances) and many small SGD steps agree with each other and
    with the Newton solution. SGD's lr is proportional to B (gradients scale 1/B)."""
    B = 3
    p = random_problem(key, WIDTHS, B, skip=skip, param_type=param_type)
    eq = ref_equilibrium(p)
    # smallest Hessian eigenvalue of the batch energy is ~0.03 here: 1500 steps
    disc, _ = _discrete(p, optax.sgd(0.3 * B), 1500)
    ode = final(
        solve(
            p,
            solver=diffrax.Tsit5(),
            stepsize_controller=TIGHT,
            max_t1=2000,
            max_steps=100_000,
        )
    )
    for i in free_slice(p):
        np.testing.assert_allclose(disc[i], eq[i], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(ode[i], disc[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "supervised,loss,param_type",
    [(True, "mse", "sp"), (True, "ce", "mupc"), (False, "mse", "sp")],
)
def test_energy_decreases_monotonically_for_small_steps(
    key, supervised, loss, param_type
):
    B = 4
    p = random_problem(
        key, WIDTHS, B, supervised, skip=True, loss=loss, param_type=param_type
    )
    start = p.ffwd() if supervised else p.activities
    _, energies = _discrete(p, optax.sgd(0.05 * B), 60, activities=start)
    assert np.all(np.diff(energies) <= 1e-12), energies
    assert energies[-1] < energies[0]
    # the returned pre-step energy is the reference energy at the starting state
    np.testing.assert_allclose(energies[0], p.ref(start), rtol=1e-10)


@pytest.mark.slow
def test_ode_trajectory_energy_monotone(key):
    p = random_problem(key, WIDTHS, 3, skip=True, param_type="mupc")
    iters = solve(
        p,
        solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        max_t1=100,
        record_iters=True,
        max_steps=2000,
    )
    t_max = int(jpc.get_t_max(iters))
    assert t_max > 2
    # Rows are the states after each accepted step (no initial-state row), so the
    # energy starts below that of the feedforward state and keeps decreasing.
    energies = [float(p.ref(p.ffwd()))]
    energies += [float(p.ref([a[t] for a in iters])) for t in range(t_max + 1)]
    assert np.all(np.diff(energies) <= 1e-12), energies
    assert energies[1] < energies[0]
    for a in iters:
        assert np.all(np.isfinite(a[: t_max + 1]))
        assert np.all(np.isinf(a[t_max + 1 :]))


@pytest.mark.slow
def test_unsupervised_ode_lowers_energy(key):
    p = random_problem(key, WIDTHS, 3, supervised=False, param_type="mupc")
    out = final(solve(p, activities=p.activities, max_t1=50))
    assert float(p.ref(out)) < 0.5 * float(p.ref())
    # z_0 is free in unsupervised mode: it moved
    assert not np.allclose(out[0], p.activities[0])


# ------------------------------------------------------------------ steady state


def _steady(p, t1, **kw):
    return solve(
        p,
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt=0.5,
        max_t1=t1,
        record_iters=True,
        **kw,
    )


@pytest.mark.slow
def test_steady_state_stop_fires(key):
    """§11.1: with 4000 fixed steps available the solve stops long before the end,
    at a state where rms(B·∂F/∂z) < atol + rtol·rms(z) (1e-3 for a constant step);
    B·∂F/∂z is the per-example field, since F is a batch mean."""
    p = random_problem(key, WIDTHS, 3)
    iters = _steady(p, 2000, max_steps=4100)
    t_max = int(jpc.get_t_max(iters))
    assert t_max < 1000, t_max
    last = [a[t_max] for a in iters]
    idx = free_slice(p)
    g = ref_activity_grads(p, last)
    assert p.B * _rms([g[i] for i in idx]) < 1e-3 + 1e-3 * _rms([last[i] for i in idx])
    # the previous state had not yet met the criterion (the stop is not premature
    # by more than one step), checked with a generous margin
    prev = [a[max(t_max - 5, 0)] for a in iters]
    gp = ref_activity_grads(p, prev)
    assert p.B * _rms([gp[i] for i in idx]) > 0.5 * (
        1e-3 + 1e-3 * _rms([prev[i] for i in idx])
    )
    # a longer horizon changes nothing: the stop, not t1, ended the solve
    longer = _steady(p, 4000, max_steps=8100)
    assert int(jpc.get_t_max(longer)) == t_max
    assert_trees_close(final([a[: t_max + 1] for a in longer]), last, rtol=1e-12)


@pytest.mark.slow
def test_steady_state_stop_is_per_example(key):
    """Repeating a batch k times divides every example's field by k (F is a batch
    mean); with the time step multiplied by k the Euler iterates are unchanged, and
    so must be the stop. A threshold on the batch-mean field would instead stop a
    large batch at t = 0, before any inference."""
    p = random_problem(key, WIDTHS, 3)
    k = 32
    iters = _steady(p, 2000, max_steps=4100)
    t_max = int(jpc.get_t_max(iters))
    assert t_max > 0
    big = dataclasses.replace(p, x=jnp.tile(p.x, (k, 1)), y=jnp.tile(p.y, (k, 1)))
    big_iters = solve(
        big,
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt=0.5 * k,
        max_t1=2000 * k,
        record_iters=True,
        max_steps=4100,
    )
    assert int(jpc.get_t_max(big_iters)) == t_max
    assert_trees_close(
        [a[t_max, : p.B] for a in big_iters], [a[t_max] for a in iters], rtol=1e-10
    )


@pytest.mark.slow
def test_steady_state_stop_fires_with_adaptive_controller(key):
    p = random_problem(key, WIDTHS, 3)
    kw = dict(
        stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4),
        record_iters=True,
        max_steps=4096,
    )
    a = solve(p, max_t1=1e4, **kw)
    b = solve(p, max_t1=1e6, **kw)
    ta, tb = int(jpc.get_t_max(a)), int(jpc.get_t_max(b))
    assert ta == tb
    assert_trees_close([x[ta] for x in a], [x[tb] for x in b], rtol=1e-12)
    # default (non-recording) call returns the same final state
    c = solve(p, max_t1=1e6, stepsize_controller=kw["stepsize_controller"])
    assert_trees_close([x[0] for x in c], [x[ta] for x in a], rtol=1e-10)


@pytest.mark.slow
def test_max_steps_exceeded_raises(key):
    p = random_problem(key, WIDTHS, 3)
    with pytest.raises(Exception, match="max_steps") as info:
        out = solve(
            p,
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            max_t1=1000,
            max_steps=4,
        )
        jax.block_until_ready(out)
    assert "max_steps" in str(info.value)


# ------------------------------------------------------------------ recording


@pytest.mark.slow
def test_record_every_rows(key):
    """States saved at t = 0, k, 2k, ... plus the final state (SPEC §4.1)."""
    p = random_problem(key, WIDTHS, 3)
    kw = dict(solver=diffrax.Tsit5(), stepsize_controller=TIGHT, max_steps=10_000)
    rec = solve(p, max_t1=6, record_every=2, **kw)
    n_rows = rec[0].shape[0]
    assert 4 <= n_rows <= 5  # t = 0, 2, 4, (6), final: never a max_steps buffer
    assert_trees_close([a[0] for a in rec], p.ffwd(), rtol=1e-12, check_structure=False)
    at2 = final(solve(p, max_t1=2, **kw))
    at4 = final(solve(p, max_t1=4, **kw))
    at6 = final(solve(p, max_t1=6, **kw))
    for i in free_slice(p):
        np.testing.assert_allclose(rec[i][1], at2[i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(rec[i][2], at4[i], rtol=1e-6, atol=1e-7)
    assert_trees_close(final(rec), at6, rtol=1e-9, check_structure=False)


@pytest.mark.slow
def test_record_every_after_early_stop(key):
    """After an early stop the final state is kept (as the last valid row, found by
    get_t_max) and the later rows are inf."""
    p = random_problem(key, WIDTHS, 3)
    rec = solve(p, max_t1=10_000, record_every=50, max_steps=10_000)
    default = final(solve(p, max_t1=10_000, max_steps=10_000))
    assert rec[0].shape[0] <= 10_000 // 50 + 2
    t_max = int(jpc.get_t_max(rec))
    assert t_max < rec[0].shape[0] - 1
    assert_trees_close(
        [a[t_max] for a in rec], default, rtol=1e-10, check_structure=False
    )
    assert_trees_close([a[0] for a in rec], p.ffwd(), rtol=1e-12, check_structure=False)
    for a in rec:
        assert np.all(np.isfinite(a[: t_max + 1]))
        assert np.all(np.isinf(a[t_max + 1 :]))


# ------------------------------------------------------------------ t_max and energies


def test_get_t_max():
    a = jnp.ones((7, 2, 3)).at[5:].set(jnp.inf)
    b = jnp.ones((7, 2, 4)).at[5:].set(jnp.inf)
    assert int(jpc.get_t_max([a, b])) == 4
    c = jnp.ones((7, 2, 3))
    assert int(jpc.get_t_max([c, c])) == 6


@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("supervised", [True, False])
@pytest.mark.slow
def test_compute_infer_energies_order_and_length(key, depth, supervised):
    """§11.5: rows ordered layer 1..L for depth ≥ 4, no truncation past 500 steps,
    0 after t_max (finite, as in the JPC library)."""
    widths = [3] + [4] * (depth - 1) + [2]
    p = random_problem(key, widths, 2, supervised, param_type="mupc", skip=True)
    T, t_max = 620, 560
    ks = jr.split(jr.PRNGKey(3), len(p.activities))
    iters = [
        jr.normal(k, (T,) + a.shape).at[t_max + 1 :].set(jnp.inf)
        for k, a in zip(ks, p.activities, strict=True)
    ]
    tm = jpc.get_t_max(iters)
    assert int(tm) == t_max
    got = np.asarray(
        jpc.compute_infer_energies(p.params, iters, tm, p.y, x=p.x, param_type="mupc")
    )
    assert got.shape == (depth, T)

    def layer_E(acts):
        return jnp.stack(
            ref_layer_energies(
                p.model, acts, p.y, x=p.x, skip_model=p.skip_model, scalings=p.scalings
            )
        )

    want = np.asarray(jax.vmap(layer_E)([a[: t_max + 1] for a in iters])).T
    np.testing.assert_allclose(got[:, : t_max + 1], want, rtol=1e-10)
    assert np.all(got[:, t_max + 1 :] == 0.0)


@pytest.mark.slow
def test_solve_inference_integrates_neg_pc_activity_grad(key):
    """solve_inference integrates exactly the exported vector field: compare with a
    direct diffrax solve of neg_pc_activity_grad at tight tolerances."""
    p = random_problem(key, WIDTHS, 3, param_type="mupc", skip=True, gamma=1.3)
    args = (p.params, p.y, p.x, "mse", "mupc", 0.0, 0.0, 0.1, 1.3, 0.8)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(jpc.neg_pc_activity_grad),
        diffrax.Tsit5(),
        t0=0.0,
        t1=3.0,
        dt0=None,
        y0=p.ffwd(),
        args=args,
        stepsize_controller=TIGHT,
        max_steps=100_000,
    )
    direct = [a[-1] for a in sol.ys]
    out = final(
        solve(
            p,
            solver=diffrax.Tsit5(),
            stepsize_controller=TIGHT,
            max_t1=3,
            max_steps=100_000,
            activity_decay=0.1,
            output_energy_scaling=0.8,
        )
    )
    for i in free_slice(p):
        np.testing.assert_allclose(out[i], direct[i], rtol=1e-7, atol=1e-9)
    # and the state really moved over t ∈ [0, 3]
    assert not np.allclose(out[0], p.ffwd()[0], atol=1e-3)


# ------------------------------------------------- the stop: every example, every layer


def _linear_net(key, d_in, width, depth, d_out, scales=()):
    model = jpc.make_mlp(key, d_in, width, depth, d_out, "linear")
    for i, s in scales:
        model = eqx.tree_at(
            lambda m, i=i: m[i].layers[1].weight, model, s * model[i].layers[1].weight
        )
    return model


def _rel_errors(got, want):
    """max over examples of ‖z_{l,i} − z*_{l,i}‖ / ‖z*_{l,i}‖, per free layer."""
    return [
        float(jnp.max(jnp.linalg.norm(g - w, axis=1) / jnp.linalg.norm(w, axis=1)))
        for g, w in zip(got[:-1], want[:-1], strict=True)
    ]


def _ode_final(model, x, y, **kw):
    acts = jpc.init_activities_with_ffwd(model, x)
    out = jpc.solve_inference((model, None), acts, y, input=x, record_iters=True, **kw)
    t_max = int(jpc.get_t_max(out))
    return [a[t_max] for a in out], t_max


@pytest.mark.slow
def test_stop_waits_for_every_example():
    """A batch of two where one example is large and already at its equilibrium
    (its target is its own feedforward prediction): the other example must still
    reach its own equilibrium (exact float64 linear solve) within 2 %."""
    model = _linear_net(jr.PRNGKey(0), 4, 8, 3, 2)
    x_big = 1e3 * jr.normal(jr.PRNGKey(1), (1, 4))
    y_big = jpc.init_activities_with_ffwd(model, x_big)[-1]
    x = jnp.concatenate([x_big, jr.normal(jr.PRNGKey(2), (1, 4))])
    y = jnp.concatenate([y_big, jr.normal(jr.PRNGKey(3), (1, 2))])
    exact = jpc.compute_linear_activity_solution(model, x, y)
    got, t_max = _ode_final(model, x, y, max_t1=500)
    assert t_max > 0
    assert max(_rel_errors(got, exact)) < 0.02


@pytest.mark.slow
def test_stop_waits_for_every_layer():
    """A linear 3-layer net whose first hidden layer is ~1e4 and second ~1: the
    large layer must not loosen the test for the small one."""
    model = _linear_net(jr.PRNGKey(4), 4, 8, 3, 2, scales=((0, 1e4), (1, 4e-4)))
    x = jr.normal(jr.PRNGKey(5), (4, 4))
    y = jr.normal(jr.PRNGKey(6), (4, 2))
    exact = jpc.compute_linear_activity_solution(model, x, y)
    sizes = [float(jnp.sqrt(jnp.mean(z**2))) for z in exact[:-1]]
    assert sizes[0] > 1e3 and sizes[1] < 10
    got, t_max = _ode_final(model, x, y, max_t1=500)
    assert t_max > 0
    assert max(_rel_errors(got, exact)) < 0.02


@pytest.mark.slow
def test_stop_on_raw_pixel_inputs():
    """`make_mlp(64, 32, 3, 10, "tanh")` on raw 0–255 inputs, batch 16, default
    solver and controller, max_t1=200: every layer ends within 2 % of the
    equilibrium of a tight solve (Tsit5, tolerances 1e-9)."""
    model = jpc.make_mlp(jr.PRNGKey(7), 64, 32, 3, 10, "tanh")
    x = jr.randint(jr.PRNGKey(8), (16, 64), 0, 256).astype(float)
    y = jax.nn.one_hot(jr.randint(jr.PRNGKey(9), (16,), 0, 10), 10)
    acts = jpc.init_activities_with_ffwd(model, x)
    tight = jpc.solve_inference(
        (model, None),
        acts,
        y,
        input=x,
        solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
        max_t1=20_000,
        max_steps=100_000,
        steady_state_rtol=1e-10,
        steady_state_atol=1e-10,
    )
    got, t_max = _ode_final(model, x, y, max_t1=200)
    assert t_max > 4
    assert max(_rel_errors(got, final(tight))) < 0.02


def _per_example_rms(a):
    return jnp.sqrt(jnp.mean(a.reshape(a.shape[0], -1) ** 2, axis=1))


@pytest.mark.slow
def test_stop_fires_at_the_solvers_stability_limit():
    """A well-conditioned linear 6-6-2 net whose output weight makes the stiffest
    mode fast (Hessian eigenvalues in [1, 9]): with the default Heun +
    PID(1e-3) the step size sits at Heun's stability limit and the field
    plateaus above the tolerance. The stop still fires, with every example's
    hidden layer within atol + rtol·rms(z*) of the exact equilibrium, in far
    fewer steps than running to the horizon."""
    model = _linear_net(jr.PRNGKey(0), 6, 6, 2, 2, scales=((1, 5.0),))
    x = jr.normal(jr.PRNGKey(1), (8, 6))
    y = jr.normal(jr.PRNGKey(2), (8, 2))
    exact = jpc.compute_linear_activity_solution(model, x, y)
    got, t_max = _ode_final(model, x, y, max_t1=500, max_steps=4096)
    dist = _per_example_rms(got[0] - exact[0])
    assert bool(jnp.all(dist <= 1e-3 + 1e-3 * _per_example_rms(exact[0])))
    horizon, t_horizon = _ode_final(
        model,
        x,
        y,
        max_t1=500,
        max_steps=4096,
        steady_state_rtol=1e-12,
        steady_state_atol=1e-12,
    )
    assert 5 * t_max < t_horizon, (t_max, t_horizon)


@pytest.mark.slow
def test_stop_w4_workload():
    """784-300-300-10 tanh, MSE, batch 64, default ODE options (random data): the
    stop ends within twice atol + rtol·rms(z*) of a tight solve (the stop bounds
    the field; the distance is at most the field over the smallest curvature,
    here below 1), in far fewer steps than a fixed-horizon solve to t = 2000 (with
    the stop switched off) takes."""
    model = jpc.make_mlp(jr.PRNGKey(0), 784, 300, 3, 10, "tanh")
    x = jr.uniform(jr.PRNGKey(1), (64, 784))
    y = jax.nn.one_hot(jr.randint(jr.PRNGKey(2), (64,), 0, 10), 10)
    acts = jpc.init_activities_with_ffwd(model, x)
    tight = final(
        jpc.solve_inference(
            (model, None),
            acts,
            y,
            input=x,
            solver=diffrax.Tsit5(),
            stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
            max_t1=50_000,
            max_steps=100_000,
            steady_state_rtol=1e-9,
            steady_state_atol=1e-9,
        )
    )
    got, t_max = _ode_final(model, x, y, max_t1=2000)
    for z, z_star in zip(got[:-1], tight[:-1], strict=True):
        dist = _per_example_rms(z - z_star)
        assert bool(jnp.all(dist <= 2 * (1e-3 + 1e-3 * _per_example_rms(z_star))))
    fixed = jpc.solve_inference(
        (model, None),
        acts,
        y,
        input=x,
        record_iters=True,
        max_t1=2000,
        steady_state_rtol=1e-12,
        steady_state_atol=1e-12,
    )
    assert 2 * t_max < int(jpc.get_t_max(fixed)), (t_max, int(jpc.get_t_max(fixed)))


# ------------------------------------------------------------ max_steps and non-finite


def _tiny(key=jr.PRNGKey(0)):
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh")
    x = jr.normal(jr.PRNGKey(1), (2, 3))
    y = jr.normal(jr.PRNGKey(2), (2, 2))
    return model, x, y


_TIGHT_FEW = dict(
    stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
    max_t1=1000,
    max_steps=3,
)


def _call(name, model, x, y, **kw):
    sgd = optax.sgd(0.1)
    state = sgd.init((eqx.filter(model, eqx.is_array), None))
    sizes = [2, 4, 4, 3]
    if name == "solve_inference":
        acts = jpc.init_activities_with_ffwd(model, x)
        return jpc.solve_inference((model, None), acts, y, input=x, **kw)
    if name == "make_pc_step":
        return jpc.make_pc_step(model, sgd, state, y, input=x, **kw)
    if name == "make_pc_step_centred":
        return jpc.make_pc_step(model, sgd, state, y, input=x, nudging="centred", **kw)
    generator = jpc.make_mlp(jr.PRNGKey(3), 2, 4, 3, 3, "tanh")
    amortiser = jpc.make_mlp(jr.PRNGKey(4), 3, 4, 3, 2, "tanh")
    labels = jax.nn.one_hot(jnp.arange(2), 2)
    if name == "test_generative_pc":
        return jpc.test_generative_pc(
            generator, x, labels, jr.PRNGKey(5), sizes, 2, **kw
        )
    if name == "test_hpc":
        return jpc.test_hpc(
            generator, amortiser, x, labels, jr.PRNGKey(5), sizes, 2, **kw
        )
    if name == "make_hpc_step":
        states = (
            sgd.init((eqx.filter(generator, eqx.is_array), None)),
            sgd.init(eqx.filter(amortiser, eqx.is_array)),
        )
        return jpc.make_hpc_step(
            generator, amortiser, (sgd, sgd), states, x, input=labels, **kw
        )
    assert name == "compare_to_backprop"
    return jpc.compare_to_backprop(model, x, y, key=jr.PRNGKey(6), n_samples=2, **kw)


SOLVING = [
    "solve_inference",
    "make_pc_step",
    "make_pc_step_centred",
    "test_generative_pc",
    "test_hpc",
    "make_hpc_step",
    "compare_to_backprop",
]


@pytest.mark.usefixtures("raise_at_call")
@pytest.mark.parametrize("name", SOLVING)
@pytest.mark.slow
def test_max_steps_error_names_the_function_called(name):
    model, x, y = _tiny()
    called = name.removesuffix("_centred")
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps=3") as info:
        jax.block_until_ready(_call(name, model, x, y, **_TIGHT_FEW))
    message = str(info.value)
    assert message.startswith(f"{called}:"), message
    others = {n.removesuffix("_centred") for n in SOLVING} - {called}
    assert not any(other in message for other in others), message
    # it names only options the function has
    import inspect

    fn = getattr(jpc, called)
    for option in re.findall(r"`(\w+)`", message):
        assert option in inspect.signature(fn).parameters, option


@pytest.mark.usefixtures("raise_at_call")
@pytest.mark.parametrize("which", ["output", "input"])
@pytest.mark.slow
def test_non_finite_input_is_named(which):
    model, x, y = _tiny()
    bad = dict(output=y.at[1, 0].set(jnp.nan), input=x.at[0, 2].set(jnp.inf))
    x = bad["input"] if which == "input" else x
    y = bad["output"] if which == "output" else y
    for name in ("solve_inference", "make_pc_step"):
        with pytest.raises(eqx.EquinoxRuntimeError, match=f"`{which}` contains NaN"):
            jax.block_until_ready(_call(name, model, x, y, max_t1=5))


def test_non_finite_activities_argument_is_named():
    model, x, y = _tiny()
    acts = jpc.init_activities_with_ffwd(model, x)
    acts[0] = acts[0].at[0, 0].set(jnp.nan)
    with pytest.raises(eqx.EquinoxRuntimeError, match="initial activities contain"):
        out = jpc.solve_inference((model, None), acts, y, input=x, max_t1=5)
        jax.block_until_ready(out)


@pytest.mark.slow
def test_divergence_is_reported_as_non_finite():
    """A field that overflows (an exponential layer) is reported as a
    non-finite state, not as running out of steps. (An adaptive controller
    rejects each non-finite trial step and stalls at a finite state; that case
    is still reported as running out of `max_steps`.)"""
    controller = diffrax.ConstantStepSize()
    k1, k2 = jr.split(jr.PRNGKey(0))
    model = [
        eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=k1)]),
        eqx.nn.Sequential([eqx.nn.Lambda(jnp.exp), eqx.nn.Linear(4, 2, key=k2)]),
    ]
    x = jr.normal(jr.PRNGKey(1), (2, 3))
    y = 1e30 * jnp.ones((2, 2))
    acts = jpc.init_activities_with_ffwd(model, x)
    with pytest.raises(eqx.EquinoxRuntimeError, match="became non-finite"):
        out = jpc.solve_inference(
            (model, None),
            acts,
            y,
            input=x,
            stepsize_controller=controller,
            dt=0.5,
            max_t1=1000,
            max_steps=2000,
        )
        jax.block_until_ready(out)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_steps=0), "`max_steps` must be a positive integer"),
        (dict(max_steps=2.5), "`max_steps` must be a positive integer"),
        (dict(steady_state_rtol=0, steady_state_atol=0), "cannot both be 0"),
    ],
)
def test_stop_option_errors(kw, match):
    """Trace-time errors (a negative tolerance is traced: a runtime error)."""
    model, x, y = _tiny()
    with pytest.raises(ValueError, match=match):
        _call("solve_inference", model, x, y, **kw)
    with pytest.raises(ValueError, match=match):
        _call("make_pc_step", model, x, y, **kw)


@pytest.mark.usefixtures("raise_at_call")
@pytest.mark.parametrize("option", ["steady_state_rtol", "steady_state_atol"])
@pytest.mark.slow
def test_negative_stop_tolerance_raises(option):
    model, x, y = _tiny()
    for name in ("solve_inference", "make_pc_step"):
        with pytest.raises(eqx.EquinoxRuntimeError, match="must be non-negative"):
            jax.block_until_ready(_call(name, model, x, y, **{option: -1e-3}))
