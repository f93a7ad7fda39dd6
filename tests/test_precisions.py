"""Layer precisions: `hidden_energy_scaling` (κ_l on every hidden term) next to the
output precision λ, checked against hand-written energies, `jax.grad`, `jax.hessian`,
an independent Newton minimisation and the closed form for the linear rescaling S."""

import dataclasses

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    mlp_weights,
    random_problem,
    ref_layer_energies,
    sgd_apply,
)

import jpc


WIDTHS = [3, 4, 4, 4, 2]  # L = 4 layers, 3 hidden terms
KAPPAS = [0.5, 2.0, 3.0]


def ref_energy_with_precisions(p, activities, kappas, lam=1.0):
    """λ E_out + Σ_l κ_l E_l from the independent per-layer reference energies."""
    energies = ref_layer_energies(
        p.model,
        activities,
        p.y,
        x=p.x,
        skip_model=p.skip_model,
        scalings=p.scalings,
        loss=p.loss,
        lam=lam,
    )
    kappas = [kappas] * (len(energies) - 1) if np.ndim(kappas) == 0 else kappas
    return sum(k * e for k, e in zip(kappas, energies[:-1])) + energies[-1]


@pytest.mark.parametrize("kappas", [2.5, KAPPAS, jnp.asarray(KAPPAS)])
@pytest.mark.parametrize(
    "supervised,skip,param_type,loss",
    [
        (True, False, "sp", "mse"),
        (True, True, "mupc", "ce"),
        (False, False, "ntp", "mse"),
    ],
)
def test_energy_and_gradients_match_reference(
    key, kappas, supervised, skip, param_type, loss
):
    p = random_problem(
        key, WIDTHS, 5, supervised, skip, param_type=param_type, loss=loss
    )
    kw = dict(x=p.x, param_type=param_type, output_energy_scaling=0.7)
    energy = jpc.pc_energy_fn(
        p.params, p.activities, p.y, loss=loss, hidden_energy_scaling=kappas, **kw
    )
    ref = ref_energy_with_precisions(p, p.activities, kappas, lam=0.7)
    np.testing.assert_allclose(energy, ref, rtol=1e-10)

    # per-layer energies in the compatible order, each hidden one times its κ
    layers = jpc.pc_energy_fn(
        p.params,
        p.activities,
        p.y,
        loss=loss,
        hidden_energy_scaling=kappas,
        record_layers=True,
        **kw,
    )
    plain = jpc.pc_energy_fn(
        p.params, p.activities, p.y, loss=loss, record_layers=True, **kw
    )
    k = np.broadcast_to(np.asarray(kappas), (3,))
    expected = np.asarray(plain) * np.array([1.0, k[1], k[2], k[0]])
    np.testing.assert_allclose(layers, expected, rtol=1e-12)

    _, grads = jpc.compute_pc_activity_grad(
        p.params, p.activities, p.y, loss_id=loss, hidden_energy_scaling=kappas, **kw
    )
    ref_grads = jax.grad(lambda a: ref_energy_with_precisions(p, a, kappas, 0.7))(
        list(p.activities)
    )
    assert_trees_close(grads, ref_grads)

    model_grads, _ = jpc.compute_pc_param_grads(
        p.params, p.activities, p.y, loss_id=loss, hidden_energy_scaling=kappas, **kw
    )

    def ref_of_model(model):
        q = dataclasses.replace(p, model=model)
        return ref_energy_with_precisions(q, p.activities, kappas, 0.7)

    ref_model_grads = eqx.filter_grad(ref_of_model)(p.model)
    assert_trees_close(
        mlp_weights(model_grads), mlp_weights(ref_model_grads), rtol=1e-10
    )


def test_precision_one_is_the_standard_energy(key):
    p = random_problem(key, WIDTHS, 4, param_type="mupc", skip=True)
    kw = dict(x=p.x, param_type="mupc")
    plain = jpc.pc_energy_fn(p.params, p.activities, p.y, **kw)
    ones = jpc.pc_energy_fn(
        p.params, p.activities, p.y, hidden_energy_scaling=[1.0, 1.0, 1.0], **kw
    )
    np.testing.assert_array_equal(plain, ones)


def _linear(key, skip=False, param_type="sp", batch=6):
    return random_problem(
        key, WIDTHS, batch, True, skip, act_fn="linear", param_type=param_type
    )


