"""Bidirectional PC (SPEC §6.2): energy, gradients, updates, tracing, errors."""

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
    count_compiles,
    ref_forward,
    ref_scalings,
)

import jpc


D_X, N, D_Y, L, B = 4, 5, 3, 3, 3


def make_problem(key, supervised=True, skip=False, param_type="sp"):
    kf, kb, kx, ky, ka = jr.split(key, 5)
    top_down = jpc.make_mlp(
        kf, D_X, N, L, D_Y, "tanh", use_bias=True, param_type=param_type
    )
    # make_mlp builds y -> ... -> x; listed from the bottom, entry 0 predicts x.
    bottom_up = jpc.make_mlp(
        kb, D_Y, N, L, D_X, "tanh", use_bias=True, param_type=param_type
    )[::-1]
    x = jr.normal(kx, (B, D_X))
    y = jr.normal(ky, (B, D_Y))
    sizes = [N] * (L - 1) + [D_Y] if supervised else [D_X] + [N] * (L - 1) + [D_Y]
    acts = [jr.normal(k, (B, n)) for k, n in zip(jr.split(ka, len(sizes)), sizes)]
    skip_model = jpc.make_skip_model(L) if skip else None
    return dict(
        top_down=top_down,
        bottom_up=bottom_up,
        x=x if supervised else None,
        y=y,
        activities=acts,
        skip_model=skip_model,
        param_type=param_type,
    )


def ref_terms(pb, activities=None, top_down=None, bottom_up=None, a_f=1.0, a_b=1.0):
    """Hand-written [[forward terms], [backward terms]]; column j joins z_j, z_{j+1}."""
    acts = pb["activities"] if activities is None else activities
    f = pb["top_down"] if top_down is None else top_down
    g = pb["bottom_up"] if bottom_up is None else bottom_up
    x, y, skip = pb["x"], pb["y"], pb["skip_model"]
    zs = [x, *acts[:-1], y] if x is not None else [*acts[:-1], y]
    flags = [False] * L if skip is None else [s is not None for s in skip]
    a_top = ref_scalings(
        pb["param_type"], D=D_X, fan_ins=[D_X] + [N] * (L - 1), skip_flags=flags
    )
    # skips act in both directions: entry j (1 <= j <= H - 1) also skips z_{j+1}
    # down into z_j
    down_flags = [f and 1 <= j <= L - 2 for j, f in enumerate(flags)]
    a_bot = ref_scalings(
        pb["param_type"],
        D=D_Y,
        fan_ins=[D_Y] + [N] * (L - 1),
        skip_flags=down_flags[::-1],
    )[::-1]
    fwd, bwd = [], []
    for j in range(L):
        s = None if skip is None else skip[j : j + 1]
        s_down = s if down_flags[j] else None
        pred_up = ref_forward(f[j : j + 1], zs[j], skip_model=s, scalings=[a_top[j]])[0]
        pred_down = ref_forward(
            g[j : j + 1], zs[j + 1], skip_model=s_down, scalings=[a_bot[j]]
        )[0]
        fwd.append(a_f * 0.5 * jnp.sum((zs[j + 1] - pred_up) ** 2) / B)
        bwd.append(a_b * 0.5 * jnp.sum((zs[j] - pred_down) ** 2) / B)
    return fwd, bwd


def ref_energy(pb, *args, **kw):
    fwd, bwd = ref_terms(pb, *args, **kw)
    return sum(fwd) + sum(bwd)


def lib_kwargs(pb):
    return dict(x=pb["x"], skip_model=pb["skip_model"], param_type=pb["param_type"])


