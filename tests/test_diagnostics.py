"""Gradient diagnostics (SPEC §7) on inputs with known answers, per-example gradients
against a loop of `jax.grad`, and `compare_to_backprop` in its limiting cases."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    backprop_grads,
    mlp_weights,
    random_problem,
    ref_forward,
    ref_output_loss,
)

import jpc


class _Layer(eqx.Module):
    """A stand-in gradient layer with a weight and a bias."""

    weight: jax.Array
    bias: jax.Array | None = None


def layers(*weights, biases=None):
    biases = biases or [None] * len(weights)
    return [_Layer(jnp.asarray(w, float), b) for w, b in zip(weights, biases)]


# ------------------------------------------------------------------ cosine similarity


def test_cosine_similarity_known_values():
    a = layers([[1.0, 0.0]], [[1.0, 2.0]])
    b = layers([[0.0, 1.0]], [[2.0, 4.0]])
    out = jpc.compute_grad_cosine_similarity(a, b)
    np.testing.assert_allclose(out["per_layer"], [0.0, 1.0], atol=1e-15)
    # over [1, 0, 1, 2] and [0, 1, 2, 4]: 10 / (√6 √21)
    np.testing.assert_allclose(out["overall"], 10 / np.sqrt(6 * 21), rtol=1e-12)
    anti = jpc.compute_grad_cosine_similarity(
        a, [jax.tree.map(lambda v: -v, x) for x in a]
    )
    np.testing.assert_allclose(anti["per_layer"], [-1.0, -1.0], rtol=1e-12)


def test_cosine_similarity_counts_biases_and_rejects_mismatch():
    a = layers([[1.0]], biases=[jnp.array([1.0])])
    b = layers([[1.0]], biases=[jnp.array([-1.0])])
    np.testing.assert_allclose(
        jpc.compute_grad_cosine_similarity(a, b)["overall"], 0.0, atol=1e-15
    )
    with pytest.raises(ValueError, match="same layers"):
        jpc.compute_grad_cosine_similarity(a, layers([[1.0, 2.0, 3.0]]))


# ------------------------------------------------------------------ SNR


def test_grad_snr_known_values():
    # layer 0, one entry over 2 samples: [1, 3] → |mean| 2, std 1 → SNR 2/(1+ε)
    # layer 1, entries [-1, 1] (mean 0 → 0) and [2, 2] (std 0 → 2/ε)
    grads = layers([[[1.0]], [[3.0]]], [[[-1.0, 2.0]], [[1.0, 2.0]]])
    eps = 0.5
    out = jpc.compute_grad_snr(grads, eps=eps)
    expected = [2 / (1 + eps), (0 + 2 / eps) / 2]
    np.testing.assert_allclose(out["per_layer"], expected, rtol=1e-12)
    np.testing.assert_allclose(out["overall"], (2 / (1 + eps) + 0 + 2 / eps) / 3)


@pytest.mark.slow
def test_grad_snr_of_per_example_backprop_grads(key):
    p = random_problem(key, [3, 4, 2], 16, act_fn="tanh", use_bias=True)
    per_example = jpc.compute_per_example_grads(p.model, p.x, p.y)
    out = jpc.compute_grad_snr(per_example)
    flat = [
        jnp.concatenate(
            [jnp.reshape(a, (16, -1)) for a in jax.tree_util.tree_leaves(layer)], 1
        )
        for layer in per_example
    ]
    for value, g in zip(out["per_layer"], flat):
        ratio = np.abs(np.mean(g, 0)) / (np.std(g, 0) + 1e-8)
        np.testing.assert_allclose(value, np.mean(ratio), rtol=1e-10)


# ------------------------------------------------------------------ variance ratios


def test_layer_grad_variance_ratios_known_values():
    grads = layers([[1.0, 3.0]], [[0.0, 2.0, 4.0, 6.0]], biases=[jnp.ones(1), None])
    out = jpc.compute_layer_grad_variance_ratios(grads)  # biases are ignored
    np.testing.assert_allclose(out["variances"], [1.0, 5.0], rtol=1e-12)
    np.testing.assert_allclose(out["ratios"], [0.2, 1.0], rtol=1e-12)
    first = jpc.compute_layer_grad_variance_ratios(grads, reference=0)
    np.testing.assert_allclose(first["ratios"], [1.0, 5.0], rtol=1e-12)
    with pytest.raises(ValueError, match="`reference` must index"):
        jpc.compute_layer_grad_variance_ratios(grads, reference=2)


# ------------------------------------------------------------------ per-example grads


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.slow
def test_per_example_grads_match_loop_and_mean_is_backprop(key, loss):
    p = random_problem(
        key, [3, 4, 4, 4, 2], 3, skip=True, param_type="mupc", loss=loss, use_bias=True
    )
    per_example = jpc.compute_per_example_grads(
        p.model, p.x, p.y, loss_id=loss, skip_model=p.skip_model, param_type="mupc"
    )

    def loss_one(model, i):
        pred = ref_forward(
            model, p.x[i : i + 1], skip_model=p.skip_model, scalings=p.scalings
        )[-1]
        return ref_output_loss(pred, p.y[i : i + 1], loss)

    for i in range(p.B):
        g = eqx.filter_grad(loss_one)(p.model, i)
        assert_trees_close(
            jax.tree.map(lambda a, i=i: a[i], per_example), g, rtol=1e-10, atol=1e-15
        )
    mean = jax.tree.map(lambda a: a.mean(0), per_example)
    assert_trees_close(mean, backprop_grads(p, loss=loss), rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------ compare_to_backprop


@pytest.mark.slow
def test_compare_to_backprop_limits(key, keys):
    """Transposed feedback: FA = KP = backprop. At the feedforward state only the
    output layer's PC gradient is non-zero (and equals backprop's). The PC entry is
    the cosine of `compute_pc_param_grads` after the same inference, and with a weak
    output precision λ it approaches backprop (SPEC §3.2)."""
    p = random_problem(key, [3, 4, 4, 2], 4, act_fn="tanh")
    feedback = [None] + [w.T for w in mlp_weights(p.model)[1:]]
    optim, steps, lam = optax.sgd(0.3 * p.B), 300, 1e-3
    out = jpc.compare_to_backprop(
        p.model,
        p.x,
        p.y,
        key=keys[0],
        feedback=feedback,
        sigma=1e-4,
        n_samples=2048,
        output_energy_scaling=lam,
        activity_optim=optim,
        n_inference_steps=steps,
    )
    assert set(out) == {"pc_equilibrium", "pc_feedforward", "fa", "kp", "wp", "np"}
    for name in ("fa", "kp"):
        np.testing.assert_allclose(out[name]["per_layer"], 1.0, rtol=1e-10)
        np.testing.assert_allclose(out[name]["overall"], 1.0, rtol=1e-10)
    ffwd = out["pc_feedforward"]
    assert np.all(np.isnan(ffwd["per_layer"][:-1]))  # zero gradients
    np.testing.assert_allclose(ffwd["per_layer"][-1], 1.0, rtol=1e-10)
    bp = backprop_grads(p)
    norms = [float(jnp.linalg.norm(blk.layers[1].weight)) for blk in bp]
    np.testing.assert_allclose(ffwd["overall"], norms[-1] / np.linalg.norm(norms))
    # PC after the same discrete inference, by the public update function
    acts, state = p.ffwd(), optim.init(p.ffwd())
    for _ in range(steps):
        res = jpc.update_pc_activities(
            p.params, acts, optim, state, p.y, input=p.x, output_energy_scaling=lam
        )
        acts, state = res["activities"], res["opt_state"]
    pc = jpc.compute_pc_param_grads(
        p.params, acts, p.y, x=p.x, output_energy_scaling=lam
    )[0]
    expected = jpc.compute_grad_cosine_similarity(pc, bp)
    assert_trees_close(out["pc_equilibrium"], expected, rtol=1e-8)
    assert float(out["pc_equilibrium"]["overall"]) > 0.999
    for name in ("wp", "np"):
        assert float(out[name]["overall"]) > 0.9
    # random feedback: FA and KP (no weight decay) are the cosine of the FA update
    feedback = jpc.init_feedback_weights(keys[1], p.model)
    random = jpc.compare_to_backprop(
        p.model,
        p.x,
        p.y,
        key=keys[0],
        feedback=feedback,
        sigma=1e-4,
        n_samples=2048,
        output_energy_scaling=lam,
        activity_optim=optim,
        n_inference_steps=steps,
    )
    fa = jpc.compute_fa_param_grads(p.model, feedback, p.x, p.y)
    expected = jpc.compute_grad_cosine_similarity(fa, bp)
    for name in ("fa", "kp"):
        assert_trees_close(random[name], expected, rtol=1e-10)
    assert float(random["fa"]["per_layer"][0]) < 0.999
    # the feedback plays no part in the PC and perturbation entries
    for name in ("pc_equilibrium", "pc_feedforward", "wp", "np"):
        assert_trees_close(random[name], out[name], rtol=1e-12)


def test_compare_to_backprop_errors(key):
    p = random_problem(key, [3, 4, 2], 4)
    with pytest.raises(ValueError, match="`loss_id` must be one of"):
        jpc.compare_to_backprop(p.model, p.x, p.y, key=key, loss_id="l2")
    with pytest.raises(ValueError, match="must be given together"):
        jpc.compare_to_backprop(
            p.model, p.x, p.y, key=key, activity_optim=optax.sgd(0.1)
        )


def test_grad_snr_needs_a_shared_leading_axis():
    """Leaves without (or with different) leading sample axes raise a ValueError."""
    with pytest.raises(ValueError, match="`per_example_grads` must have the same"):
        jpc.compute_grad_snr([jnp.ones(())])
    with pytest.raises(ValueError, match=r"shapes \[\(3, 2\), \(4,\)\]"):
        jpc.compute_grad_snr([(jnp.ones((3, 2)), jnp.ones(4))])


# ------------------------------------------------------------------ scale invariance


def _scaled(tree, s):
    return jax.tree.map(lambda v: v * jnp.asarray(s, v.dtype), tree)


def _random_layers(dtype, *, samples=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = () if samples is None else (samples,)
    shapes = [(3, 4), (5, 3), (2, 5)]
    ws = [jnp.asarray(rng.normal(size=lead + s), dtype) for s in shapes]
    bs = [jnp.asarray(rng.normal(size=lead + s[:1]), dtype) for s in shapes]
    return [_Layer(w, b) for w, b in zip(ws, bs)]


_SCALES = [1e-20, 1e20]
_RTOL = {jnp.float32: 1e-5, jnp.float64: 1e-12}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scale", _SCALES)
def test_cosine_similarity_is_scale_invariant(dtype, scale):
    """Squared norms of 1e±20-sized float32 gradients over/underflow; the cosine
    must not notice."""
    a, b = _random_layers(dtype, seed=0), _random_layers(dtype, seed=1)
    ref = jpc.compute_grad_cosine_similarity(a, b)
    for pair in [(_scaled(a, scale), b), (_scaled(a, scale), _scaled(b, scale))]:
        out = jpc.compute_grad_cosine_similarity(*pair)
        for k in ("per_layer", "overall"):
            np.testing.assert_allclose(out[k], ref[k], rtol=_RTOL[dtype])
            assert np.all(np.isfinite(out[k]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scale", _SCALES)
def test_grad_snr_is_scale_invariant(dtype, scale):
    """With `eps` scaled along (`eps=0` here) the SNR is a ratio of like sizes."""
    grads = _random_layers(dtype, samples=8)
    ref = jpc.compute_grad_snr(grads, eps=0.0)
    out = jpc.compute_grad_snr(_scaled(grads, scale), eps=0.0)
    for k in ("per_layer", "overall"):
        np.testing.assert_allclose(out[k], ref[k], rtol=_RTOL[dtype])
        assert np.all(np.isfinite(out[k]))
    # The unscaled value against numpy's mean/std, so both sides are checked.
    g = np.asarray(grads[0].weight, np.float64).reshape(8, -1)
    b = np.asarray(grads[0].bias, np.float64).reshape(8, -1)
    g = np.concatenate([g, b], 1)
    expected = np.mean(np.abs(g.mean(0)) / g.std(0))
    np.testing.assert_allclose(ref["per_layer"][0], expected, rtol=_RTOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scale", _SCALES)
def test_layer_grad_variance_ratios_are_scale_invariant(dtype, scale):
    grads = _random_layers(dtype)
    ref = jpc.compute_layer_grad_variance_ratios(grads)
    out = jpc.compute_layer_grad_variance_ratios(_scaled(grads, scale))
    np.testing.assert_allclose(out["ratios"], ref["ratios"], rtol=_RTOL[dtype])
    # Variances are var(W) itself: checked against numpy where they fit the dtype.
    expected = [np.var(np.asarray(layer.weight, np.float64)) for layer in grads]
    np.testing.assert_allclose(ref["variances"], expected, rtol=_RTOL[dtype])
    mixed = [grads[0], _scaled(grads[1], scale), grads[2]]
    ratios = jpc.compute_layer_grad_variance_ratios(mixed, reference=0)["ratios"]
    np.testing.assert_allclose(
        ratios[2] / ratios[1], expected[2] / expected[1] / scale**2, rtol=_RTOL[dtype]
    )
