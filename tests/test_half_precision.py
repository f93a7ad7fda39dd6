"""The fused discrete path trains in bfloat16: the model stays bfloat16, the loss
falls, and the run follows a float32 run of the same steps within bfloat16's
resolution."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc


def teacher_problem(key, n=64, d_in=16, d_out=4):
    """Labels of a random linear teacher: a learnable task with a known answer."""
    kx, kt = jr.split(key)
    x = jr.normal(kx, (n, d_in), jnp.float32)
    teacher = jr.normal(kt, (d_out, d_in), jnp.float32)
    y = jax.nn.one_hot(jnp.argmax(x @ teacher.T, axis=1), d_out, dtype=jnp.float32)
    return x, y


def cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree
    )


def train(dtype, steps=40):
    x, y = teacher_problem(jr.PRNGKey(0))
    x, y = x.astype(dtype), y.astype(dtype)
    model = cast(jpc.make_mlp(jr.PRNGKey(1), 16, 32, 3, 4, "tanh"), dtype)
    optim = optax.sgd(0.05)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    activity_optim = jpc.per_example(optax.sgd(0.2))
    losses = []
    for _ in range(steps):
        out = jpc.make_pc_step(
            model,
            optim,
            opt_state,
            y,
            input=x,
            activity_optim=activity_optim,
            n_inference_steps=10,
        )
        model, opt_state = out["model"], out["opt_state"]
        losses.append(float(out["loss"]))
    return model, np.array(losses)


@pytest.mark.slow
def test_discrete_path_trains_in_bfloat16_like_float32():
    model16, losses16 = train(jnp.bfloat16)
    model32, losses32 = train(jnp.float32)
    leaves16 = jax.tree_util.tree_leaves(eqx.filter(model16, eqx.is_array))
    assert {a.dtype for a in leaves16} == {jnp.dtype(jnp.bfloat16)}
    assert losses16[-1] < 0.8 * losses16[0]
    assert losses32[-1] < 0.8 * losses32[0]
    # bfloat16 keeps 8 bits of mantissa (relative resolution 2^-8 = 0.4 %); over 40
    # steps the loss curves may drift apart by a few times that, not more
    np.testing.assert_allclose(losses16, losses32, rtol=0.05)
    # the trained networks classify the batch alike (to 2 of its 64 examples)
    x, y = teacher_problem(jr.PRNGKey(0))
    acc16 = jpc.test_discriminative_pc(
        model16, y.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
    )[1]
    acc32 = jpc.test_discriminative_pc(model32, y, x)[1]
    assert abs(float(acc16) - float(acc32)) <= 2 * 100 / 64