CASES = [
    dict(supervised=True, skip=False, param_type="sp"),
    dict(supervised=True, skip=True, param_type="mupc"),
    dict(supervised=False, skip=False, param_type="sp"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_bpc_energy_matches_formula(key, case):
    pb = make_problem(key, **case)
    w = dict(forward_energy_weight=0.7, backward_energy_weight=0.3)
    got = jpc.bpc_energy_fn(
        pb["top_down"],
        pb["bottom_up"],
        pb["activities"],
        pb["y"],
        **lib_kwargs(pb),
        **w,
    )
    np.testing.assert_allclose(got, ref_energy(pb, a_f=0.7, a_b=0.3), rtol=1e-12)
    layers = jpc.bpc_energy_fn(
        pb["top_down"],
        pb["bottom_up"],
        pb["activities"],
        pb["y"],
        **lib_kwargs(pb),
        record_layers=True,
        **w,
    )
    fwd, bwd = ref_terms(pb, a_f=0.7, a_b=0.3)
    # [E_td(y), E_bu(x), E_td(z_1), E_bu(z_1), ..., E_td(z_H), E_bu(z_H)]
    flat = [fwd[-1], bwd[0]] + [e for j in range(L - 1) for e in (fwd[j], bwd[j + 1])]
    np.testing.assert_allclose(layers, np.array(flat), rtol=1e-12)
    np.testing.assert_allclose(jnp.sum(layers), got, rtol=1e-12)


def test_forward_weight_one_backward_zero_is_pc(key):
    """With α_b = 0 the energy is the standard PC energy of the top-down model."""
    pb = make_problem(key, skip=True)
    got = jpc.bpc_energy_fn(
        pb["top_down"],
        pb["bottom_up"],
        pb["activities"],
        pb["y"],
        **lib_kwargs(pb),
        backward_energy_weight=0.0,
    )
    pc = jpc.pc_energy_fn(
        (pb["top_down"], pb["skip_model"]), pb["activities"], pb["y"], x=pb["x"]
    )
    np.testing.assert_allclose(got, pc, rtol=1e-12)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
@pytest.mark.slow
def test_activity_grad_against_autodiff_and_fd(key, case):
    pb = make_problem(key, **case)
    w = dict(forward_energy_weight=1.3, backward_energy_weight=0.4)
    e, grads = jpc.compute_bpc_activity_grad(
        pb["top_down"],
        pb["bottom_up"],
        pb["activities"],
        pb["y"],
        **lib_kwargs(pb),
        **w,
    )
    f = lambda a: ref_energy(pb, a, a_f=1.3, a_b=0.4)  # noqa: E731
    np.testing.assert_allclose(e, f(pb["activities"]), rtol=1e-12)
    assert_trees_close(grads, jax.grad(f)(pb["activities"]), rtol=1e-10, atol=1e-14)
    assert_trees_close(
        grads, central_fd_grad(f, pb["activities"]), rtol=1e-6, atol=1e-9
    )
    assert not np.any(np.asarray(grads[-1]))  # the output slot is never read


@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
@pytest.mark.slow
def test_param_grads_against_autodiff_and_fd(key, case):
    pb = make_problem(key, **case)
    td_grads, bu_grads = jpc.compute_bpc_param_grads(
        pb["top_down"],
        pb["bottom_up"],
        pb["activities"],
        pb["y"],
        **lib_kwargs(pb),
        backward_energy_weight=2.0,
    )

    def f(models):
        return ref_energy(pb, None, *models, a_b=2.0)

    ref = eqx.filter_grad(f)((pb["top_down"], pb["bottom_up"]))
    assert_trees_close((td_grads, bu_grads), ref, rtol=1e-10, atol=1e-14)
    fd = central_fd_grad(f, (pb["top_down"], pb["bottom_up"]))
    assert_trees_close(
        eqx.filter((td_grads, bu_grads), eqx.is_array), fd, rtol=1e-6, atol=1e-9
    )


@pytest.mark.slow
def test_updates_are_optax_steps(key):
    pb = make_problem(key, skip=True)
    act_optim = optax.sgd(0.5)
    out = jpc.update_bpc_activities(
        pb["top_down"],
        pb["bottom_up"],
        pb["activities"],
        act_optim,
        act_optim.init(pb["activities"]),
        pb["y"],
        input=pb["x"],
        skip_model=pb["skip_model"],
        forward_energy_weight=0.5,
    )
    grads = jax.grad(lambda a: ref_energy(pb, a, a_f=0.5))(pb["activities"])
    expected = [a - 0.5 * g for a, g in zip(pb["activities"], grads)]
    assert_trees_close(out["activities"], expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out["energy"], ref_energy(pb, a_f=0.5), rtol=1e-12)

    optims = (optax.adam(1e-2), optax.sgd(0.1))
    models = (pb["top_down"], pb["bottom_up"])
    states = tuple(o.init(eqx.filter(m, eqx.is_array)) for o, m in zip(optims, models))
    out = jpc.update_bpc_params(
        *models,
        pb["activities"],
        *optims,
        *states,
        pb["y"],
        input=pb["x"],
        skip_model=pb["skip_model"],
    )
    assert set(out) == {"models", "grads", "opt_states"}
    ref_grads = eqx.filter_grad(lambda ms: ref_energy(pb, None, *ms))(models)
    for model, g, optim, state, got in zip(
        models, ref_grads, optims, states, out["models"]
    ):
        updates, _ = optim.update(g, state, eqx.filter(model, eqx.is_array))
        assert_trees_close(
            got, eqx.apply_updates(model, updates), rtol=1e-10, atol=1e-14
        )


def test_inference_then_learning_lowers_energy(key):
    """bPC inference descends the energy; learning at the equilibrium lowers it more."""
    pb = make_problem(key, skip=False)
    acts = jpc.init_activities_with_ffwd(pb["top_down"], pb["x"])
    optim = optax.sgd(0.2 * B)
    state = optim.init(acts)
    energies = []
    for _ in range(50):
        r = jpc.update_bpc_activities(
            pb["top_down"], pb["bottom_up"], acts, optim, state, pb["y"], input=pb["x"]
        )
        acts, state = r["activities"], r["opt_state"]
        energies.append(float(r["energy"]))
    assert all(b <= a + 1e-12 for a, b in zip(energies, energies[1:]))
    assert energies[-1] < 0.9 * energies[0]
    optims = (optax.sgd(0.05), optax.sgd(0.05))
    models = (pb["top_down"], pb["bottom_up"])
    states = tuple(o.init(eqx.filter(m, eqx.is_array)) for o, m in zip(optims, models))
    out = jpc.update_bpc_params(*models, acts, *optims, *states, pb["y"], input=pb["x"])
    before = ref_energy(dict(pb), acts)
    after = ref_energy(dict(pb), acts, *out["models"])
    assert float(after) < float(before)


def test_weights_are_traced(key):
    pb = make_problem(key)
    optim = optax.sgd(0.1)
    state = optim.init(pb["activities"])

    def run(w):
        out = jpc.update_bpc_activities(
            pb["top_down"],
            pb["bottom_up"],
            pb["activities"],
            optim,
            state,
            pb["y"],
            input=pb["x"],
            forward_energy_weight=w,
            backward_energy_weight=w,
        )
        return jax.block_until_ready(out["energy"])

    run(0.5)
    with count_compiles() as events:
        e2 = run(0.25)
    assert events == []
    np.testing.assert_allclose(e2, 0.5 * run(jnp.asarray(0.5)), rtol=1e-12)


def test_errors_raise(key):
    pb = make_problem(key)
    td, bu, acts, y = pb["top_down"], pb["bottom_up"], pb["activities"], pb["y"]
    with pytest.raises(ValueError, match="`bottom_up_model` must have one layer per"):
        jpc.bpc_energy_fn(td, bu[:-1], acts, y, x=pb["x"])
    with pytest.raises(ValueError, match="`activities` must have 2 entries"):
        jpc.bpc_energy_fn(td, bu, acts[:-2], y, x=pb["x"])
    with pytest.raises(ValueError, match="`param_type` must be one of"):
        jpc.bpc_energy_fn(td, bu, acts, y, x=pb["x"], param_type="mup")
    wrong = jpc.make_mlp(jr.PRNGKey(3), D_Y, N, L, D_X + 1, "tanh")[::-1]
    with pytest.raises(ValueError, match="`bottom_up_model`, applied from `y`"):
        jpc.bpc_energy_fn(td, wrong, acts, y, x=pb["x"])
    optim = optax.sgd(0.1)
    with pytest.raises(TypeError, match="`bottom_up_optim` must be an optax"):
        jpc.update_bpc_params(td, bu, acts, optim, None, None, None, y, input=pb["x"])


def test_update_batch_errors_name_input_and_output(key):
    pb = make_problem(key)
    td, bu, acts, y = pb["top_down"], pb["bottom_up"], pb["activities"], pb["y"]
    optim = optax.sgd(0.1)
    match = "`input` and `output` must have the same batch size"
    with pytest.raises(ValueError, match=match):
        jpc.update_bpc_activities(
            td, bu, acts, optim, optim.init(acts), y, input=pb["x"][:2]
        )
    states = tuple(optim.init(eqx.filter(m, eqx.is_array)) for m in (td, bu))
    with pytest.raises(ValueError, match=match):
        jpc.update_bpc_params(td, bu, acts, optim, optim, *states, y, input=pb["x"][:2])
