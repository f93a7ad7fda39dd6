"""Property-based checks of the core invariants over random widths, depths and batch
sizes (SPEC §10)."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    array_leaves,
    assert_trees_close,
    backprop_grads,
    random_problem,
    ref_activity_grads,
    ref_layer_energies,
    ref_param_grads,
)
from hypothesis import given, settings, strategies as st

import jpc


SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


@st.composite
def problems(draw, supervised=True, min_depth=1, losses=("mse",)):
    depth = draw(st.integers(min_depth, 4))
    d_in, width, d_out = (draw(st.integers(1, 5)) for _ in range(3))
    if losses != ("mse",):
        d_out = max(d_out, 2)
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    skip = draw(st.booleans())
    param_type = draw(st.sampled_from(["sp", "mupc", "ntp"]))
    loss = draw(st.sampled_from(losses))
    widths = [d_in] + [width] * (depth - 1) + [d_out]
    return random_problem(
        jr.PRNGKey(seed),
        widths,
        batch,
        supervised,
        skip,
        param_type=param_type,
        loss=loss,
        use_bias=draw(st.booleans()),
    )


def _energy(p, acts=None, **kw):
    return jpc.pc_energy_fn(
        p.params,
        p.activities if acts is None else acts,
        p.y,
        x=p.x,
        loss=p.loss,
        param_type=p.param_type,
        **kw,
    )


@SETTINGS
@given(problems())
@pytest.mark.slow
def test_energy_at_ffwd_is_output_loss(p):
    acts = jpc.init_activities_with_ffwd(
        p.model, p.x, skip_model=p.skip_model, param_type=p.param_type
    )
    pred = p.ffwd()[-1]
    want = 0.5 * jnp.mean(jnp.sum((p.y - pred) ** 2, axis=1))
    np.testing.assert_allclose(_energy(p, list(acts)), want, rtol=1e-10, atol=1e-15)


@SETTINGS
@given(st.one_of(problems(losses=("mse", "ce")), problems(supervised=False)))
@pytest.mark.slow
def test_energy_and_activity_grad_match_reference(p):
    np.testing.assert_allclose(_energy(p), p.ref(), rtol=1e-10)
    energy, grads = jpc.compute_pc_activity_grad(
        p.params, p.activities, p.y, x=p.x, loss_id=p.loss, param_type=p.param_type
    )
    np.testing.assert_allclose(energy, p.ref(), rtol=1e-10)
    assert_trees_close(
        list(grads),
        ref_activity_grads(p),
        rtol=1e-10,
        atol=1e-14,
        check_structure=False,
    )


@SETTINGS
@given(st.one_of(problems(losses=("mse", "ce")), problems(supervised=False)))
@pytest.mark.slow
def test_param_grads_match_reference(p):
    got = jpc.compute_pc_param_grads(
        p.params, p.activities, p.y, x=p.x, loss_id=p.loss, param_type=p.param_type
    )
    want = ref_param_grads(p)
    assert_trees_close(got[0], want[0], rtol=1e-10, atol=1e-14)


@SETTINGS
@given(st.one_of(problems(min_depth=2), problems(supervised=False, min_depth=2)))
def test_record_layers_order_and_sum(p):
    got = np.asarray(_energy(p, record_layers=True))
    E = [
        float(e)
        for e in ref_layer_energies(
            p.model,
            p.activities,
            p.y,
            x=p.x,
            skip_model=p.skip_model,
            scalings=p.scalings,
        )
    ]
    np.testing.assert_allclose(got, [E[-1]] + E[1:-1] + [E[0]], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(got.sum(), _energy(p), rtol=1e-10, atol=1e-15)


@SETTINGS
@given(problems(losses=("mse", "ce")))
@pytest.mark.slow
def test_ffwd_output_grad_is_backprop(p):
    acts = p.ffwd()
    got, _ = jpc.compute_pc_param_grads(
        p.params, acts, p.y, x=p.x, loss_id=p.loss, param_type=p.param_type
    )
    bp = backprop_grads(p, p.loss)
    assert_trees_close(got[-1], bp[-1], rtol=1e-10, atol=1e-14)
    for g in got[:-1]:
        for leaf in array_leaves(g):
            np.testing.assert_allclose(leaf, 0.0, atol=1e-14)


@SETTINGS
@given(st.one_of(problems(), problems(supervised=False)))
@pytest.mark.slow
def test_batch_energy_is_mean_of_examples(p):
    singles = [
        jpc.pc_energy_fn(
            p.params,
            [a[i : i + 1] for a in p.activities],
            p.y[i : i + 1],
            x=None if p.x is None else p.x[i : i + 1],
            param_type=p.param_type,
        )
        for i in range(p.B)
    ]
    np.testing.assert_allclose(_energy(p), np.mean(singles), rtol=1e-10, atol=1e-15)
