"""Deep linear theory (SPEC §8) against numerical inference run to equilibrium, the
SPEC's own formula for S written out with explicit products, `jax.hessian` of the
numerical energy, the independent Newton reference of `helpers`, and autodiff / finite
differences through the numerical equilibrium."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    central_fd_grad,
    count_compiles,
    init_param_opt,
    mlp_weights,
    random_problem,
    ref_equilibrium,
    ref_param_grads,
)

import jpc


WIDTHS = [3, 4, 4, 4, 2]
TIGHT = diffrax.PIDController(rtol=1e-10, atol=1e-10)
CASES = [
    # param_type, skip, output precision λ, gamma
    ("sp", False, None, None),
    ("mupc", True, 0.5, 2.0),
    ("ntp", False, 3.0, None),
    ("ntp", True, None, 0.7),
]


def linear_problem(key, case, widths=WIDTHS, batch=5):
    param_type, skip, _, gamma = case
    return random_problem(
        key,
        widths,
        batch,
        skip=skip,
        act_fn="linear",
        param_type=param_type,
        gamma=gamma,
    )


def theory_kwargs(p, lam):
    return dict(param_type=p.param_type, gamma=p.gamma, output_energy_scaling=lam)


def numeric_energy(p, activities, lam, **kw):
    return jpc.pc_energy_fn(
        p.params, activities, p.y, x=p.x, **theory_kwargs(p, lam), **kw
    )


def ode_equilibrium(p, lam, **kw):
    out = jpc.solve_inference(
        p.params,
        p.ffwd(),
        p.y,
        input=p.x,
        solver=diffrax.Tsit5(),
        stepsize_controller=TIGHT,
        max_t1=5000,
        max_steps=100_000,
        **theory_kwargs(p, lam),
        **kw,
    )
    return [a[-1] for a in out]


# ------------------------------------------------------------------ energy


@pytest.mark.parametrize(
    "case",
    [CASES[0], pytest.param(("ntp", True, 2.0, 1.5), marks=pytest.mark.slow)],
)
@pytest.mark.slow
def test_closed_forms_match_ode_equilibrium(key, case):
    """Energy, activities and (envelope theorem) parameter gradients at the
    equilibrium that `jpc.solve_inference` reaches at tight tolerances."""
    p = linear_problem(key, case)
    lam = case[2]
    kw = theory_kwargs(p, lam)
    eq = ode_equilibrium(p, lam)
    closed = jpc.linear_equilib_energy(p.params, p.x, p.y, **kw)
    np.testing.assert_allclose(closed, numeric_energy(p, eq, lam), rtol=1e-8)
    assert float(closed) < float(numeric_energy(p, p.ffwd(), lam))
    sol = jpc.compute_linear_activity_solution(
        p.model, p.x, p.y, use_skips=case[1], **kw
    )
    for z, z_num in zip(sol[:-1], eq[:-1]):
        np.testing.assert_allclose(z, z_num, rtol=1e-6, atol=1e-7)
    grads = jpc.compute_linear_equilib_energy_grads(p.params, p.x, p.y, **kw)
    ref = ref_param_grads(p, eq, lam=1.0 if lam is None else lam)
    assert_trees_close(grads, ref, rtol=1e-6, atol=1e-9)


def test_equilib_energy_matches_discrete_inference(key):
    """Many small SGD steps on the activities (lr ∝ B: gradients carry 1/B)."""
    p = linear_problem(key, ("mupc", True, 0.5, None), batch=3)
    optim = optax.sgd(0.3 * p.B)  # λmax(H) ≈ 4 here
    acts = p.ffwd()
    opt_state = optim.init(acts)
    for _ in range(800):
        res = jpc.update_pc_activities(
            p.params, acts, optim, opt_state, p.y, input=p.x, **theory_kwargs(p, 0.5)
        )
        acts, opt_state = res["activities"], res["opt_state"]
    closed = jpc.linear_equilib_energy(p.params, p.x, p.y, **theory_kwargs(p, 0.5))
    np.testing.assert_allclose(closed, numeric_energy(p, acts, 0.5), rtol=1e-10)


def _gradient_descent_equilibrium(p, kw, lr=0.2, steps=2000):
    """Plain gradient descent on the activities with `jpc.compute_pc_activity_grad`
    (per-example step `lr`; the batch-mean gradients carry 1/B, hence the factor B).
    The eigenvalues of these problems' Hessians lie in [0.1, 5.2] (checked with
    `jax.hessian`), so the step is stable and 2000 steps contract the error by
    e^-40; the caller checks the gradient vanishes."""

    @jax.jit
    def run(acts):
        def step(z, _):
            _, g = jpc.compute_pc_activity_grad(p.params, z, p.y, x=p.x, **kw)
            return jax.tree.map(lambda a, b: a - lr * p.B * b, z, g), None

        return jax.lax.scan(step, acts, length=steps)[0]

    return run(p.ffwd())


@pytest.mark.parametrize("param_type", ["sp", "mupc", "ntp"])
@pytest.mark.parametrize("skip", [False, True])
def test_closed_forms_match_discrete_equilibrium_all_parameterisations(
    key, param_type, skip
):
    """Every parameterisation with and without skips, with an output precision and a
    `gamma`: energy, activities and parameter gradients (envelope theorem: the PC
    parameter gradient at the numerical equilibrium) against `jpc`'s own inference."""
    p = linear_problem(key, (param_type, skip, 0.5, 1.5), batch=3)
    kw = theory_kwargs(p, 0.5)
    eq = _gradient_descent_equilibrium(p, kw)
    _, g = jpc.compute_pc_activity_grad(p.params, eq, p.y, x=p.x, **kw)
    assert max(float(jnp.max(jnp.abs(a))) for a in g[:-1]) < 1e-12  # converged
    closed = jpc.linear_equilib_energy(p.params, p.x, p.y, **kw)
    np.testing.assert_allclose(closed, numeric_energy(p, eq, 0.5), rtol=1e-10)
    sol = jpc.compute_linear_activity_solution(p.model, p.x, p.y, use_skips=skip, **kw)
    for z, z_num in zip(sol[:-1], eq[:-1]):  # the last slot is not inferred
        np.testing.assert_allclose(z, z_num, rtol=1e-8, atol=1e-11)
    grads = jpc.compute_linear_equilib_energy_grads(p.params, p.x, p.y, **kw)
    numeric = jpc.compute_pc_param_grads(p.params, eq, p.y, x=p.x, **kw)
    assert_trees_close(grads, numeric, rtol=1e-8, atol=1e-12)


