"""Activity steps stated per example (`jpc.per_example`): equal to SGD with the step
multiplied by the batch size, and independent of the batch an example sits in."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, random_problem

import jpc


WIDTHS = [3, 5, 5, 2]


def test_per_example_sgd_is_sgd_times_batch_size(key):
    p = random_problem(key, WIDTHS, 6)
    scaled = jpc.per_example(optax.sgd(0.3))
    plain = optax.sgd(0.3 * 6)
    a = jpc.update_pc_activities(
        p.params, p.activities, scaled, scaled.init(p.activities), p.y, input=p.x
    )
    b = jpc.update_pc_activities(
        p.params, p.activities, plain, plain.init(p.activities), p.y, input=p.x
    )
    assert_trees_close(a["activities"], b["activities"], rtol=1e-12)
    # by hand: each example moves by 0.3 times its own per-example gradient
    for z, z_new, g in zip(p.activities, a["activities"], a["grads"]):
        np.testing.assert_allclose(z_new, z - 0.3 * 6 * g, rtol=1e-12)


def test_inference_of_an_example_does_not_depend_on_its_batch(key):
    """With a per-example step, the first 3 examples infer the same activities in a
    batch of 3 and in a batch of 12; with a fixed batch-mean step they do not."""
    p = random_problem(key, WIDTHS, 12)
    optim = optax.sgd(1e-3)
    state = optim.init((eqx.filter(p.model, eqx.is_array), None))

    def inferred(activity_optim, n):
        out = jpc.make_pc_step(
            p.model,
            optim,
            state,
            p.y[:n],
            input=p.x[:n],
            activity_optim=activity_optim,
            n_inference_steps=10,
            record_activities=True,
        )
        return [z[-1, :3] for z in out["activities"]]

    step = jpc.per_example(optax.sgd(0.2))
    assert_trees_close(inferred(step, 3), inferred(step, 12), rtol=1e-10)
    fixed = optax.sgd(0.2)
    diff = jnp.max(jnp.abs(inferred(fixed, 3)[0] - inferred(fixed, 12)[0]))
    assert float(diff) > 1e-3


def test_scale_by_batch_size_leaves_scalars():
    t = jpc.scale_by_batch_size()
    updates = {"z": jnp.ones((4, 2)), "s": jnp.asarray(2.0)}
    out, _ = t.update(updates, t.init(updates))
    np.testing.assert_array_equal(out["z"], 4.0)
    np.testing.assert_array_equal(out["s"], 2.0)


def test_per_example_refuses_a_non_optimiser():
    with pytest.raises(TypeError, match="`optim` must be an optax optimiser"):
        jpc.per_example(0.5)
