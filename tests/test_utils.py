"""Losses, metrics and evaluation helpers (SPEC §5)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import random_problem, ref_output_loss

import jpc


def test_mse_loss_explicit():
    preds = jnp.array([[1.0, 2.0], [0.0, -1.0], [3.0, 3.0]])
    labels = jnp.array([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    # per-example squared errors: 1, 5, 9 → ½ · mean = ½ · 5
    np.testing.assert_allclose(jpc.mse_loss(preds, labels), 2.5, rtol=1e-12)


def test_cross_entropy_loss_matches_reference(key):
    logits = jr.normal(key, (5, 4)) * 3
    labels = jax.nn.one_hot(jnp.array([0, 3, 2, 2, 1]), 4)
    want = -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=1))
    np.testing.assert_allclose(jpc.cross_entropy_loss(logits, labels), want, rtol=1e-12)
    np.testing.assert_allclose(
        jpc.cross_entropy_loss(logits, labels),
        ref_output_loss(logits, labels, "ce") / 5,
    )


def test_cross_entropy_loss_soft_labels_and_large_logits():
    logits = jnp.array([[1000.0, 0.0, -1000.0]])
    labels = jnp.array([[0.5, 0.5, 0.0]])
    # log_softmax = [0, -1000, -2000] → −(0.5·0 + 0.5·(−1000)) = 500
    np.testing.assert_allclose(
        jpc.cross_entropy_loss(logits, labels), 500.0, rtol=1e-12
    )


def test_compute_accuracy_percent():
    truths = jax.nn.one_hot(jnp.array([0, 1, 2, 1]), 3)
    preds = jnp.array([[0.9, 0.1, 0], [0, 0.2, 0.1], [1, 0, 0], [0, 5, 0]])
    np.testing.assert_allclose(jpc.compute_accuracy(truths, preds), 75.0)
    np.testing.assert_allclose(jpc.compute_accuracy(truths, truths), 100.0)


def test_compute_activity_norms():
    """Batch mean of each example's L2 norm (examples flattened), one per layer."""
    acts = [jnp.array([[3.0, 4.0], [0.0, 0.0]]), jnp.ones((2, 2, 2))]
    np.testing.assert_allclose(
        np.asarray(jpc.compute_activity_norms(acts)), [2.5, 2.0], rtol=1e-12
    )


def test_compute_param_norms(key):
    """One entry per leaf of tree_leaves(model): array norms, 0 for the others."""
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh", use_bias=True)
    skip = jpc.make_skip_model(3)
    got, got_skip = jpc.compute_param_norms((model, None))
    leaves = jax.tree_util.tree_leaves(model)
    want = [float(jnp.sqrt(jnp.sum(w**2))) if eqx.is_array(w) else 0.0 for w in leaves]
    # the first block's identity holds no leaf: W, b, then 2 x (act fn, W, b)
    assert len(want) == 8 and want.count(0.0) == 2
    np.testing.assert_allclose(np.asarray(got, dtype=float), want, rtol=1e-12)
    assert got_skip is None
    _, skip_norms = jpc.compute_param_norms((model, skip))
    assert np.asarray(skip_norms).shape == (len(jax.tree_util.tree_leaves(skip)),)
    with pytest.raises(TypeError, match="`params` must be the pair"):
        jpc.compute_param_norms(model)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("param_type,skip", [("sp", False), ("mupc", True)])
@pytest.mark.slow
def test_test_discriminative_pc(key, loss, param_type, skip):
    p = random_problem(
        key, [4, 6, 6, 3], 8, skip=skip, param_type=param_type, loss=loss
    )
    got_loss, got_acc = jpc.test_discriminative_pc(
        p.model, p.y, p.x, skip_model=p.skip_model, loss=loss, param_type=param_type
    )
    pred = p.ffwd()[-1]
    np.testing.assert_allclose(
        got_loss, ref_output_loss(pred, p.y, loss) / p.B, rtol=1e-10
    )
    acc = 100.0 * float(jnp.mean(jnp.argmax(pred, 1) == jnp.argmax(p.y, 1)))
    np.testing.assert_allclose(got_acc, acc)


@pytest.mark.slow
def test_test_generative_pc(key):
    """Output predictions are the ffwd pass from `input`; input accuracy scores the
    argmax of z_0 inferred (from random activities) against `input`."""
    k1, k2 = jr.split(key)
    model = jpc.make_mlp(k1, 3, 6, 2, 5, "tanh")
    labels = jax.nn.one_hot(jnp.array([0, 1, 2, 1]), 3)
    images = jr.normal(k2, (4, 5))
    k = jr.PRNGKey(4)
    sizes = [3, 6, 5]
    acc, preds = jpc.test_generative_pc(model, images, labels, k, sizes, 4, max_t1=50)
    want_preds = labels
    for i, blk in enumerate(model):
        W = blk.layers[1].weight
        want_preds = (want_preds if i == 0 else jnp.tanh(want_preds)) @ W.T
    np.testing.assert_allclose(preds, want_preds, rtol=1e-10)
    init = jpc.init_activities_from_normal(k, sizes, "unsupervised", 4, sigma=0.05)
    z0 = jpc.solve_inference((model, None), init, images, max_t1=50)[0][-1]
    want_acc = 100.0 * float(jnp.mean(jnp.argmax(z0, 1) == jnp.argmax(labels, 1)))
    np.testing.assert_allclose(acc, want_acc)