def _spec_rescaling(Ws, a, skips, lam):
    """S of SPEC §8 written out: products (a_L⋯a_l)(W_L⋯W_l), or (I + a_l W_l)."""
    L = len(Ws)
    maps = [
        (np.eye(W.shape[0]) if skips[i] else 0) + a[i] * np.asarray(W)
        for i, W in enumerate(Ws)
    ]
    S = np.eye(Ws[-1].shape[0]) / lam
    for start in range(1, L):
        prod = np.eye(Ws[-1].shape[0])
        for k in range(L - 1, start - 1, -1):
            prod = prod @ maps[k]
        S = S + prod @ prod.T
    W_eff = np.eye(Ws[-1].shape[0])
    for k in range(L - 1, -1, -1):
        W_eff = W_eff @ maps[k]
    return S, W_eff


@pytest.mark.parametrize("case", CASES)
def test_rescaling_and_energy_match_spec_formula(key, case):
    p = linear_problem(key, case)
    lam = 1.0 if case[2] is None else case[2]
    skips = [s is not None for s in (p.skip_model or [None] * p.L)]
    S_ref, W_eff = _spec_rescaling(mlp_weights(p.model), p.scalings, skips, lam)
    S = jpc.compute_linear_equilib_rescaling(p.params, p.x, **theory_kwargs(p, case[2]))
    np.testing.assert_allclose(S, S_ref, rtol=1e-10)
    r = np.asarray(p.y) - np.asarray(p.x) @ W_eff.T
    F_ref = sum(ri @ np.linalg.solve(S_ref, ri) for ri in r) / (2 * p.B)
    F, S2 = jpc.linear_equilib_energy(
        p.params, p.x, p.y, return_rescaling=True, **theory_kwargs(p, case[2])
    )
    np.testing.assert_allclose(F, F_ref, rtol=1e-10)
    np.testing.assert_allclose(S2, S_ref, rtol=1e-10)


