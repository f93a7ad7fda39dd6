"""Other local rules (SPEC §7): FA with transposed weights = backprop, FA with random
feedback against a hand-written backward pass, the Kolen–Pollack identities and
alignment under training, and WP/NP estimates converging to backprop."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    REF_ACT_FNS,
    assert_trees_close,
    backprop_grads,
    mlp_weights,
    random_problem,
    ref_forward,
    ref_output_loss,
    sgd_apply,
)

import jpc
from jpc._perturbation import grads_from_node_errors


WIDTHS = [4, 5, 5, 3]


def problem(key, **kw):
    kw = {"act_fn": "tanh", "use_bias": True, **kw}
    return random_problem(key, WIDTHS, 6, **kw)


def transposed(model):
    return [None] + [w.T for w in mlp_weights(model)[1:]]


def rule_kw(p):
    return dict(loss_id=p.loss, skip_model=p.skip_model, param_type=p.param_type)


def flat(tree):
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    return jnp.concatenate([jnp.ravel(a) for a in leaves])


def cosine(a, b):
    a, b = flat(a), flat(b)
    return float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))


# ------------------------------------------------------------------ feedback alignment


@pytest.mark.parametrize(
    "loss,param_type,skip",
    [("mse", "sp", False), ("ce", "sp", False), ("mse", "mupc", True)],
)
@pytest.mark.slow
def test_fa_with_transposed_weights_is_backprop(key, loss, param_type, skip):
    p = problem(key, loss=loss, param_type=param_type, skip=skip)
    if skip:  # square hidden layers for the identity skips
        p = random_problem(
            key, [4, 5, 5, 5, 3], 6, skip=True, param_type=param_type, use_bias=True
        )
    grads = jpc.compute_fa_param_grads(
        p.model, transposed(p.model), p.x, p.y, **rule_kw(p)
    )
    assert_trees_close(grads, backprop_grads(p, loss=p.loss), rtol=1e-10, atol=1e-15)


def _hand_fa(p, feedback):
    """FA on the make_mlp layout by hand: z_l = W_l φ(z_{l-1}) + b_l (φ_1 = id)."""
    act = REF_ACT_FNS[p.act_fn]
    d_act = jax.vmap(jax.vmap(jax.grad(act)))
    Ws = mlp_weights(p.model)
    bs = [blk.layers[1].bias for blk in p.model]
    inputs, pre, z = [], [], p.x
    for i, (W, b) in enumerate(zip(Ws, bs)):
        inputs.append(z if i == 0 else act(z))
        z = inputs[-1] @ W.T + b
        pre.append(z)
    delta = (z - p.y) / p.B  # ∂(batch-mean MSE)/∂z_L
    grads = [None] * len(Ws)
    for i in range(len(Ws) - 1, -1, -1):
        grads[i] = (delta.T @ inputs[i], delta.sum(0))
        if i > 0:  # the error below layer i goes down through B_i, not W_iᵀ
            delta = (delta @ feedback[i].T) * d_act(pre[i - 1])
    return grads


@pytest.mark.slow
def test_fa_with_random_feedback_matches_hand_written_rule(key, keys):
    p = problem(key)
    feedback = jpc.init_feedback_weights(keys[0], p.model)
    grads = jpc.compute_fa_param_grads(p.model, feedback, p.x, p.y)
    for blk, (gW, gb) in zip(grads, _hand_fa(p, feedback)):
        np.testing.assert_allclose(blk.layers[1].weight, gW, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(blk.layers[1].bias, gb, rtol=1e-10, atol=1e-15)
    # the output layer's update never depends on the feedback: equal to backprop's
    bp = backprop_grads(p)
    assert_trees_close(grads[-1], bp[-1], rtol=1e-10)
    assert cosine(grads[0], bp[0]) < 0.999


@pytest.mark.slow
def test_init_feedback_weights_shapes_and_scale(key, keys):
    model = jpc.make_mlp(key, 300, 200, 3, 100, "tanh")
    feedback = jpc.init_feedback_weights(keys[0], model)
    assert feedback[0] is None
    for fb, W in zip(feedback[1:], mlp_weights(model)[1:]):
        assert fb.shape == W.T.shape
        # same second moment as the forward weight (Equinox: U(±1/√fan_in))
        rms_fb, rms_w = (
            float(jnp.sqrt(jnp.mean(fb**2))),
            float(jnp.sqrt(jnp.mean(W**2))),
        )
        np.testing.assert_allclose(rms_fb, rms_w, rtol=0.03)
        np.testing.assert_allclose(rms_w, 1 / np.sqrt(3 * W.shape[1]), rtol=0.03)
        assert float(jnp.max(jnp.abs(fb))) <= np.sqrt(3) * rms_w + 1e-12


# ------------------------------------------------------------------ Kolen–Pollack


def test_kp_updates_are_transposed_weight_grads_plus_decay(key, keys):
    p = problem(key)
    feedback = jpc.init_feedback_weights(keys[0], p.model)
    wd = 0.1
    grads, fb_grads = jpc.compute_kp_updates(
        p.model, feedback, p.x, p.y, weight_decay=wd
    )
    fa = jpc.compute_fa_param_grads(p.model, feedback, p.x, p.y)
    assert fb_grads[0] is None
    for i, (g, g_fa, W) in enumerate(zip(grads, fa, mlp_weights(p.model))):
        np.testing.assert_allclose(
            g.layers[1].weight, g_fa.layers[1].weight + wd * W, rtol=1e-12
        )
        # biases are not decayed
        np.testing.assert_allclose(g.layers[1].bias, g_fa.layers[1].bias, rtol=1e-12)
        if i > 0:
            np.testing.assert_allclose(
                fb_grads[i], g_fa.layers[1].weight.T + wd * feedback[i], rtol=1e-12
            )


def test_kp_feedback_aligns_with_transposed_weights_under_training(key, keys):
    """With one SGD step size η for both, B − Wᵀ shrinks by exactly (1 − ηλ) a step."""
    p = problem(key)
    model, feedback = p.model, jpc.init_feedback_weights(keys[0], p.model)
    lr, wd, steps = 0.2, 0.2, 80

    def gaps(m, fb):
        pairs = zip(fb[1:], mlp_weights(m)[1:])
        return np.array([float(jnp.linalg.norm(b - w.T)) for b, w in pairs])

    def alignment(m, fb):
        return [cosine([b], [w.T]) for b, w in zip(fb[1:], mlp_weights(m)[1:])]

    def loss(m):
        return float(ref_output_loss(ref_forward(m, p.x)[-1], p.y) / p.B)

    gap0, align0, loss0 = gaps(model, feedback), alignment(model, feedback), loss(model)
    for _ in range(steps):
        grads, fb_grads = jpc.compute_kp_updates(
            model, feedback, p.x, p.y, weight_decay=wd
        )
        model = sgd_apply(model, grads, lr)
        feedback = [None] + [b - lr * g for b, g in zip(feedback[1:], fb_grads[1:])]
    expected = gap0 * (1 - lr * wd) ** steps
    np.testing.assert_allclose(gaps(model, feedback), expected, rtol=1e-9)
    # With B = Wᵀ + D, ‖D‖ = g: cos(B, Wᵀ) ≥ (‖W‖ − g) / (‖W‖ + g) (Cauchy–Schwarz),
    # a bound from the exact gap checked above.
    norms = [float(jnp.linalg.norm(w)) for w in mlp_weights(model)[1:]]
    after = alignment(model, feedback)
    for w, g, before, cos in zip(norms, gaps(model, feedback), align0, after):
        assert cos >= (w - g) / (w + g) - 1e-12
        assert cos > max(before, 0.0) + 0.3
    assert loss(model) < loss0


# ------------------------------------------------------------------ perturbation


def test_node_errors_machinery_gives_backprop_with_exact_errors(key):
    """The NP update correlates errors with presynaptic activity; with the exact
    errors ∂L/∂z_l (from a hand-written forward pass with shifts) it is backprop."""
    p = random_problem(
        key, [4, 5, 5, 5, 3], 6, skip=True, param_type="ntp", use_bias=True
    )
    zeros = [jnp.zeros_like(a) for a in p.ffwd()]
    deltas = jax.grad(_shifted_loss)(zeros, p)
    grads = grads_from_node_errors(p.model, p.skip_model, p.scalings, p.x, deltas)
    assert_trees_close(grads, backprop_grads(p), rtol=1e-10, atol=1e-15)


def _shifted_loss(shifts, p):
    z = p.x
    for i, layer in enumerate(p.model):
        pred = p.scalings[i] * jax.vmap(layer)(z)
        if p.skip_model is not None and p.skip_model[i] is not None:
            pred = pred + jax.vmap(p.skip_model[i])(z)
        z = pred + shifts[i]
    return ref_output_loss(z, p.y) / p.B


@pytest.mark.parametrize("rule", ["wp", "np"])
@pytest.mark.slow
def test_perturbation_estimates_converge_to_backprop(key, keys, rule):
    p = random_problem(key, [3, 4, 4, 2], 5, act_fn="tanh", use_bias=True)
    bp = backprop_grads(p)
    fn = jpc.compute_wp_param_grads if rule == "wp" else jpc.compute_np_param_grads
    cos = {
        n: np.mean(
            [
                cosine(fn(k, p.model, p.x, p.y, sigma=1e-4, n_samples=n), bp)
                for k in keys[:3]
            ]
        )
        for n in (8, 2048)
    }
    # with ~40 parameters, the cosine of an S-sample estimate is ~ sqrt(S / (S + P))
    assert cos[8] < 0.9 < 0.95 < cos[2048]


# ------------------------------------------------------------------ other layouts


def _custom_mlp(key):
    """Not the `make_mlp` layout: activation *after* each hidden `eqx.nn.Linear`
    (inside a `Sequential`), and a bare `eqx.nn.Linear` as the output layer."""
    k = jax.random.split(key, 3)
    return [
        eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=k[0]), eqx.nn.Lambda(jnp.tanh)]),
        eqx.nn.Sequential(
            [eqx.nn.Linear(4, 4, key=k[1]), eqx.nn.Lambda(jax.nn.sigmoid)]
        ),
        eqx.nn.Linear(4, 2, key=k[2]),
    ]


def _custom_loss(model, x, y, loss, shifts=None):
    """Batch-mean output loss of a hand-written forward pass; `shifts` are added to
    every layer's output (for the exact node errors)."""
    z = x
    for i, layer in enumerate(model):
        z = jax.vmap(layer)(z) + (0.0 if shifts is None else shifts[i])
    return ref_output_loss(z, y, loss) / x.shape[0]


