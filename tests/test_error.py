"""Error-based PC (SPEC §6.3, §11.3): energy, gradients, equilibrium, updates."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    central_fd_grad,
    init_param_opt,
    optax_param_update,
    random_problem,
    ref_equilibrium,
    ref_forward,
    ref_output_loss,
)
from jax.flatten_util import ravel_pytree

import jpc


WIDTHS = [4, 5, 5, 3]
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


def ref_perturbed(p, errors, model=None):
    """Hand-written ePC forward pass: [z_1, ..., z_L] with ε added to hidden layers."""
    model = p.model if model is None else model
    z = p.x if p.supervised else errors[0]
    hidden = errors if p.supervised else errors[1:]
    zs = []
    for i in range(p.L):
        skip = None if p.skip_model is None else p.skip_model[i : i + 1]
        z = ref_forward(
            model[i : i + 1], z, skip_model=skip, scalings=p.scalings[i : i + 1]
        )[0]
        if i < p.L - 1:
            z = z + hidden[i]
        zs.append(z)
    return zs


def ref_epc_energy(p, errors, model=None, lam=1.0):
    hidden = errors if p.supervised else errors[1:]
    pred = ref_perturbed(p, errors, model)[-1]
    sq = sum(jnp.sum(e**2) for e in hidden)
    return (0.5 * sq + lam * ref_output_loss(pred, p.y, p.loss)) / p.B


def energy(p, errors, **kw):
    return jpc.epc_energy_fn(
        p.params,
        errors,
        p.y,
        x=p.x,
        loss=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        **kw,
    )


# ------------------------------------------------------------------ layout


def test_init_epc_errors_layouts():
    # len(layer_sizes) - 1 arrays; supervised ends with the never-read output slot
    sup = jpc.init_epc_errors([4, 5, 6, 3], 2)
    assert [e.shape for e in sup] == [(2, 5), (2, 6), (2, 3)]
    uns = jpc.init_epc_errors([4, 5, 6, 3], 2, mode="unsupervised")
    assert [e.shape for e in uns] == [(2, 4), (2, 5), (2, 6)]
    conv = jpc.init_epc_errors([(1, 4, 4), (2, 3, 3), 3], 2)
    assert [e.shape for e in conv] == [(2, 2, 3, 3), (2, 3)]
    for e in [*sup, *uns, *conv]:
        assert not np.any(np.asarray(e))


# ------------------------------------------------------------------ energy


@pytest.mark.parametrize("case", CASES)
def test_epc_energy_matches_formula(key, case):
    p, errors = make_problem(key, case)
    lam = 0.7
    got = energy(p, errors, output_energy_scaling=lam)
    np.testing.assert_allclose(got, ref_epc_energy(p, errors, lam=lam), rtol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_epc_energy_is_pc_energy_of_perturbed_pass(key, case):
    """F_ePC(ε) = F_PC(z(ε)): the hidden PC errors of z(ε) are exactly ε."""
    p, errors = make_problem(key, case)
    zs = ref_perturbed(p, errors)
    activities = zs if p.supervised else [errors[0], *zs]
    pc = p.ref(activities)
    np.testing.assert_allclose(energy(p, errors), pc, rtol=1e-12)


def test_zero_errors_give_feedforward_loss(key):
    p, _ = make_problem(key, CASES[1])
    zeros = jpc.init_epc_errors(p.widths, p.B)
    ffwd_loss = ref_output_loss(p.ffwd()[-1], p.y, p.loss) / p.B
    np.testing.assert_allclose(energy(p, zeros), ffwd_loss, rtol=1e-12)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("case", CASES)
def test_error_grad_against_autodiff_and_fd(key, case):
    p, errors = make_problem(key, case)
    e, grads = jpc.compute_epc_error_grad(
        p.params,
        errors,
        p.y,
        x=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
    )
    np.testing.assert_allclose(e, ref_epc_energy(p, errors), rtol=1e-12)
    assert_trees_close(
        grads, jax.grad(lambda a: ref_epc_energy(p, a))(errors), rtol=1e-10
    )
    fd = central_fd_grad(lambda a: ref_epc_energy(p, a), errors)
    assert_trees_close(grads, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", CASES[:2])
def test_param_grads_against_autodiff_and_fd(key, case):
    p, errors = make_problem(key, case)
    grads = jpc.compute_epc_param_grads(
        p.params,
        errors,
        p.y,
        x=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
    )
    ref = eqx.filter_grad(lambda m: ref_epc_energy(p, errors, m))(p.model)
    assert_trees_close(grads[0], ref, rtol=1e-10, atol=1e-14)
    fd = central_fd_grad(lambda m: ref_epc_energy(p, errors, m), p.model)
    assert_trees_close(eqx.filter(grads[0], eqx.is_array), fd, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ equilibrium


def newton_min(f, tree, iters=40):
    flat, unravel = ravel_pytree(tree)
    g = jax.jit(jax.grad(lambda v: f(unravel(v))))
    h = jax.jit(jax.hessian(lambda v: f(unravel(v))))
    for _ in range(iters):
        flat = flat - jnp.linalg.solve(h(flat), g(flat))
    assert float(jnp.max(jnp.abs(g(flat)))) < 1e-12
    return unravel(flat)


@pytest.mark.parametrize("case", [CASES[0], dict(CASES[1], loss="mse")])
@pytest.mark.slow
def test_equilibrium_energy_equals_pc(key, case):
    """SPEC §6.3/§11.3: minimising over ε reaches PC's equilibrium energy, not 0."""
    p, _ = make_problem(key, case)
    # hidden errors only: the output slot is never read (no curvature for Newton)
    zeros = jpc.init_epc_errors(p.widths, p.B)[:-1]
    eps_star = newton_min(lambda e: energy(p, e), zeros)
    pc_star = ref_equilibrium(p)
    e_epc, e_pc = energy(p, eps_star), p.ref(pc_star)
    np.testing.assert_allclose(e_epc, e_pc, rtol=1e-9)
    assert float(e_epc) > 1e-2 * float(energy(p, zeros)) > 0
    # The equilibria are the same point: z(ε*) = z*.
    zs = ref_perturbed(p, eps_star)
    for a, b in zip(zs[:-1], pc_star[:-1]):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


