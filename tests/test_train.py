"""make_pc_step / make_bp_step against hand-written loops (SPEC §5, §11.4, §11.8)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    array_leaves,
    assert_trees_close,
    backprop_grads,
    count_compiles,
    free_slice,
    init_param_opt,
    optax_param_update,
    random_problem,
    ref_equilibrium,
    ref_forward,
    ref_layer_energies,
    ref_output_loss,
    ref_param_grads,
)

import jpc


WIDTHS = [4, 5, 5, 3]
KEYS = (
    "model",
    "skip_model",
    "opt_state",
    "loss",
    "acc",
    "activities",
    "t_max",
    "steady_state_reached",
    "energies",
    "activity_norms",
    "model_param_norms",
    "skip_model_param_norms",
    "model_grad_norms",
    "skip_model_grad_norms",
)


def pc_step(p, optim, opt_state, **kw):
    return jpc.make_pc_step(
        p.model,
        optim,
        opt_state,
        p.y,
        input=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        skip_model=p.skip_model,
        **{"gamma": p.gamma, **kw},
    )


def hand_pc_step(p, optim, opt_state, acts, activity_lr, T, lam=1.0, **reg):
    """T SGD steps on the reference energy, param grads at the final state, optax."""
    grad_fn = jax.jit(jax.grad(lambda a: p.ref(a, lam=lam, **reg)))
    traj = []
    acts = list(acts)
    for _ in range(T):
        g = grad_fn(acts)
        acts = [a - activity_lr * gi for a, gi in zip(acts, g, strict=True)]
        traj.append(acts)
    grads = ref_param_grads(p, acts, lam=lam, **reg)
    model, skip, state = optax_param_update(
        optim, opt_state, p.model, p.skip_model, grads
    )
    return model, skip, state, acts, grads, traj


def ffwd_loss(p):
    return ref_output_loss(p.ffwd()[-1], p.y, p.loss) / p.B


# ------------------------------------------------------------------ fused discrete


FUSED_CASES = [
    dict(skip=False, param_type="sp", loss="mse", optim="sgd", reg={}),
    dict(
        skip=True,
        param_type="mupc",
        loss="ce",
        optim="adam",
        gamma=2.0,
        reg=dict(output_energy_scaling=0.5, weight_decay=0.1, activity_decay=0.2),
    ),
    dict(
        skip=True,
        param_type="ntp",
        loss="mse",
        optim="adam",
        reg=dict(spectral_penalty=0.05),
    ),
]


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.slow
def test_make_pc_step_fused_equals_hand_loop(key, case):
    case = dict(case)
    reg, opt_name = case.pop("reg"), case.pop("optim")
    B, T, lr = 3, 12, 0.2 * 3
    p = random_problem(key, WIDTHS, B, use_bias=True, **case)
    optim = optax.sgd(0.1) if opt_name == "sgd" else optax.adam(1e-2)
    state = init_param_opt(optim, p.model, p.skip_model)
    out = pc_step(
        p, optim, state, activity_optim=optax.sgd(lr), n_inference_steps=T, **reg
    )
    assert set(out) == set(KEYS)
    ref_reg = dict(reg)
    lam = ref_reg.pop("output_energy_scaling", 1.0)
    model, skip, ref_state, acts, _, _ = hand_pc_step(
        p, optim, state, p.ffwd(), lr, T, lam=lam, **ref_reg
    )
    assert_trees_close(out["model"], model, rtol=1e-10, atol=1e-14)
    assert_trees_close(out["opt_state"], ref_state, rtol=1e-10, atol=1e-14)
    got_acts = [a[-1] for a in out["activities"]]
    for i in free_slice(p):
        np.testing.assert_allclose(got_acts[i], acts[i], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out["loss"], ffwd_loss(p), rtol=1e-10)
    if p.skip_model is None:
        assert out["skip_model"] is None
    # Not recording: t_max is 0 and `energies` the per-layer energies at the
    # inferred state, in record_layers order [E_L, E_2, ..., E_{L-1}, E_1].
    assert int(out["t_max"]) == 0
    ref = ref_layer_energies(
        p.model,
        acts,
        p.y,
        x=p.x,
        skip_model=p.skip_model,
        scalings=p.scalings,
        loss=p.loss,
        lam=lam,
    )
    want_energies = [ref[-1], *ref[1:-1], ref[0]]
    np.testing.assert_allclose(out["energies"], want_energies, rtol=1e-10, atol=1e-14)
    for k in (
        "acc",
        "activity_norms",
        "model_param_norms",
        "skip_model_param_norms",
        "model_grad_norms",
        "skip_model_grad_norms",
    ):
        assert out[k] is None, k


@pytest.mark.slow
def test_make_pc_step_fused_unsupervised(key):
    """Unsupervised: activities start at N(0, sigma²) drawn with `key` (§11.6: mupc)."""
    B, T, lr = 4, 10, 0.2 * 4
    p = random_problem(key, WIDTHS, B, supervised=False, param_type="mupc", skip=True)
    optim = optax.sgd(0.05)
    state = init_param_opt(optim, p.model, p.skip_model)
    k = jr.PRNGKey(77)
    out = pc_step(
        p,
        optim,
        state,
        key=k,
        layer_sizes=p.widths,
        batch_size=B,
        sigma=0.3,
        activity_optim=optax.sgd(lr),
        n_inference_steps=T,
    )
    init = jpc.init_activities_from_normal(k, p.widths, "unsupervised", B, sigma=0.3)
    model, _, _, acts, _, _ = hand_pc_step(p, optim, state, init, lr, T)
    assert_trees_close(out["model"], model, rtol=1e-10, atol=1e-14)
    assert out["loss"] is None


def test_fused_inference_reaches_equilibrium(key):
    B = 3
    p = random_problem(key, WIDTHS, B)
    optim = optax.sgd(0.0)
    out = pc_step(
        p,
        optim,
        init_param_opt(optim, p.model),
        activity_optim=optax.sgd(0.3 * B),
        n_inference_steps=300,
    )
    eq = ref_equilibrium(p)
    for i in free_slice(p):
        np.testing.assert_allclose(
            out["activities"][i][-1], eq[i], rtol=1e-8, atol=1e-10
        )
    assert_trees_close(out["model"], p.model, rtol=0)


def test_fused_record_activities_and_energies(key):
    B, T, lr = 3, 7, 0.5
    p = random_problem(key, WIDTHS, B, skip=True)
    optim = optax.sgd(0.1)
    state = init_param_opt(optim, p.model, p.skip_model)
    out = pc_step(
        p,
        optim,
        state,
        activity_optim=optax.sgd(lr),
        n_inference_steps=T,
        record_activities=True,
        record_energies=True,
    )
    plain = pc_step(p, optim, state, activity_optim=optax.sgd(lr), n_inference_steps=T)
    *_, traj = hand_pc_step(p, optim, state, p.ffwd(), lr, T)
    for i in free_slice(p):
        assert out["activities"][i].shape[0] == T
        np.testing.assert_allclose(
            out["activities"][i],
            jnp.stack([s[i] for s in traj]),
            rtol=1e-10,
            atol=1e-14,
        )
    assert_trees_close(out["model"], plain["model"], rtol=1e-12)
    E = np.asarray(out["energies"])
    assert E.shape == (p.L, T)
    for t in range(T):
        want = ref_layer_energies(
            p.model, traj[t], p.y, x=p.x, skip_model=p.skip_model, scalings=p.scalings
        )
        np.testing.assert_allclose(E[:, t], np.asarray(want), rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_make_pc_step_metrics(key):
    B, T, lr = 4, 5, 0.8
    p = random_problem(key, WIDTHS, B, loss="ce", use_bias=True)
    optim = optax.sgd(0.1)
    state = init_param_opt(optim, p.model)
    out = pc_step(
        p,
        optim,
        state,
        activity_optim=optax.sgd(lr),
        n_inference_steps=T,
        activity_norms=True,
        param_norms=True,
        grad_norms=True,
        calculate_accuracy=True,
    )
    model, _, _, acts, grads, _ = hand_pc_step(p, optim, state, p.ffwd(), lr, T)
    # `acc` is the accuracy of the updated model's feedforward prediction.
    pred = ref_forward(model, p.x, scalings=p.scalings)[-1]
    acc = 100.0 * float(jnp.mean(jnp.argmax(pred, 1) == jnp.argmax(p.y, 1)))
    np.testing.assert_allclose(out["acc"], acc)
    # Norms: one entry per leaf of tree_leaves(model), 0 for non-array leaves;
    # parameter norms of the model used for inference (before the update).
    leaves = jax.tree_util.tree_leaves(p.model)
    grad_leaves = jax.tree_util.tree_leaves(
        grads[0], is_leaf=lambda g: g is None or eqx.is_array(g)
    )
    assert len(grad_leaves) == len(leaves)
    want_gn = [
        float(jnp.linalg.norm(g)) if eqx.is_array(g) else 0.0 for g in grad_leaves
    ]
    want_pn = [float(jnp.linalg.norm(w)) if eqx.is_array(w) else 0.0 for w in leaves]
    assert 0.0 in want_pn  # the activation functions of make_mlp's Lambda layers
    np.testing.assert_allclose(np.asarray(out["model_grad_norms"]), want_gn, rtol=1e-10)
    np.testing.assert_allclose(
        np.asarray(out["model_param_norms"]), want_pn, rtol=1e-10
    )
    assert out["skip_model_param_norms"] is None
    # Activity norms: batch mean of each example's L2 norm, per layer.
    want_an = [float(jnp.mean(jnp.linalg.norm(a, axis=1))) for a in acts]
    got_an = np.asarray(out["activity_norms"])
    np.testing.assert_allclose(got_an[: p.L - 1], want_an[: p.L - 1], rtol=1e-10)


# ------------------------------------------------------------------ ODE path


@pytest.mark.slow
def test_make_pc_step_ode_updates_at_final_state(key):
    """Default ODE path: param grads at the inferred state (not the ffwd state)."""
    p = random_problem(key, WIDTHS, 3, skip=True, param_type="mupc")
    optim = optax.sgd(0.2)
    state = init_param_opt(optim, p.model, p.skip_model)
    out = pc_step(p, optim, state)
    iters = jpc.solve_inference(p.params, p.ffwd(), p.y, input=p.x, param_type="mupc")
    acts = [a[-1] for a in iters]
    grads = ref_param_grads(p, acts)
    model, *_ = optax_param_update(optim, state, p.model, p.skip_model, grads)
    assert_trees_close(out["model"], model, rtol=1e-8, atol=1e-12)
    # and that differs from updating at the feedforward state (t = 0)
    g0 = ref_param_grads(p, p.ffwd())
    model0, *_ = optax_param_update(optim, state, p.model, p.skip_model, g0)
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(array_leaves(model), array_leaves(model0), strict=True)
    )
    assert gap > 1e-4


@pytest.mark.slow
def test_record_every_without_record_activities_updates_at_final_state(key):
    """§11.4: record_every alone must not change the update (no update at t = 0)."""
    p = random_problem(key, WIDTHS, 3)
    optim = optax.sgd(0.2)
    state = init_param_opt(optim, p.model)
    plain = pc_step(p, optim, state)
    rec = pc_step(p, optim, state, record_every=2)
    assert_trees_close(rec["model"], plain["model"], rtol=1e-9, atol=1e-13)
    g0 = ref_param_grads(p, p.ffwd())
    model0, *_ = optax_param_update(optim, state, p.model, None, g0)
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(array_leaves(rec["model"]), array_leaves(model0), strict=True)
    )
    assert gap > 1e-4


@pytest.mark.slow
def test_make_pc_step_ode_record_activities(key):
    p = random_problem(key, WIDTHS, 3)
    optim = optax.sgd(0.2)
    state = init_param_opt(optim, p.model)
    kw = dict(
        ode_solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
        max_t1=30,
    )
    rec = pc_step(p, optim, state, record_activities=True, record_energies=True, **kw)
    plain = pc_step(p, optim, state, **kw)
    assert_trees_close(rec["model"], plain["model"], rtol=1e-9, atol=1e-13)
    t_max = int(rec["t_max"])
    assert t_max == int(jpc.get_t_max(rec["activities"]))
    E = np.asarray(rec["energies"])
    assert E.shape[0] == p.L
    # Column k: energies of row k of the trajectory (the state after the (k+1)-th
    # accepted step; the initial state is not a row), computed inside the solve.
    for k in (0, t_max // 2, t_max):
        row = [a[k] for a in rec["activities"]]
        want = ref_layer_energies(p.model, row, p.y, x=p.x)
        np.testing.assert_allclose(E[:, k], np.asarray(want), rtol=1e-10, atol=1e-14)
    want_first = ref_layer_energies(p.model, p.ffwd(), p.y, x=p.x)
    assert E[:, 0].sum() < sum(float(e) for e in want_first)
    assert np.all(E[:, t_max + 1 :] == 0.0)
    tot = E[:, : t_max + 1].sum(0)
    assert np.all(np.diff(tot) <= 1e-10)


# ------------------------------------------------------------------ training


def _regression_batch(key, B=16, d_in=4, d_out=3):
    k1, k2 = jr.split(key)
    x = jr.normal(k1, (B, d_in))
    A = jr.normal(k2, (d_in, d_out))
    return x, jnp.tanh(x @ A)


@pytest.mark.slow
def test_non_finite_energy_raises(key):
    """A diverging inference is reported (SPEC §2), not returned: at the call with
    the `"call"` timing (the default timing is tested in test_step_errors.py)."""
    x, y = _regression_batch(jr.PRNGKey(3))
    model = jpc.make_mlp(key, 4, 16, 3, 3, "tanh")
    optim = optax.sgd(0.1)
    previous = jpc.set_step_error_timing("call")
    with pytest.raises(eqx.EquinoxRuntimeError, match="energy .* is not finite"):
        jpc.make_pc_step(
            model,
            optim,
            init_param_opt(optim, model),
            y,
            input=x,
            activity_optim=optax.sgd(1e300),
            n_inference_steps=5,
        )
    jpc.set_step_error_timing(previous)


@pytest.mark.parametrize("path", ["fused", "ode"])
@pytest.mark.slow
def test_training_reduces_loss(key, path):
    x, y = _regression_batch(jr.PRNGKey(3))
    model = jpc.make_mlp(key, 4, 16, 3, 3, "tanh")
    optim = optax.adam(1e-2)
    state = init_param_opt(optim, model)
    kw = (
        dict(activity_optim=optax.sgd(0.1 * 16), n_inference_steps=20)
        if path == "fused"
        else {}
    )
    losses = []
    for _ in range(40):
        out = jpc.make_pc_step(model, optim, state, y, input=x, **kw)
        model, state = out["model"], out["opt_state"]
        losses.append(float(out["loss"]))
    final_loss, _ = jpc.test_discriminative_pc(model, y, x)
    assert float(final_loss) < 0.5 * losses[0], losses
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_classification_accuracy_rises(key):
    k1, k2 = jr.split(jr.PRNGKey(5))
    labels = jr.randint(k1, (32,), 0, 2)
    x = jr.normal(k2, (32, 2)) * 0.5 + (2.0 * labels[:, None] - 1.0) * jnp.array(
        [1.5, 1.0]
    )
    y = jax.nn.one_hot(labels, 2)
    model = jpc.make_mlp(key, 2, 8, 2, 2, "tanh")
    optim = optax.adam(3e-2)
    state = init_param_opt(optim, model)
    _, acc0 = jpc.test_discriminative_pc(model, y, x, loss="ce")
    activity_optim = optax.sgd(3.2)
    for _ in range(40):
        out = jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            loss_id="ce",
            activity_optim=activity_optim,
            n_inference_steps=10,
        )
        model, state = out["model"], out["opt_state"]
    _, acc = jpc.test_discriminative_pc(model, y, x, loss="ce")
    assert float(acc) >= 85.0 and float(acc) >= float(acc0)


# ------------------------------------------------------------------ backprop


@pytest.mark.parametrize("param_type,skip", [("sp", False), ("mupc", True)])
def test_make_bp_step_equals_hand(key, param_type, skip):
    p = random_problem(key, WIDTHS, 4, skip=skip, param_type=param_type, use_bias=True)
    optim = optax.adam(1e-2)
    state = init_param_opt(optim, p.model, p.skip_model)
    out = jpc.make_bp_step(
        p.model,
        optim,
        state,
        p.y,
        input=p.x,
        skip_model=p.skip_model,
        param_type=param_type,
    )
    assert set(out) >= {"model", "skip_model", "opt_state", "loss"}
    np.testing.assert_allclose(out["loss"], ffwd_loss(p), rtol=1e-10)
    grads = backprop_grads(p)
    skip_grads = (
        None if p.skip_model is None else eqx.filter(p.skip_model, eqx.is_array)
    )
    model, *_ = optax_param_update(
        optim, state, p.model, p.skip_model, (grads, skip_grads)
    )
    assert_trees_close(out["model"], model, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ §11.8 jit


HYPERS = [
    "weight_decay",
    "spectral_penalty",
    "activity_decay",
    "gamma",
    "output_energy_scaling",
    "hidden_energy_scaling",
]


# one optimiser object: optax transformations are closures, so a freshly built
# optimiser is a new static argument (and a legitimate recompilation)
ACTIVITY_SGD = optax.sgd(0.5)


def _fused_call(p, optim, state, **kw):
    out = pc_step(
        p, optim, state, activity_optim=ACTIVITY_SGD, n_inference_steps=3, **kw
    )
    jax.block_until_ready(array_leaves(out["model"]))
    return out


def test_compile_listener_sees_compiles():
    """The counting mechanism itself works (guards the no-recompile tests)."""
    f = eqx.filter_jit(lambda a, s: a * s)
    with count_compiles() as events:
        jax.block_until_ready(f(jnp.ones(7), 2.0))
        jax.block_until_ready(f(jnp.ones(7), 3.0))  # Python float: static → recompiles
    assert len(events) >= 2


@pytest.mark.parametrize("name", HYPERS)
def test_new_float_hyperparameter_does_not_recompile(key, name):
    p = random_problem(key, WIDTHS, 3, param_type="mupc")
    optim = optax.sgd(0.1)
    state = init_param_opt(optim, p.model)
    _fused_call(p, optim, state, **{name: 0.1})
    _fused_call(p, optim, state, **{name: 0.15})
    with count_compiles() as events:
        _fused_call(p, optim, state, **{name: 0.2})
    assert events == []


@pytest.mark.slow
def test_new_float_does_not_recompile_ode_path_and_updates(key):
    p = random_problem(key, WIDTHS, 3)
    optim = optax.sgd(0.1)
    state = init_param_opt(optim, p.model)
    act_state = optim.init(p.activities)

    def run(v):
        out = pc_step(p, optim, state, weight_decay=v, activity_decay=v, max_t1=5)
        r1 = jpc.update_pc_activities(
            p.params, p.activities, optim, act_state, p.y, input=p.x, activity_decay=v
        )
        r2 = jpc.update_pc_params(
            p.params, p.activities, optim, state, p.y, input=p.x, weight_decay=v
        )
        r3 = jpc.solve_inference(
            p.params, p.activities, p.y, input=p.x, activity_decay=v, max_t1=5
        )
        jax.block_until_ready(
            (
                array_leaves(out["model"]),
                r1["activities"],
                array_leaves(r2["model"]),
                r3,
            )
        )

    run(0.1)
    run(0.15)
    with count_compiles() as events:
        run(0.3)
    assert events == []


def test_new_sigma_does_not_recompile(key):
    p = random_problem(key, WIDTHS, 3, supervised=False)
    optim = optax.sgd(0.1)
    state = init_param_opt(optim, p.model)
    kw = dict(key=jr.PRNGKey(1), layer_sizes=p.widths, batch_size=3)
    _fused_call(p, optim, state, sigma=0.1, **kw)
    _fused_call(p, optim, state, sigma=0.15, **kw)
    with count_compiles() as events:
        _fused_call(p, optim, state, sigma=0.2, **kw)
    assert events == []


@pytest.mark.parametrize("name", HYPERS + ["sigma"])
def test_jax_array_hyperparameters(key, name):
    supervised = name != "sigma"
    p = random_problem(key, WIDTHS, 3, supervised=supervised, param_type="ntp")
    optim = optax.sgd(0.1)
    state = init_param_opt(optim, p.model)
    extra = (
        {}
        if supervised
        else dict(key=jr.PRNGKey(1), layer_sizes=p.widths, batch_size=3)
    )
    a = _fused_call(p, optim, state, **{name: 0.3}, **extra)
    b = _fused_call(p, optim, state, **{name: jnp.asarray(0.3)}, **extra)
    assert_trees_close(a["model"], b["model"], rtol=1e-12)