class _Dense(eqx.Module):
    """A custom linear layer, unlike the `make_mlp` layout."""

    weight: jax.Array

    def __call__(self, z):
        return self.weight @ z


def test_any_linear_layout_is_read(key):
    p = linear_problem(key, ("ntp", True, None, None))
    Ws = mlp_weights(p.model)
    linears = []
    for W in Ws:
        lin = eqx.nn.Linear(W.shape[1], W.shape[0], use_bias=False, key=key)
        linears.append(eqx.tree_at(lambda m: m.weight, lin, W))
    customs = [_Dense(W) for W in Ws]
    expected = jpc.linear_equilib_energy(p.params, p.x, p.y, param_type="ntp")
    for model in (linears, customs):
        got = jpc.linear_equilib_energy(
            (model, p.skip_model), p.x, p.y, param_type="ntp"
        )
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        sol = jpc.compute_linear_activity_solution(
            model, p.x, p.y, use_skips=True, param_type="ntp"
        )
        numeric = jpc.pc_energy_fn(
            (model, p.skip_model), sol, p.y, x=p.x, param_type="ntp"
        )
        np.testing.assert_allclose(numeric, expected, rtol=1e-10)


@pytest.mark.slow
def test_any_linear_layout_rescaling_grads_and_update(key):
    """S, the energy gradients and the optax update read a list of bare
    `eqx.nn.Linear`s and a `Sequential` with the linear map first, giving the same
    numbers as the `make_mlp` layout; the gradients equal the PC parameter gradients
    of that layout at its exact equilibrium (envelope theorem)."""
    p = linear_problem(key, ("mupc", True, 0.5, 2.0))
    kw = theory_kwargs(p, 0.5)
    Ws = mlp_weights(p.model)

    def linear(W):
        lin = eqx.nn.Linear(W.shape[1], W.shape[0], use_bias=False, key=key)
        return eqx.tree_at(lambda m: m.weight, lin, W)

    bare = [linear(W) for W in Ws]
    nested = [eqx.nn.Sequential([linear(W), eqx.nn.Lambda(lambda z: z)]) for W in Ws]
    S = jpc.compute_linear_equilib_rescaling(p.params, p.x, **kw)
    expected = [
        g.layers[1].weight
        for g in jpc.compute_linear_equilib_energy_grads(p.params, p.x, p.y, **kw)[0]
    ]
    optim = optax.sgd(0.1)
    for model, read in (
        (bare, lambda m: m.weight),
        (nested, lambda m: m.layers[0].weight),
    ):
        params = (model, p.skip_model)
        got_S = jpc.compute_linear_equilib_rescaling(params, p.x, **kw)
        np.testing.assert_allclose(got_S, S, rtol=1e-12)
        grads = jpc.compute_linear_equilib_energy_grads(params, p.x, p.y, **kw)
        for g, e in zip(grads[0], expected):
            np.testing.assert_allclose(read(g), e, rtol=1e-12)
        eq = jpc.compute_linear_activity_solution(model, p.x, p.y, use_skips=True, **kw)
        numeric = jpc.compute_pc_param_grads(params, eq, p.y, x=p.x, **kw)
        assert_trees_close(grads, numeric, rtol=1e-9, atol=1e-13)
        res = jpc.update_linear_equilib_energy_params(
            params, optim, init_param_opt(optim, model, p.skip_model), p.x, p.y, **kw
        )
        for new, old, g in zip(res["model"], model, grads[0]):
            np.testing.assert_allclose(read(new), read(old) - 0.1 * read(g), rtol=1e-12)