def test_sgd_on_errors_reaches_pc_equilibrium(key):
    p, _ = make_problem(key, CASES[0])
    errors = jpc.init_epc_errors(p.widths, p.B)
    optim = optax.sgd(0.5 * p.B)
    state = optim.init(errors)
    energies = []
    for _ in range(300):
        r = jpc.update_epc_errors(p.params, errors, optim, state, p.y, input=p.x)
        errors, state = r["errors"], r["opt_state"]
        energies.append(float(r["energy"]))
    assert all(b <= a + 1e-12 for a, b in zip(energies, energies[1:]))
    np.testing.assert_allclose(energy(p, errors), p.ref(ref_equilibrium(p)), rtol=1e-6)


# ------------------------------------------------------------------ updates


@pytest.mark.parametrize("case", CASES[1:])
def test_update_epc_errors_is_one_optax_step(key, case):
    p, errors = make_problem(key, case)
    optim = optax.adam(0.1)
    state = optim.init(errors)
    out = jpc.update_epc_errors(
        p.params,
        errors,
        optim,
        state,
        p.y,
        input=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
    )
    grads = jax.grad(lambda a: ref_epc_energy(p, a))(errors)
    updates, ref_state = optim.update(grads, state, errors)
    assert_trees_close(out["errors"], optax.apply_updates(errors, updates), rtol=1e-10)
    assert_trees_close(out["opt_state"], ref_state, rtol=1e-10)
    np.testing.assert_allclose(out["energy"], ref_epc_energy(p, errors), rtol=1e-12)