@pytest.mark.slow
def test_rules_on_a_custom_linear_layout(key, keys, loss="ce"):
    """Also the only WP/NP check with a cross-entropy loss."""
    model = _custom_mlp(key)
    x = jax.random.normal(keys[0], (6, 3))
    if loss == "mse":
        y = jax.random.normal(keys[1], (6, 2))
    else:
        y = jax.nn.one_hot(jax.random.randint(keys[1], (6,), 0, 2), 2)
    linears = [model[0].layers[0], model[1].layers[0], model[2]]
    bp = eqx.filter_grad(_custom_loss)(model, x, y, loss)
    # feedback shapes follow the inner Linear; transposed weights give backprop
    feedback = jpc.init_feedback_weights(keys[2], model)
    assert feedback[0] is None
    assert [fb.shape for fb in feedback[1:]] == [(4, 4), (4, 2)]
    exact = [None] + [lin.weight.T for lin in linears[1:]]
    fa = jpc.compute_fa_param_grads(model, exact, x, y, loss_id=loss)
    assert_trees_close(fa, bp, rtol=1e-10, atol=1e-15)
    kp, _ = jpc.compute_kp_updates(model, exact, x, y, loss_id=loss)
    assert_trees_close(kp, bp, rtol=1e-10, atol=1e-15)
    # random feedback: output layer still exact, the first layer is not
    fa = jpc.compute_fa_param_grads(model, feedback, x, y, loss_id=loss)
    assert_trees_close(fa[-1], bp[-1], rtol=1e-10, atol=1e-15)
    assert cosine(fa[0], bp[0]) < 0.999
    # node-error machinery with the exact errors ∂L/∂z_l is backprop
    zeros = [jnp.zeros((6, n)) for n in (4, 4, 2)]
    deltas = jax.grad(lambda s: _custom_loss(model, x, y, loss, s))(zeros)
    grads = grads_from_node_errors(model, None, [1.0] * 3, x, deltas)
    assert_trees_close(grads, bp, rtol=1e-10, atol=1e-15)
    # perturbation estimates with many samples point along backprop
    for fn in (jpc.compute_wp_param_grads, jpc.compute_np_param_grads):
        est = fn(keys[3], model, x, y, sigma=1e-4, n_samples=2048, loss_id=loss)
        assert cosine(est, bp) > 0.95


