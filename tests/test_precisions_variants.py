"""Layer precisions κ (`hidden_energy_scaling`) in the variants: error-based PC
against hand-written κ-weighted energies, `jax.grad` and the standard PC energy at
the corresponding activities; the noise-free MCPC step against `make_pc_step`;
bidirectional PC against its hand-written terms, each hidden layer's two errors
weighted by its κ."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    count_compiles,
    init_param_opt,
    random_problem,
    ref_forward,
    ref_output_loss,
)
from test_bidirectional import (
    CASES as BPC_CASES,
    lib_kwargs,
    make_problem as make_bpc_problem,
    ref_terms,
)

import jpc


WIDTHS = [4, 5, 5, 5, 3]  # L = 4 layers, 3 hidden terms
KAPPAS = [0.5, 2.0, 3.0]
CASES = [
    dict(supervised=True, skip=False, param_type="sp", loss="mse"),
    dict(supervised=True, skip=True, param_type="mupc", loss="ce", gamma=2.0),
    dict(supervised=False, skip=True, param_type="ntp", loss="mse"),
]


def make_problem(key, case, batch=3):
    p = random_problem(key, WIDTHS, batch, use_bias=True, **case)
    sizes = p.widths[1:-1] if p.supervised else p.widths[:-1]
    keys = jr.split(jr.PRNGKey(5), len(sizes))
    errors = [0.5 * jr.normal(k, (batch, n)) for k, n in zip(keys, sizes)]
    return p, errors


def layer_step(p, model, i, z):
    """Hand-written prediction of layer `i + 1` from `z` (skip included)."""
    skip = None if p.skip_model is None else p.skip_model[i : i + 1]
    return ref_forward(
        model[i : i + 1], z, skip_model=skip, scalings=p.scalings[i : i + 1]
    )[0]


def ref_epc_energy(p, errors, kappas, lam=1.0, model=None):
    """(1/B)[Σ_l κ_l/2 ‖ε_l‖² + λ ℓ(ŷ(ε), y)], written out layer by layer."""
    model = p.model if model is None else model
    z = p.x if p.supervised else errors[0]
    hidden = errors if p.supervised else errors[1:]
    kappas = np.broadcast_to(np.asarray(kappas, dtype=float), (len(hidden),))
    for i in range(p.L):
        z = layer_step(p, model, i, z)
        if i < p.L - 1:
            z = z + hidden[i]
    sq = sum(k * 0.5 * jnp.sum(e**2) for k, e in zip(kappas, hidden))
    return (sq + lam * ref_output_loss(z, p.y, p.loss)) / p.B


def epc_options(p, **kw):
    return dict(x=p.x, param_type=p.param_type, gamma=p.gamma, **kw)


# ------------------------------------------------------------------ ePC energy


@pytest.mark.parametrize(
    "case,kappas",
    [(CASES[0], 2.5), (CASES[1], KAPPAS), (CASES[2], jnp.asarray(KAPPAS))],
)
def test_epc_energy_with_precisions_matches_formula(key, case, kappas):
    p, errors = make_problem(key, case)
    got = jpc.epc_energy_fn(
        p.params,
        errors,
        p.y,
        loss=p.loss,
        **epc_options(p, output_energy_scaling=0.7, hidden_energy_scaling=kappas),
    )
    ref = ref_epc_energy(p, errors, kappas, lam=0.7)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


@pytest.mark.parametrize(
    "case,kappas", [(CASES[0], KAPPAS), (CASES[1], 2.5), (CASES[2], KAPPAS)]
)
def test_epc_energy_is_pc_energy_at_the_same_state(key, case, kappas):
    """At ε_l = z_l − a_l f_l(z_{l−1}) − s_l(z_{l−1}) of random PC activities z,
    the κ-weighted ePC energy equals `pc_energy_fn` with the same κ and λ."""
    p, _ = make_problem(key, case)
    acts = p.activities
    full = [p.x, *acts] if p.supervised else acts  # [z_0, ..., z_L]
    errors = [full[i + 1] - layer_step(p, p.model, i, full[i]) for i in range(p.L - 1)]
    if not p.supervised:
        errors = [acts[0], *errors]  # the free latent z_0 leads the list
    options = dict(
        loss=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        output_energy_scaling=1.3,
        hidden_energy_scaling=kappas,
    )
    epc = jpc.epc_energy_fn(p.params, errors, p.y, x=p.x, **options)
    pc = jpc.pc_energy_fn(p.params, acts, p.y, x=p.x, **options)
    np.testing.assert_allclose(epc, pc, rtol=1e-12)
    # and κ changes the energy (the check is not blind to it)
    options["hidden_energy_scaling"] = None
    plain = jpc.pc_energy_fn(p.params, acts, p.y, x=p.x, **options)
    assert abs(float(pc) - float(plain)) > 1e-3 * abs(float(plain))


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("case", CASES)
def test_epc_gradients_with_precisions_match_autodiff(key, case):
    p, errors = make_problem(key, case)
    kw = epc_options(p, output_energy_scaling=0.6, hidden_energy_scaling=KAPPAS)
    energy, grads = jpc.compute_epc_error_grad(
        p.params, errors, p.y, loss_id=p.loss, **kw
    )
    np.testing.assert_allclose(
        energy, ref_epc_energy(p, errors, KAPPAS, lam=0.6), rtol=1e-12
    )
    ref = jax.grad(lambda e: ref_epc_energy(p, e, KAPPAS, lam=0.6))(errors)
    assert_trees_close(grads, ref, rtol=1e-10, atol=1e-14)

    model_grads, _ = jpc.compute_epc_param_grads(
        p.params, errors, p.y, loss_id=p.loss, **kw
    )
    ref_model = eqx.filter_grad(
        lambda m: ref_epc_energy(p, errors, KAPPAS, lam=0.6, model=m)
    )(p.model)
    assert_trees_close(
        eqx.filter(model_grads, eqx.is_array),
        eqx.filter(ref_model, eqx.is_array),
        rtol=1e-10,
        atol=1e-14,
    )


def test_epc_updates_with_precisions_are_one_optax_step(key):
    p, errors = make_problem(key, CASES[1])
    kw = dict(
        input=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        output_energy_scaling=0.5,
        hidden_energy_scaling=KAPPAS,
    )
    optim = optax.adam(0.1)
    state = optim.init(errors)
    out = jpc.update_epc_errors(p.params, errors, optim, state, p.y, **kw)
    grads = jax.grad(lambda e: ref_epc_energy(p, e, KAPPAS, lam=0.5))(errors)
    updates, ref_state = optim.update(grads, state, errors)
    assert_trees_close(out["errors"], optax.apply_updates(errors, updates), rtol=1e-10)
    np.testing.assert_allclose(
        out["energy"], ref_epc_energy(p, errors, KAPPAS, lam=0.5), rtol=1e-12
    )

    param_optim = optax.sgd(0.1)
    param_state = init_param_opt(param_optim, p.model, p.skip_model)
    out = jpc.update_epc_params(p.params, errors, param_optim, param_state, p.y, **kw)
    g = eqx.filter_grad(lambda m: ref_epc_energy(p, errors, KAPPAS, 0.5, m))(p.model)
    expected = jax.tree_util.tree_map(
        lambda w, d: w - 0.1 * d,
        eqx.filter(p.model, eqx.is_array),
        eqx.filter(g, eqx.is_array),
    )
    assert_trees_close(
        eqx.filter(out["model"], eqx.is_array), expected, rtol=1e-10, atol=1e-14
    )


def test_new_precisions_reuse_the_compiled_epc_update(key):
    p, errors = make_problem(key, CASES[0])
    optim = optax.sgd(0.1)
    state = optim.init(errors)

    def run(kappas):
        return jpc.update_epc_errors(
            p.params,
            errors,
            optim,
            state,
            p.y,
            input=p.x,
            hidden_energy_scaling=kappas,
        )["energy"]

    run([1.0, 2.0, 3.0])
    with count_compiles() as compiles:
        energy = run([3.0, 1.0, 0.5])
    assert compiles == []
    np.testing.assert_allclose(
        energy, ref_epc_energy(p, errors, [3.0, 1.0, 0.5]), rtol=1e-12
    )


# ------------------------------------------------------------------ MCPC


@pytest.mark.parametrize("kappas", [KAPPAS, pytest.param(2.5, marks=pytest.mark.slow)])
def test_noise_free_mcpc_step_with_precisions_is_make_pc_step(kappas):
    """`noise_scale=0`, `n_burn_in = T − 1`: gradient descent with step η·B on the
    κ-weighted energy, as `make_pc_step` with `activity_optim=optax.sgd(η·B)` and
    the same κ (which changes that step: see tests/test_precisions.py)."""
    p = random_problem(jr.key(11), [3, 5, 5, 5, 2], batch=4)
    eta, steps, batch = 0.04, 6, 4
    optim = optax.adam(1e-2)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    common = dict(
        input=p.x,
        n_inference_steps=steps,
        output_energy_scaling=1.5,
        hidden_energy_scaling=kappas,
    )
    pc = jpc.make_pc_step(
        p.model, optim, state, p.y, activity_optim=optax.sgd(eta * batch), **common
    )

    mc = jpc.make_mcpc_step(
        p.model,
        optim,
        state,
        p.y,
        key=jr.key(12),
        activity_lr=eta,
        noise_scale=0.0,
        n_burn_in=steps - 1,
        **common,
    )
    for name in ("model", "opt_state", "activities", "energies"):
        assert_trees_close(
            eqx.filter(mc[name], eqx.is_array), eqx.filter(pc[name], eqx.is_array)
        )


# ------------------------------------------------------------------ bPC

BPC_KAPPAS = [0.5, 3.0]  # the bPC problems have H = 2 hidden layers


def ref_bpc_terms(pb, kappas, activities=None, models=(None, None), a_f=1.0, a_b=1.0):
    """Hand-written terms, each hidden layer's two errors times its κ: forward
    term j is the error of z_{j+1}, backward term j that of z_j."""
    fwd, bwd = ref_terms(pb, activities, *models, a_f=a_f, a_b=a_b)
    kappas = list(np.broadcast_to(np.asarray(kappas, dtype=float), (len(fwd) - 1,)))
    fwd = [k * e for k, e in zip([*kappas, 1.0], fwd)]
    bwd = [k * e for k, e in zip([1.0, *kappas], bwd)]
    return fwd, bwd


def ref_bpc_energy(pb, kappas, *args, **kw):
    fwd, bwd = ref_bpc_terms(pb, kappas, *args, **kw)
    return sum(fwd) + sum(bwd)


def bpc_call(fn, pb, *args, **kw):
    models = (pb["top_down"], pb["bottom_up"])
    return fn(*models, pb["activities"], *args, **kw)


@pytest.mark.parametrize("kappas", [2.5, BPC_KAPPAS])
@pytest.mark.parametrize("case", BPC_CASES)
def test_bpc_energy_with_precisions_matches_formula(key, case, kappas):
    pb = make_bpc_problem(key, **case)
    kw = dict(
        **lib_kwargs(pb),
        forward_energy_weight=0.7,
        backward_energy_weight=0.3,
        hidden_energy_scaling=kappas,
    )
    got = bpc_call(jpc.bpc_energy_fn, pb, pb["y"], **kw)
    ref = ref_bpc_energy(pb, kappas, a_f=0.7, a_b=0.3)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    layers = bpc_call(jpc.bpc_energy_fn, pb, pb["y"], record_layers=True, **kw)
    fwd, bwd = ref_bpc_terms(pb, kappas, a_f=0.7, a_b=0.3)
    # [E_td(y), E_bu(x), E_td(z_1), E_bu(z_1), ..., E_td(z_H), E_bu(z_H)]
    pairs = [e for j in range(len(fwd) - 1) for e in (fwd[j], bwd[j + 1])]
    np.testing.assert_allclose(layers, np.array([fwd[-1], bwd[0], *pairs]), rtol=1e-12)


def test_bpc_without_backward_terms_is_pc_with_the_same_precisions(key):
    pb = make_bpc_problem(key, skip=True)
    got = bpc_call(
        jpc.bpc_energy_fn,
        pb,
        pb["y"],
        **lib_kwargs(pb),
        forward_energy_weight=1.5,
        backward_energy_weight=0.0,
        hidden_energy_scaling=BPC_KAPPAS,
    )
    pc = jpc.pc_energy_fn(
        (pb["top_down"], pb["skip_model"]),
        pb["activities"],
        pb["y"],
        x=pb["x"],
        hidden_energy_scaling=BPC_KAPPAS,
    )
    np.testing.assert_allclose(got, 1.5 * pc, rtol=1e-12)


@pytest.mark.parametrize("case", BPC_CASES[1:])
def test_bpc_gradients_with_precisions_match_autodiff(key, case):
    pb = make_bpc_problem(key, **case)
    kw = dict(**lib_kwargs(pb), backward_energy_weight=0.4)
    kw["hidden_energy_scaling"] = BPC_KAPPAS
    energy, grads = bpc_call(jpc.compute_bpc_activity_grad, pb, pb["y"], **kw)

    def f(acts):
        return ref_bpc_energy(pb, BPC_KAPPAS, acts, a_b=0.4)

    np.testing.assert_allclose(energy, f(pb["activities"]), rtol=1e-12)
    assert_trees_close(grads, jax.grad(f)(pb["activities"]), rtol=1e-10, atol=1e-14)

    models = (pb["top_down"], pb["bottom_up"])
    got = bpc_call(jpc.compute_bpc_param_grads, pb, pb["y"], **kw)
    ref = eqx.filter_grad(lambda ms: ref_bpc_energy(pb, BPC_KAPPAS, None, ms, a_b=0.4))(
        models
    )
    assert_trees_close(got, ref, rtol=1e-10, atol=1e-14)


def test_bpc_updates_take_traced_precisions(key):
    pb = make_bpc_problem(key, skip=True)
    optim = optax.sgd(0.5)
    state = optim.init(pb["activities"])

    def run(kappas):
        return bpc_call(
            jpc.update_bpc_activities,
            pb,
            optim,
            state,
            pb["y"],
            input=pb["x"],
            skip_model=pb["skip_model"],
            hidden_energy_scaling=kappas,
        )

    run([1.0, 1.0])
    with count_compiles() as compiles:
        out = run(BPC_KAPPAS)
    assert compiles == []
    grads = jax.grad(lambda a: ref_bpc_energy(pb, BPC_KAPPAS, a))(pb["activities"])
    expected = [a - 0.5 * g for a, g in zip(pb["activities"], grads)]
    assert_trees_close(out["activities"], expected, rtol=1e-10, atol=1e-14)

    optims = (optax.sgd(0.1), optax.sgd(0.2))
    models = (pb["top_down"], pb["bottom_up"])
    states = [o.init(eqx.filter(m, eqx.is_array)) for o, m in zip(optims, models)]
    out = bpc_call(
        jpc.update_bpc_params,
        pb,
        *optims,
        *states,
        pb["y"],
        input=pb["x"],
        skip_model=pb["skip_model"],
        hidden_energy_scaling=BPC_KAPPAS,
    )
    ref = eqx.filter_grad(lambda ms: ref_bpc_energy(pb, BPC_KAPPAS, None, ms))(models)
    for lr, model, g, got in zip((0.1, 0.2), models, ref, out["models"]):
        expected = jax.tree_util.tree_map(
            lambda w, d, lr=lr: w - lr * d,
            eqx.filter(model, eqx.is_array),
            eqx.filter(g, eqx.is_array),
        )
        assert_trees_close(
            eqx.filter(got, eqx.is_array), expected, rtol=1e-10, atol=1e-14
        )


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "value,error,match",
    [
        ([1.0, 2.0], ValueError, r"one value per hidden term \(L - 1 = 3"),
        ([1.0, -2.0, 1.0], ValueError, "finite and positive"),
        (0.0, ValueError, "finite and positive"),
        ("big", TypeError, "`hidden_energy_scaling` must be"),
    ],
)
def test_bad_precisions_are_refused_by_the_variants(key, value, error, match):
    p, errors = make_problem(key, CASES[0])
    with pytest.raises(error, match=match):
        jpc.epc_energy_fn(p.params, errors, p.y, x=p.x, hidden_energy_scaling=value)
    optim = optax.sgd(0.1)
    with pytest.raises(error, match=match):
        jpc.update_epc_errors(
            p.params,
            errors,
            optim,
            optim.init(errors),
            p.y,
            input=p.x,
            hidden_energy_scaling=value,
        )
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    with pytest.raises(error, match=match):
        jpc.make_mcpc_step(
            p.model,
            optim,
            state,
            p.y,
            input=p.x,
            key=jr.key(0),
            n_inference_steps=2,
            activity_lr=0.01,
            hidden_energy_scaling=value,
        )


@pytest.mark.parametrize(
    "value,error,match",
    [
        ([1.0, 2.0, 3.0], ValueError, r"one value per hidden term \(L - 1 = 2"),
        ([1.0, float("nan")], ValueError, "finite and positive"),
        (-1.0, ValueError, "finite and positive"),
        ({"a": 1.0}, TypeError, "`hidden_energy_scaling` must be"),
    ],
)
def test_bad_precisions_are_refused_by_bpc(key, value, error, match):
    pb = make_bpc_problem(key)  # L = 3 layers: 2 hidden
    with pytest.raises(error, match=match):
        bpc_call(jpc.bpc_energy_fn, pb, pb["y"], x=pb["x"], hidden_energy_scaling=value)
    optim = optax.sgd(0.1)
    with pytest.raises(error, match=match):
        bpc_call(
            jpc.update_bpc_activities,
            pb,
            optim,
            optim.init(pb["activities"]),
            pb["y"],
            input=pb["x"],
            hidden_energy_scaling=value,
        )