def test_single_layer_energy_is_scaled_mse(key):
    p = linear_problem(key, ("mupc", False, None, None), widths=[3, 2])
    pred = p.ffwd()[-1]
    expected = 0.7 * jpc.mse_loss(pred, p.y)
    got = jpc.linear_equilib_energy(
        p.params, p.x, p.y, param_type="mupc", output_energy_scaling=0.7
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# ------------------------------------------------------------------ Hessian


def _numeric_hessian(p, lam, decay):
    """`jax.hessian` of the batch-mean energy over one example's hidden activities."""
    x, y = p.x[:1], p.y[:1]
    sizes = [z.shape[1] for z in p.activities[:-1]]
    last = p.activities[-1][:1]

    def energy(flat):
        hidden = jnp.split(flat, np.cumsum(sizes)[:-1])
        acts = [z[None] for z in hidden] + [last]
        return jpc.pc_energy_fn(
            p.params,
            acts,
            y,
            x=x,
            activity_decay=decay,
            **theory_kwargs(p, lam),
        )

    return jax.hessian(energy)(jnp.zeros(sum(sizes)))


@pytest.mark.parametrize(
    "case,decay", [(c, False) for c in CASES] + [(CASES[1], True), (CASES[3], 0.3)]
)
@pytest.mark.slow
def test_hessian_matches_jax_hessian(key, case, decay):
    p = linear_problem(key, case)
    lam = case[2]
    H = jpc.compute_linear_activity_hessian(
        mlp_weights(p.model),
        use_skips=case[1],
        activity_decay=decay,
        **theory_kwargs(p, lam),
    )
    coef = 1.0 if decay is True else (0.0 if decay is False else decay)
    # batch size 1: the batch-mean energy is the per-example energy
    np.testing.assert_allclose(
        H, _numeric_hessian(p, lam, coef), rtol=1e-10, atol=1e-14
    )


def test_hessian_diag_and_off_diag_blocks(key):
    p = linear_problem(key, ("mupc", True, None, None), widths=[3, 4, 4, 4, 2])
    Ws = mlp_weights(p.model)
    kw = dict(use_skips=True, param_type="mupc")
    full = jpc.compute_linear_activity_hessian(Ws, **kw)
    diag = jpc.compute_linear_activity_hessian(Ws, off_diag=False, **kw)
    off = jpc.compute_linear_activity_hessian(Ws, diag=False, **kw)
    np.testing.assert_allclose(diag + off, full, rtol=1e-14)
    blocks = [slice(0, 4), slice(4, 8), slice(8, 12)]
    for i, bi in enumerate(blocks):
        for j, bj in enumerate(blocks):
            zero = off if i == j else diag
            np.testing.assert_array_equal(zero[bi, bj], 0.0)
    # non-adjacent blocks vanish in the block-tridiagonal Hessian
    np.testing.assert_array_equal(full[blocks[0], blocks[2]], 0.0)
    none = jpc.compute_linear_activity_hessian(Ws, diag=False, off_diag=False, **kw)
    np.testing.assert_array_equal(none, 0.0)


# ------------------------------------------------------------------ activities


@pytest.mark.parametrize("case", CASES)
def test_activity_solution_matches_newton_reference(key, case):
    p = linear_problem(key, case)
    lam = 1.0 if case[2] is None else case[2]
    eq = ref_equilibrium(p, lam=lam, activity_decay=0.2)
    sol = jpc.compute_linear_activity_solution(
        p.model,
        p.x,
        p.y,
        use_skips=case[1],
        activity_decay=0.2,
        **theory_kwargs(p, case[2]),
    )
    assert len(sol) == p.L
    for z, z_ref in zip(sol[:-1], eq[:-1]):
        np.testing.assert_allclose(z, z_ref, rtol=1e-10, atol=1e-12)
    # the last slot is the network's prediction from the equilibrium
    maps_L = p.scalings[-1] * mlp_weights(p.model)[-1]
    np.testing.assert_allclose(sol[-1], sol[-2] @ maps_L.T, rtol=1e-12)


def test_activity_solution_epsilon_and_given_hessian(key):
    p = linear_problem(key, ("sp", False, None, None))
    Ws = mlp_weights(p.model)
    base = jpc.compute_linear_activity_solution(p.model, p.x, p.y)
    H = jpc.compute_linear_activity_hessian(Ws)
    given = jpc.compute_linear_activity_solution(p.model, p.x, p.y, hessian=H)
    assert_trees_close(given, base, rtol=1e-12)
    # H + εI is the Hessian with an activity decay of ε: same minimiser
    eps = jpc.compute_linear_activity_solution(p.model, p.x, p.y, epsilon=0.3)
    decay = jpc.compute_linear_activity_solution(p.model, p.x, p.y, activity_decay=0.3)
    assert_trees_close(eps, decay, rtol=1e-12)


# ------------------------------------------------------------------ gradients


def test_energy_grads_equal_autodiff_through_unrolled_inference(key):
    """`jax.grad` through 600 unrolled SGD inference steps from the ffwd state."""
    p = linear_problem(key, ("mupc", True, None, None), batch=3)
    optim = optax.sgd(0.3 * p.B)

    def energy_after_inference(model):
        params = (model, p.skip_model)
        acts = jpc.init_activities_with_ffwd(
            model, p.x, skip_model=p.skip_model, param_type="mupc"
        )

        def step(carry, _):
            acts, state = carry
            _, grads = jpc.compute_pc_activity_grad(
                params, acts, p.y, x=p.x, param_type="mupc"
            )
            updates, state = optim.update(grads, state, acts)
            return (optax.apply_updates(acts, updates), state), None

        (acts, _), _ = jax.lax.scan(step, (acts, optim.init(acts)), length=600)
        return jpc.pc_energy_fn(params, acts, p.y, x=p.x, param_type="mupc")

    unrolled = eqx.filter_jit(eqx.filter_grad(energy_after_inference))(p.model)
    closed = jpc.compute_linear_equilib_energy_grads(
        p.params, p.x, p.y, param_type="mupc"
    )
    assert_trees_close(closed[0], unrolled, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_energy_grads_match_finite_differences(key):
    p = linear_problem(key, ("ntp", True, 0.5, 2.0), widths=[3, 3, 3, 2], batch=4)
    kw = theory_kwargs(p, 0.5)
    grads = jpc.compute_linear_equilib_energy_grads(p.params, p.x, p.y, **kw)
    fd = central_fd_grad(
        lambda m: jpc.linear_equilib_energy((m, p.skip_model), p.x, p.y, **kw), p.model
    )
    assert_trees_close(grads[0], fd, rtol=1e-6, atol=1e-10)


@pytest.mark.slow
def test_update_params_is_an_optax_step_and_training_lowers_energy(key):
    p = linear_problem(key, ("sp", True, None, None), batch=8)
    optim = optax.sgd(0.05)
    opt_state = init_param_opt(optim, p.model, p.skip_model)
    grads = jpc.compute_linear_equilib_energy_grads(p.params, p.x, p.y)
    res = jpc.update_linear_equilib_energy_params(p.params, optim, opt_state, p.x, p.y)
    assert set(res) == {"model", "skip_model", "grads", "opt_state"}
    assert_trees_close(res["grads"], grads, rtol=1e-12)
    for w, w0, g in zip(mlp_weights(res["model"]), mlp_weights(p.model), grads[0]):
        np.testing.assert_allclose(w, w0 - 0.05 * g.layers[1].weight, rtol=1e-12)
    params = p.params
    start = float(jpc.linear_equilib_energy(params, p.x, p.y))
    for _ in range(30):
        res = jpc.update_linear_equilib_energy_params(
            params, optim, opt_state, p.x, p.y
        )
        params, opt_state = (res["model"], res["skip_model"]), res["opt_state"]
    assert float(jpc.linear_equilib_energy(params, p.x, p.y)) < 0.8 * start


def test_update_params_traces_float_hyperparameters(key):
    p = linear_problem(key, ("mupc", False, None, None))
    optim = optax.sgd(0.1)
    opt_state = init_param_opt(optim, p.model)

    def run(**kw):
        res = jpc.update_linear_equilib_energy_params(
            p.params, optim, opt_state, p.x, p.y, param_type="mupc", **kw
        )
        return jax.block_until_ready(res["grads"])

    as_float = run(gamma=2.0, output_energy_scaling=0.5)
    as_array = run(gamma=jnp.array(2.0), output_energy_scaling=jnp.array(0.5))
    assert_trees_close(as_float, as_array, rtol=1e-12)
    with count_compiles() as events:
        run(gamma=1.5, output_energy_scaling=0.25)
    assert events == []


# ------------------------------------------------------------------ errors


def test_errors(key):
    p = linear_problem(key, ("sp", False, None, None))
    biased = jpc.make_mlp(key, 3, 4, 3, 2, "linear", use_bias=True)
    with pytest.raises(ValueError, match="bias"):
        jpc.linear_equilib_energy((biased, None), p.x, p.y)
    two = [eqx.nn.Sequential([lin, lin]) for lin in (eqx.nn.Linear(3, 3, key=key),)]
    with pytest.raises(ValueError, match="exactly one 2-D `weight`"):
        jpc.linear_equilib_energy((two, None), p.x, p.x)
    bad_chain = [_Dense(jnp.ones((4, 3))), _Dense(jnp.ones((2, 5)))]
    with pytest.raises(ValueError, match="outputs 4 features"):
        jpc.linear_equilib_energy((bad_chain, None), p.x, p.y)
    rect = [
        _Dense(jnp.ones((4, 3))),
        _Dense(jnp.ones((5, 4))),
        _Dense(jnp.ones((2, 5))),
    ]
    with pytest.raises(ValueError, match="square weight"):
        jpc.compute_linear_activity_hessian([m.weight for m in rect], use_skips=True)
    with pytest.raises(ValueError, match=r"`x` must have shape \(batch, 3\)"):
        jpc.linear_equilib_energy(p.params, p.x[:, :2], p.y)
    with pytest.raises(ValueError, match=r"`y` must have shape \(batch, 2\)"):
        jpc.linear_equilib_energy(p.params, p.x, p.y[:, :1])
    with pytest.raises(ValueError, match="same batch size"):
        jpc.linear_equilib_energy(p.params, p.x, p.y[:2])
    with pytest.raises(ValueError, match="at least 2 layers"):
        jpc.compute_linear_activity_hessian([jnp.ones((2, 3))])
    with pytest.raises(ValueError, match=r"`hessian` must have shape \(12, 12\)"):
        jpc.compute_linear_activity_solution(p.model, p.x, p.y, hessian=jnp.eye(3))
    with pytest.raises(TypeError, match=r"`params` must be the pair"):
        jpc.linear_equilib_energy(p.model, p.x, p.y)
    with pytest.raises(ValueError, match="`param_type` must be one of"):
        jpc.linear_equilib_energy(p.params, p.x, p.y, param_type="mup")


@pytest.mark.parametrize("act_fn", ["tanh", "relu"])
def test_nonlinear_activation_is_rejected(key, act_fn):
    """A `make_mlp` model with a nonlinear activation is not silently read as linear."""
    p = linear_problem(key, ("sp", False, None, None))
    model = jpc.make_mlp(key, 3, 4, 3, 2, act_fn)
    match = f"`model\\[1\\]` applies the nonlinear activation '{act_fn}'"
    with pytest.raises(ValueError, match=match):
        jpc.linear_equilib_energy((model, None), p.x, p.y)
    with pytest.raises(ValueError, match=match):
        jpc.compute_linear_activity_solution(model, p.x, p.y)
