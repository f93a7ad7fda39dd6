"""Models that behave as a sequence of layers without being a list.

A user's `eqx.Module` holding its layers in a list attribute and defining
`__len__`/`__getitem__` is taken wherever a model is, gives the same numbers as the
equivalent plain list, and comes back from the updates with its own type.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from helpers import assert_trees_close

import jpc
from jpc._layers import with_layers


class FCResNet(eqx.Module):
    """A user's network: layers in a list attribute, indexable and callable."""

    layers: list

    def __init__(self, layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]


B = 5


def problem(key):
    kx, ky = jr.split(jr.fold_in(key, 1))
    layers = jpc.make_mlp(key, 3, 4, 3, 2, "tanh", use_bias=True)
    x = jr.normal(kx, (B, 3))
    y = jax.nn.one_hot(jr.randint(ky, (B,), 0, 2), 2)
    return layers, x, y


def arrays(tree):
    return eqx.filter(tree, eqx.is_array)


def init_state(optim, model):
    return optim.init((arrays(model), None))


def assert_same_model(got, want_list):
    """`got` is the user's module and holds the weights of the list `want_list`."""
    assert type(got) is FCResNet
    assert_trees_close(arrays(got.layers), arrays(want_list), rtol=1e-10, atol=1e-14)


def test_energy_and_grads_equal_the_list_and_the_formula(key):
    layers, x, y = problem(key)
    model = FCResNet(layers)
    acts = jpc.init_activities_with_ffwd(model, x)
    assert_trees_close(acts, jpc.init_activities_with_ffwd(layers, x), rtol=1e-12)
    acts = [a + 0.3 for a in acts]  # away from the feedforward state
    energy = jpc.pc_energy_fn((model, None), acts, y, x=x)
    w = [m.layers[1].weight for m in layers]
    b = [m.layers[1].bias for m in layers]
    z1, z2, _ = acts
    want = (
        jnp.sum((z1 - x @ w[0].T - b[0]) ** 2)
        + jnp.sum((z2 - jnp.tanh(z1) @ w[1].T - b[1]) ** 2)
        + jnp.sum((y - jnp.tanh(z2) @ w[2].T - b[2]) ** 2)
    ) / (2 * B)
    assert float(want) > 1e-2
    assert_trees_close(energy, want, rtol=1e-12)
    grads, skip_grads = jpc.compute_pc_param_grads((model, None), acts, y, x=x)
    list_grads, _ = jpc.compute_pc_param_grads((layers, None), acts, y, x=x)
    assert type(grads) is FCResNet and skip_grads is None
    assert_trees_close(arrays(grads.layers), arrays(list_grads), rtol=1e-12)


def test_update_pc_params_keeps_the_module_type(key):
    layers, x, y = problem(key)
    model = FCResNet(layers)
    acts = [a + 0.3 for a in jpc.init_activities_with_ffwd(layers, x)]
    optim = optax.adam(1e-2)
    got = jpc.update_pc_params(
        (model, None), acts, optim, init_state(optim, model), y, input=x
    )
    want = jpc.update_pc_params(
        (layers, None), acts, optim, init_state(optim, layers), y, input=x
    )
    assert_same_model(got["model"], want["model"])
    # the weights changed: the update is not a no-op
    moved = jnp.abs(got["model"][0].layers[1].weight - layers[0].layers[1].weight)
    assert float(jnp.max(moved)) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("inference", ["discrete", "ode"])
def test_make_pc_step_equals_the_list(key, inference):
    layers, x, y = problem(key)
    model = FCResNet(layers)
    optim = optax.sgd(0.5)
    kwargs = dict(input=x, param_norms=True, grad_norms=True)
    if inference == "discrete":
        kwargs.update(activity_optim=optax.sgd(0.5), n_inference_steps=4)
    else:
        kwargs.update(max_t1=5)
    got = jpc.make_pc_step(model, optim, init_state(optim, model), y, **kwargs)
    want = jpc.make_pc_step(layers, optim, init_state(optim, layers), y, **kwargs)
    assert_same_model(got["model"], want["model"])
    for name in ("loss", "activities", "energies", "model_param_norms"):
        assert_trees_close(got[name], want[name], rtol=1e-10, atol=1e-14)
    assert_trees_close(
        got["model_grad_norms"], want["model_grad_norms"], rtol=1e-10, atol=1e-14
    )
    # a second step takes the returned module and its optimiser state
    again = jpc.make_pc_step(got["model"], optim, got["opt_state"], y, **kwargs)
    assert type(again["model"]) is FCResNet


@pytest.mark.slow
def test_make_bp_step_equals_the_list_and_jax_grad(key):
    layers, x, y = problem(key)
    model = FCResNet(layers)
    optim = optax.sgd(0.1)
    got = jpc.make_bp_step(model, optim, init_state(optim, model), y, input=x)
    want = jpc.make_bp_step(layers, optim, init_state(optim, layers), y, input=x)
    assert_same_model(got["model"], want["model"])

    def loss(m):  # backprop reference on the module itself
        return 0.5 * jnp.sum((y - jax.vmap(m)(x)) ** 2) / B

    grads = eqx.filter_grad(loss)(model)
    manual = eqx.apply_updates(model, jax.tree_util.tree_map(lambda g: -0.1 * g, grads))
    assert_same_model(got["model"], list(manual.layers))
    assert_trees_close(got["loss"], loss(model), rtol=1e-12)


def test_equinox_sequential_is_a_model(key):
    """`eqx.nn.Sequential` is a sequence of layers too: one PC layer per entry."""
    layers, x, y = problem(key)
    model = eqx.nn.Sequential(layers)
    acts = [a + 0.2 for a in jpc.init_activities_with_ffwd(layers, x)]
    got = jpc.compute_pc_param_grads((model, None), acts, y, x=x)[0]
    want = jpc.compute_pc_param_grads((layers, None), acts, y, x=x)[0]
    assert type(got) is eqx.nn.Sequential
    assert_trees_close(arrays(list(got.layers)), arrays(want), rtol=1e-12)


def test_skip_model_may_be_a_module_too(key):
    layers, x, y = problem(key)
    skips = jpc.make_skip_model(3)
    acts = [a + 0.1 for a in jpc.init_activities_with_ffwd(layers, x, skip_model=skips)]
    got = jpc.pc_energy_fn((FCResNet(layers), FCResNet(skips)), acts, y, x=x)
    want = jpc.pc_energy_fn((layers, skips), acts, y, x=x)
    assert_trees_close(got, want, rtol=1e-12)


def test_with_layers_keeps_the_container_type(key):
    layers, _, _ = problem(key)
    new = [None, layers[0], jnp.arange(3.0)]
    got = with_layers(FCResNet(layers), new)
    assert type(got) is FCResNet and got.layers[0] is None
    assert_trees_close(arrays(got.layers[1]), arrays(layers[0]), rtol=0)
    assert_trees_close(got.layers[2], jnp.arange(3.0), rtol=0)
    assert with_layers((1, 2), [3, 4]) == (3, 4)
    assert with_layers([1, 2], (3, 4)) == [3, 4]


def test_non_sequence_models_are_refused(key):
    layers, x, y = problem(key)
    acts = jpc.init_activities_with_ffwd(layers, x)
    for bad in ({"a": layers[0]}, layers[0].layers[1], "model"):
        with pytest.raises(TypeError, match="`model` must be a list of per-layer"):
            jpc.pc_energy_fn((bad, None), acts, y, x=x)
    with pytest.raises(TypeError, match="`skip_model` must be a list of per-layer"):
        jpc.pc_energy_fn((layers, jnp.ones(3)), acts, y, x=x)
