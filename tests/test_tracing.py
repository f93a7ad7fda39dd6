"""Tracing a step never formats a layer's `repr`.

`jax.vmap(module)` takes the `repr` of the module for the trace's debug
information, and an `equinox.Module`'s is a pretty-printed tree of its fields, so
every layer applied that way cost a formatting of the whole layer per call. The
layers are applied through `jpc._layers.batched`, which maps a plain function.

References: a counter in the layers' `__repr__` (zero calls while tracing), and
`jax.vmap` of the layer itself for the values.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import jpc
from jpc._layers import batched


class CountingSequential(eqx.nn.Sequential):
    """`eqx.nn.Sequential` that counts how often its `repr` is taken."""

    def __repr__(self):
        CountingSequential.calls += 1
        return super().__repr__()


CountingSequential.calls = 0


def _counting_mlp(key, sizes):
    """`jpc.make_mlp`'s layers, each as a `CountingSequential`."""
    model = jpc.make_mlp(key, sizes[0], sizes[1], len(sizes) - 1, sizes[-1], "tanh")
    return [CountingSequential(list(layer.layers)) for layer in model]


def test_batched_equals_vmap_of_the_layer(key):
    layer = eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(5, 3, key=key)])
    z = jr.normal(jr.fold_in(key, 1), (4, 5))
    np.testing.assert_array_equal(batched(layer)(z), jax.vmap(layer)(z))
    pair = batched(lambda a, b: a * b)(z, z)
    np.testing.assert_array_equal(pair, z * z)
    keyword = batched(lambda a, *, b: a - b)(z, b=2 * z)
    np.testing.assert_array_equal(keyword, -z)


def _steps(model, x, y):
    """Discrete-inference, default ODE and backprop steps, each traced anew (new
    optimiser objects are new programs)."""
    optim = optax.adam(1e-3)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    discrete = dict(activity_optim=optax.sgd(0.1), n_inference_steps=5)
    return [
        jpc.make_pc_step(model, optim, state, y, input=x, **discrete)["model"],
        jpc.make_pc_step(model, optim, state, y, input=x)["model"],
        jpc.make_bp_step(model, optim, state, y, input=x)["model"],
    ]


@pytest.mark.slow
def test_tracing_a_training_step_takes_no_layer_repr(key, monkeypatch):
    model = _counting_mlp(key, [6, 8, 8, 8, 3])
    x = jr.normal(jr.fold_in(key, 1), (4, 6))
    y = jax.nn.one_hot(jnp.arange(4) % 3, 3)
    CountingSequential.calls = 0
    ours = _steps(model, x, y)
    assert CountingSequential.calls == 0
    # The control: with `jax.vmap` of the layers themselves, as before, the same
    # steps take their `repr` while tracing and compute the same models.
    monkeypatch.setattr(jpc._layers, "batched", jax.vmap)
    reference = _steps(model, x, y)
    assert CountingSequential.calls > 0
    for a, b in zip(ours, reference, strict=True):
        assert_trees_close(eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array))