@pytest.mark.slow
@pytest.mark.parametrize("skip,param_type", [(False, "sp"), (True, "mupc")])
def test_linear_closed_form_with_precisions_matches_numerical_inference(
    key, skip, param_type
):
    """S and F* of the generalised closed form against a tight ODE solve of the
    energy with the same κ and λ, and against the linear solve of H z = b."""
    p = _linear(key, skip, param_type)
    lam, kappas = 1.5, KAPPAS
    opts = dict(
        param_type=param_type, output_energy_scaling=lam, hidden_energy_scaling=kappas
    )
    energy, rescaling = jpc.linear_equilib_energy(
        p.params, p.x, p.y, return_rescaling=True, **opts
    )
    np.testing.assert_allclose(
        rescaling,
        jpc.compute_linear_equilib_rescaling(p.params, p.x, **opts),
        rtol=1e-12,
    )
    # S written out from its definition with explicit products
    maps = [
        a * w + (np.eye(w.shape[0]) if (skip and 0 < i < 3) else 0.0)
        for i, (a, w) in enumerate(zip(p.scalings, mlp_weights(p.model)))
    ]
    s_ref = np.eye(2) / lam
    for k in range(2, 5):  # l = 2..L: P_l = M_L ... M_l, weighted 1/κ_{l-1}
        prod = np.eye(2)
        for m in reversed(maps[k - 1 :]):
            prod = prod @ m
        s_ref = s_ref + prod @ prod.T / kappas[k - 2]
    np.testing.assert_allclose(rescaling, s_ref, rtol=1e-10)

    solved = jpc.solve_inference(
        p.params,
        p.ffwd(),
        p.y,
        input=p.x,
        solver=diffrax.Tsit5(),
        max_t1=5000,
        max_steps=100_000,
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
        **opts,
    )
    final = [z[-1] for z in solved]
    numerical = jpc.pc_energy_fn(p.params, final, p.y, x=p.x, **opts)
    np.testing.assert_allclose(energy, numerical, rtol=1e-7)

    exact = jpc.compute_linear_activity_solution(
        p.model,
        p.x,
        p.y,
        use_skips=skip,
        param_type=param_type,
        output_energy_scaling=lam,
        hidden_energy_scaling=kappas,
    )
    assert_trees_close(exact[:-1], final[:-1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("skip", [False, True])
def test_linear_hessian_with_precisions_is_the_autodiff_hessian(key, skip):
    p = _linear(key, skip, "ntp", batch=1)
    lam, kappas, decay = 0.8, KAPPAS, 0.3
    weights = mlp_weights(p.model)
    hessian = jpc.compute_linear_activity_hessian(
        weights,
        use_skips=skip,
        param_type="ntp",
        activity_decay=decay,
        output_energy_scaling=lam,
        hidden_energy_scaling=kappas,
    )
    hidden = p.ffwd()[:-1]
    sizes = [z.shape[1] for z in hidden]

    def energy(flat):
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        acts = [z[None] for z in parts] + [p.ffwd()[-1]]
        return jpc.pc_energy_fn(
            p.params,
            acts,
            p.y,
            x=p.x,
            param_type="ntp",
            activity_decay=decay,
            output_energy_scaling=lam,
            hidden_energy_scaling=kappas,
        )

    flat = jnp.concatenate([z[0] for z in hidden])
    np.testing.assert_allclose(hessian, jax.hessian(energy)(flat), rtol=1e-10)


def test_linear_grads_and_update_take_precisions(key):
    """The closed-form gradient equals the PC parameter gradient at the exact
    equilibrium (envelope theorem), with κ; the update applies it."""
    p = _linear(key)
    opts = dict(output_energy_scaling=2.0, hidden_energy_scaling=KAPPAS)
    grads = jpc.compute_linear_equilib_energy_grads(p.params, p.x, p.y, **opts)
    exact = jpc.compute_linear_activity_solution(p.model, p.x, p.y, **opts)
    pc_grads = jpc.compute_pc_param_grads(p.params, exact, p.y, x=p.x, **opts)
    assert_trees_close(mlp_weights(grads[0]), mlp_weights(pc_grads[0]), rtol=1e-8)
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    out = jpc.update_linear_equilib_energy_params(
        p.params, optim, state, p.x, p.y, **opts
    )
    for new, old, g in zip(
        mlp_weights(out["model"]), mlp_weights(p.model), mlp_weights(grads[0])
    ):
        np.testing.assert_allclose(new, old - 0.1 * g, rtol=1e-10)


@pytest.mark.slow
def test_steps_and_updates_use_precisions(key):
    """make_pc_step (discrete), make_ipc_step and update_pc_params with κ equal one
    SGD step along the reference gradient at the state they infer."""
    p = random_problem(key, WIDTHS, 4)
    optim = optax.sgd(0.05)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    out = jpc.update_pc_params(
        p.params,
        p.activities,
        optim,
        state,
        p.y,
        input=p.x,
        hidden_energy_scaling=KAPPAS,
    )
    ref = eqx.filter_grad(
        lambda m: ref_energy_with_precisions(
            dataclasses.replace(p, model=m), p.activities, KAPPAS
        )
    )(p.model)
    for new, old, g in zip(
        mlp_weights(out["model"]), mlp_weights(p.model), mlp_weights(ref)
    ):
        np.testing.assert_allclose(new, old - 0.05 * g, rtol=1e-10)

    # zero activity steps: the step's gradient is the one at the feedforward state,
    # where only the output term (not κ) is non-zero
    step = jpc.make_pc_step(
        p.model,
        optim,
        state,
        p.y,
        input=p.x,
        activity_optim=optax.sgd(0.0),
        n_inference_steps=1,
        hidden_energy_scaling=KAPPAS,
        grad_norms=True,
    )
    plain = jpc.make_pc_step(
        p.model,
        optim,
        state,
        p.y,
        input=p.x,
        activity_optim=optax.sgd(0.0),
        n_inference_steps=1,
        grad_norms=True,
    )
    np.testing.assert_allclose(
        step["model_grad_norms"], plain["model_grad_norms"], rtol=1e-12
    )
    # with real inference steps: 5 SGD steps on the κ-weighted reference energy,
    # then one SGD step on the weights at the inferred state (written by hand)
    eta, lr, steps = 0.5, 0.05, 5

    def ref(model, acts):
        return ref_energy_with_precisions(
            dataclasses.replace(p, model=model), acts, KAPPAS
        )

    acts = p.ffwd()
    for _ in range(steps):
        g = jax.grad(ref, argnums=1)(p.model, acts)
        acts = [z - eta * dz for z, dz in zip(acts[:-1], g[:-1])] + [acts[-1]]
    w_grads = mlp_weights(eqx.filter_grad(ref)(p.model, acts))
    step = jpc.make_pc_step(
        p.model,
        optim,
        state,
        p.y,
        input=p.x,
        activity_optim=optax.sgd(eta),
        n_inference_steps=steps,
        hidden_energy_scaling=KAPPAS,
    )
    for new, old, g in zip(mlp_weights(step["model"]), mlp_weights(p.model), w_grads):
        np.testing.assert_allclose(new, old - lr * g, rtol=1e-9, atol=1e-14)

    # iPC: activities and weights step together, both gradients at the same state
    model, acts = p.model, p.ffwd()
    for _ in range(2):
        g_z = jax.grad(ref, argnums=1)(model, acts)
        g_w = eqx.filter_grad(ref)(model, acts)
        acts = [z - eta * dz for z, dz in zip(acts[:-1], g_z[:-1])] + [acts[-1]]
        model = sgd_apply(model, g_w, lr)
    ipc = jpc.make_ipc_step(
        p.model,
        optim,
        state,
        p.y,
        input=p.x,
        activity_optim=optax.sgd(eta),
        n_inference_steps=2,
        hidden_energy_scaling=KAPPAS,
    )
    assert_trees_close(
        mlp_weights(ipc["model"]), mlp_weights(model), rtol=1e-9, atol=1e-14
    )


def test_vector_field_args_with_precisions_and_controller(key):
    p = random_problem(key, WIDTHS, 3)
    base = (p.params, p.y, p.x, "mse", "sp", 0.0, 0.0, 0.0, None, 0.7)
    controller = diffrax.PIDController(rtol=1e-3, atol=1e-3)
    expected = jpc.compute_pc_activity_grad(
        p.params,
        p.activities,
        p.y,
        x=p.x,
        output_energy_scaling=0.7,
        hidden_energy_scaling=KAPPAS,
    )[1]
    for args in [(*base, KAPPAS), (*base, KAPPAS, controller)]:
        field = jpc.neg_pc_activity_grad(0.0, p.activities, args)
        assert_trees_close([-g for g in field], expected)
    # the JPC library's 11-entry form (controller last) has κ = 1
    field = jpc.neg_pc_activity_grad(0.0, p.activities, (*base, controller))
    plain = jpc.compute_pc_activity_grad(
        p.params, p.activities, p.y, x=p.x, output_energy_scaling=0.7
    )[1]
    assert_trees_close([-g for g in field], plain)


@pytest.mark.parametrize(
    "value,error,match",
    [
        ([1.0, 2.0], ValueError, r"one value per hidden term \(L - 1 = 3"),
        (jnp.ones((2, 3)), ValueError, "hidden term"),
        ([1.0, -2.0, 1.0], ValueError, "finite and positive"),
        (0.0, ValueError, "finite and positive"),
        (float("inf"), ValueError, "finite and positive"),
        ("big", TypeError, "`hidden_energy_scaling` must be"),
    ],
)
def test_bad_precisions_are_refused(key, value, error, match):
    p = random_problem(key, WIDTHS, 3)
    with pytest.raises(error, match=match):
        jpc.pc_energy_fn(
            p.params, p.activities, p.y, x=p.x, hidden_energy_scaling=value
        )
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    with pytest.raises((ValueError, TypeError), match="hidden"):
        jpc.make_pc_step(
            p.model,
            optim,
            state,
            p.y,
            input=p.x,
            activity_optim=optax.sgd(0.1),
            n_inference_steps=2,
            hidden_energy_scaling=value,
        )