# ------------------------------------------------------------------ errors


def test_rule_errors(key, keys):
    p = problem(key)
    feedback = transposed(p.model)
    with pytest.raises(ValueError, match="`loss_id` must be one of"):
        jpc.compute_fa_param_grads(p.model, feedback, p.x, p.y, loss_id="l1")
    with pytest.raises(ValueError, match="one entry per layer"):
        jpc.compute_fa_param_grads(p.model, feedback[:2], p.x, p.y)
    with pytest.raises(TypeError, match="`feedback` must be a list"):
        jpc.compute_kp_updates(p.model, None, p.x, p.y)
    bad = [None, feedback[1], feedback[2].T]
    with pytest.raises(ValueError, match=r"`feedback\[2\]` must have shape \(5, 3\)"):
        jpc.compute_fa_param_grads(p.model, bad, p.x, p.y)
    with pytest.raises(ValueError, match="same batch size"):
        jpc.compute_fa_param_grads(p.model, feedback, p.x, p.y[:2])
    for fn in (jpc.compute_wp_param_grads, jpc.compute_np_param_grads):
        with pytest.raises(ValueError, match="`n_samples` must be a positive integer"):
            fn(keys[0], p.model, p.x, p.y, n_samples=0)
    twice = eqx.nn.Sequential([eqx.nn.Linear(5, 5, key=key)] * 2)
    doubled = [p.model[0], twice, p.model[2]]
    with pytest.raises(ValueError, match="exactly one `eqx.nn.Linear`"):
        jpc.init_feedback_weights(keys[0], doubled)


@pytest.mark.parametrize("sigma", [0, 0.0])
def test_perturbation_rejects_zero_sigma(key, keys, sigma):
    """A zero `sigma` divides by zero: a clear error instead of NaN estimates."""
    p = problem(key)
    for fn in (jpc.compute_wp_param_grads, jpc.compute_np_param_grads):
        with pytest.raises(ValueError, match="`sigma` must be a non-zero float, got 0"):
            fn(keys[0], p.model, p.x, p.y, sigma=sigma)
