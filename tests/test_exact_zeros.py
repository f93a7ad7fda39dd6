"""At the feedforward state every hidden prediction error is exactly zero, so inside
every compiled step the hidden errors and hidden weight gradients must be exactly 0
in float32 (not round-off that Adam would turn into full-size weight changes), for
deep standard and μPC networks, with and without skips."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc


DEPTH, WIDTH, D_IN, D_OUT, BATCH = 6, 32, 50, 10, 8


def float32(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, tree
    )


def problem(param_type, skip, key=jr.PRNGKey(3), depth=DEPTH):
    k_model, k_x, k_y = jr.split(key, 3)
    model = float32(
        jpc.make_mlp(k_model, D_IN, WIDTH, depth, D_OUT, "relu", param_type=param_type)
    )
    skip_model = jpc.make_skip_model(depth) if skip else None
    x = jr.normal(k_x, (BATCH, D_IN), jnp.float32)
    y = jax.nn.one_hot(jr.randint(k_y, (BATCH,), 0, D_OUT), D_OUT, dtype=jnp.float32)
    return model, skip_model, x, y


def weights(model):
    return [layer.layers[1].weight for layer in model]


CASES = [(pt, skip) for pt in ("sp", "mupc", "ntp") for skip in (False, True)]


DEEP = [
    pytest.param(pt, skip, 32, marks=pytest.mark.slow)
    for pt, skip in (("mupc", True), ("sp", False))
]


@pytest.mark.parametrize(
    "param_type,skip,depth", [(pt, skip, DEPTH) for pt, skip in CASES] + DEEP
)
def test_pc_step_at_the_feedforward_state(param_type, skip, depth):
    """With a zero activity step the state stays feedforward: the hidden energies
    along inference and every hidden weight gradient are exactly 0, and Adam leaves
    the hidden weights bitwise unchanged (32 layers: the μPC notebook's depth)."""
    model, skip_model, x, y = problem(param_type, skip, depth=depth)
    optim = optax.adam(1e-3)
    state = optim.init((eqx.filter(model, eqx.is_array), skip_model))
    out = jpc.make_pc_step(
        model,
        optim,
        state,
        y,
        input=x,
        skip_model=skip_model,
        param_type=param_type,
        activity_optim=optax.sgd(0.0),
        n_inference_steps=3,
        record_energies=True,
    )
    energies = np.asarray(out["energies"])  # (L, T), layer order
    assert energies.dtype == np.float32
    np.testing.assert_array_equal(energies[:-1], 0.0)
    assert np.all(energies[-1] > 0)
    for new, old in zip(weights(out["model"])[:-1], weights(model)[:-1]):
        np.testing.assert_array_equal(new, old)
    assert not np.array_equal(weights(out["model"])[-1], weights(model)[-1])


@pytest.mark.parametrize("param_type,skip", CASES)
def test_gradients_at_the_feedforward_state_inside_jit(param_type, skip):
    """The feedforward pass and the gradients computed in one compiled program."""
    model, skip_model, x, y = problem(param_type, skip)

    @eqx.filter_jit
    def at_feedforward(params, x, y):
        acts = jpc.init_activities_with_ffwd(
            params[0], x, skip_model=params[1], param_type=param_type
        )
        # an opaque identity, as a loop carry is for the compiler
        acts = jax.lax.fori_loop(0, 2, lambda i, a: a, acts)
        _, activity_grads = jpc.compute_pc_activity_grad(
            params, acts, y, x=x, param_type=param_type
        )
        param_grads = jpc.compute_pc_param_grads(
            params, acts, y, x=x, param_type=param_type
        )
        return activity_grads, param_grads

    activity_grads, (model_grads, _) = at_feedforward((model, skip_model), x, y)
    # z_1 .. z_{L-2} have only hidden errors around them: exactly 0
    for g in activity_grads[:-2]:
        np.testing.assert_array_equal(g, 0.0)
    assert np.any(np.asarray(activity_grads[-2]) != 0)  # below the output error
    for g in weights(model_grads)[:-1]:
        np.testing.assert_array_equal(g, 0.0)
    assert np.any(np.asarray(weights(model_grads)[-1]) != 0)


def test_ipc_and_updates_at_the_feedforward_state():
    model, skip_model, x, y = problem("mupc", True)
    optim = optax.adam(1e-3)
    state = optim.init((eqx.filter(model, eqx.is_array), skip_model))
    out = jpc.make_ipc_step(
        model,
        optim,
        state,
        y,
        input=x,
        skip_model=skip_model,
        param_type="mupc",
        activity_optim=optax.sgd(0.0),
        n_inference_steps=1,
    )
    for new, old in zip(weights(out["model"])[:-1], weights(model)[:-1]):
        np.testing.assert_array_equal(new, old)
    acts = jpc.init_activities_with_ffwd(
        model, x, skip_model=skip_model, param_type="mupc"
    )
    upd = jpc.update_pc_params(
        (model, skip_model), acts, optim, state, y, input=x, param_type="mupc"
    )
    for g in weights(upd["grads"][0])[:-1]:
        np.testing.assert_array_equal(g, 0.0)


def test_folded_scaling_is_the_scaled_prediction():
    """Folding a_l into the last affine map gives a_l f_l(z) (to round-off), for
    `make_mlp` blocks, a bare `eqx.nn.Linear` with a bias and a convolution."""
    key = jr.PRNGKey(0)
    z = jr.normal(key, (4, 6))
    layers = [
        jpc.make_mlp(key, 6, 6, 3, 6, "tanh", use_bias=True)[1],
        eqx.nn.Linear(6, 5, key=key),
    ]
    for layer in layers:
        pred = jpc.init_activities_with_ffwd([layer], z, param_type="sp")[0]
        scaled = jpc.init_activities_with_ffwd(
            [layer, eqx.nn.Linear(pred.shape[1], 2, key=key)],
            z,
            param_type="ntp",
        )[0]
        np.testing.assert_allclose(scaled, pred / np.sqrt(6), rtol=1e-6)
    conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=key)
    images = jr.normal(key, (2, 2, 5, 5))
    head = eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(75, 2, key=key)])
    plain = jpc.init_activities_with_ffwd([conv, head], images)[0]
    scaled = jpc.init_activities_with_ffwd([conv, head], images, param_type="ntp")[0]
    np.testing.assert_allclose(scaled, plain / np.sqrt(2 * 5 * 5), rtol=1e-6)