@pytest.mark.parametrize("case", CASES[1:])
def test_update_epc_params_is_one_optax_step(key, case):
    p, errors = make_problem(key, case)
    optim = optax.adam(1e-2)
    state = init_param_opt(optim, p.model, p.skip_model)
    out = jpc.update_epc_params(
        p.params,
        errors,
        optim,
        state,
        p.y,
        input=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        output_energy_scaling=0.5,
    )
    grads = eqx.filter_grad(lambda m: ref_epc_energy(p, errors, m, lam=0.5))(p.model)
    skip_grads = (
        None if p.skip_model is None else eqx.filter(p.skip_model, eqx.is_array)
    )
    model, skip, _ = optax_param_update(
        optim, state, p.model, p.skip_model, (grads, skip_grads)
    )
    assert_trees_close(out["model"], model, rtol=1e-10, atol=1e-14)
    assert set(out) == {"model", "skip_model", "grads", "opt_state"}


# ------------------------------------------------------------------ errors


def test_errors_raise(key):
    p, errors = make_problem(key, CASES[0])
    with pytest.raises(ValueError, match="`errors` must have 2 entries"):
        energy(p, errors[:1])
    with pytest.raises(ValueError, match="`errors` must have 3 entries"):
        jpc.epc_energy_fn(p.params, errors, p.y)
    with pytest.raises(ValueError, match="hidden layer 1 has shape"):
        energy(p, [errors[0][:, :2], errors[1]])
    with pytest.raises(ValueError, match="`mode` must be one of"):
        jpc.init_epc_errors(p.widths, 3, mode="supervise")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        jpc.init_epc_errors(p.widths, 0)
    with pytest.raises(ValueError, match="`layer_sizes` must list"):
        jpc.init_epc_errors([4], 2)
    with pytest.raises(ValueError, match="`loss` must be one of"):
        jpc.epc_energy_fn(p.params, errors, p.y, x=p.x, loss="l2")
    with pytest.raises(ValueError, match="`errors\\[0\\]` must have batch size 3"):
        energy(p, [e[:2] for e in errors])


def test_loss_id_errors_name_loss_id(key):
    """The `loss_id` wrappers name `loss_id` (not `loss`) and the value received."""
    p, errors = make_problem(key, CASES[0])
    optim = optax.sgd(0.1)
    calls = [
        lambda: jpc.compute_epc_error_grad(p.params, errors, p.y, x=p.x, loss_id="l2"),
        lambda: jpc.compute_epc_param_grads(p.params, errors, p.y, x=p.x, loss_id="l2"),
        lambda: jpc.update_epc_errors(
            p.params, errors, optim, optim.init(errors), p.y, input=p.x, loss_id="l2"
        ),
        lambda: jpc.update_epc_params(
            p.params,
            errors,
            optim,
            init_param_opt(optim, p.model, p.skip_model),
            p.y,
            input=p.x,
            loss_id="l2",
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="`loss_id` must be one of .*got 'l2'"):
            call()


def test_params_must_be_a_pair(key):
    p, errors = make_problem(key, CASES[0])
    with pytest.raises(TypeError, match="`params` must be the pair.*got list"):
        jpc.epc_energy_fn(p.model, errors, p.y, x=p.x)


def test_update_batch_errors_name_input_and_output(key):
    p, errors = make_problem(key, CASES[0])
    optim = optax.sgd(0.1)
    match = "`input` and `output` must have the same batch size"
    with pytest.raises(ValueError, match=match):
        jpc.update_epc_errors(
            p.params, errors, optim, optim.init(errors), p.y, input=p.x[:2]
        )
    state = init_param_opt(optim, p.model, p.skip_model)
    with pytest.raises(ValueError, match=match):
        jpc.update_epc_params(p.params, errors, optim, state, p.y, input=p.x[:2])
