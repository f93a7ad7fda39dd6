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

import jpc
from jpc._layers import batched


class CountingSequential(eqx.nn.Sequential):
    """`eqx.nn.Sequential` that counts how often its `repr` is taken."""

    def __repr__(self):
        CountingSequential.calls += 1
        return super().__repr__()


CountingSequential.calls = 0


def _counting_mlp(key, sizes):
    """`jpc.make_mlp`'s layout (activation, then linear map; identity first)."""
    keys = jr.split(key, len(sizes) - 1)
    acts = [lambda z: z] + [jnp.tanh] * (len(sizes) - 2)
    return [
        CountingSequential([eqx.nn.Lambda(act), eqx.nn.Linear(a, b, key=k)])
        for act, a, b, k in zip(acts, sizes[:-1], sizes[1:], keys)
    ]


def test_batched_equals_vmap_of_the_layer(key):
    layer = eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(5, 3, key=key)])
    z = jr.normal(jr.fold_in(key, 1), (4, 5))
    np.testing.assert_array_equal(batched(layer)(z), jax.vmap(layer)(z))
    pair = batched(lambda a, b: a * b)(z, z)
    np.testing.assert_array_equal(pair, z * z)


def test_tracing_a_training_step_takes_no_layer_repr(key):
    model = _counting_mlp(key, [6, 8, 8, 8, 3])
    x = jr.normal(jr.fold_in(key, 1), (4, 6))
    y = jax.nn.one_hot(jnp.arange(4) % 3, 3)
    optim = optax.adam(1e-3)
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    CountingSequential.calls = 0
    # Discrete inference, then the default ODE one: feedforward, energies,
    # activity and parameter gradients, all traced.
    for options in (dict(activity_optim=optax.sgd(0.1), n_inference_steps=5), {}):
        out = jpc.make_pc_step(model, optim, state, y, input=x, **options)
    jpc.make_bp_step(model, optim, state, y, input=x)
    assert CountingSequential.calls == 0
    # The layers were used: the step changed them, as its own gradients say.
    assert not np.allclose(out["model"][1].layers[1].weight, model[1].layers[1].weight)
