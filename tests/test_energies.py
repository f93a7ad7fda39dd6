"""The PC energy against the hand-written formula of SPEC §3.1."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    assert_trees_close,
    mlp_weights,
    random_problem,
    ref_energy,
    ref_layer_energies,
)

import jpc


WIDTHS = [4, 5, 5, 5, 3]


def lib_energy(p, activities=None, **kw):
    return jpc.pc_energy_fn(
        p.params,
        p.activities if activities is None else activities,
        p.y,
        x=p.x,
        loss=p.loss,
        param_type=p.param_type,
        gamma=p.gamma,
        **kw,
    )


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("param_type", ["sp", "mupc", "ntp"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("supervised", [True, False])
@pytest.mark.slow
def test_energy_matches_formula(key, loss, param_type, skip, supervised):
    p = random_problem(
        key, WIDTHS, 3, supervised, skip, param_type=param_type, loss=loss
    )
    np.testing.assert_allclose(lib_energy(p), p.ref(), rtol=1e-10)


def test_energy_explicit_two_layer_linear(key):
    """A tiny fully explicit example: F = ½‖z1 − W1 x‖²/B + ½‖y − W2 z1‖²/B."""
    model = jpc.make_mlp(key, 2, 3, 2, 2, "linear")
    W1, W2 = mlp_weights(model)
    x = jnp.array([[1.0, -2.0], [0.5, 0.0]])
    y = jnp.array([[0.3, 0.1], [-1.0, 2.0]])
    z1 = jnp.array([[0.2, 0.0, -0.4], [1.0, 1.0, 1.0]])
    z2 = jnp.zeros((2, 2))
    want = 0.0
    for i in range(2):
        want += 0.5 * float(jnp.sum((z1[i] - W1 @ x[i]) ** 2))
        want += 0.5 * float(jnp.sum((y[i] - W2 @ z1[i]) ** 2))
    want /= 2
    got = jpc.pc_energy_fn((model, None), [z1, z2], y, x=x)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("param_type", ["sp", "mupc", "ntp"])
@pytest.mark.parametrize("gamma", [0.5, 3.0])
@pytest.mark.parametrize("lam", [0.01, 2.0])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_energy_gamma_and_output_scaling(key, param_type, gamma, lam, loss):
    p = random_problem(
        key, WIDTHS, 3, param_type=param_type, gamma=gamma, loss=loss, skip=True
    )
    got = lib_energy(p, output_energy_scaling=lam)
    np.testing.assert_allclose(got, p.ref(lam=lam), rtol=1e-10)


@pytest.mark.parametrize("supervised", [True, False])
@pytest.mark.parametrize(
    "reg",
    [
        {"weight_decay": 0.3},
        {"spectral_penalty": 0.2},
        {"activity_decay": 0.7},
        {"weight_decay": 0.1, "spectral_penalty": 0.05, "activity_decay": 0.4},
    ],
)
def test_energy_regularisers(key, supervised, reg):
    p = random_problem(key, WIDTHS, 3, supervised, use_bias=True)
    np.testing.assert_allclose(lib_energy(p, **reg), p.ref(**reg), rtol=1e-10)
    # and the regulariser really contributes (guards against a vacuous match)
    assert abs(float(p.ref(**reg)) - float(p.ref())) > 1e-3


def test_activity_decay_explicit(key):
    """activity_decay/2 · Σ_l mean_i ‖z_{l,i}‖² over z_1..z_{L-1} (supervised)."""
    p = random_problem(key, [3, 4, 4, 2], 5)
    base = lib_energy(p)
    got = lib_energy(p, activity_decay=0.6) - base
    z1, z2 = p.activities[0], p.activities[1]
    want = 0.3 * (jnp.sum(z1**2) / 5 + jnp.sum(z2**2) / 5)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_activity_decay_unsupervised_includes_latent(key):
    p = random_problem(key, [3, 4, 4, 2], 5, supervised=False)
    got = lib_energy(p, activity_decay=0.6) - lib_energy(p)
    want = 0.3 * sum(jnp.sum(z**2) / 5 for z in p.activities[:3])
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_weight_decay_excludes_biases(key):
    p = random_problem(key, [3, 4, 2], 2, use_bias=True)
    got = lib_energy(p, weight_decay=1.0) - lib_energy(p)
    want = 0.5 * sum(jnp.sum(W**2) for W in mlp_weights(p.model))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def _nested_model(key):
    """Layers whose weights sit inside nested Sequentials (SPEC §11.2)."""
    k = jr.split(key, 5)
    layer1 = eqx.nn.Sequential(
        [
            eqx.nn.Linear(3, 4, key=k[0]),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(4, 4, use_bias=False, key=k[1]),
        ]
    )
    layer2 = eqx.nn.Sequential(
        [
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Sequential(
                [eqx.nn.Linear(4, 5, key=k[2]), eqx.nn.Lambda(jax.nn.relu)]
            ),
            eqx.nn.Linear(5, 2, key=k[3]),
        ]
    )
    model = [layer1, layer2]
    weights = [
        layer1.layers[0].weight,
        layer1.layers[2].weight,
        layer2.layers[1].layers[0].weight,
        layer2.layers[2].weight,
    ]
    return model, weights


@pytest.mark.parametrize("reg", [{"weight_decay": 0.3}, {"spectral_penalty": 0.2}])
def test_regularisers_reach_nested_weights(key, reg):
    """§11.2: weight decay and spectral penalty cover weights nested in layers."""
    model, weights = _nested_model(key)
    x = jr.normal(jr.PRNGKey(1), (3, 3))
    y = jr.normal(jr.PRNGKey(2), (3, 2))
    acts = [jr.normal(jr.PRNGKey(3), (3, 4)), jnp.zeros((3, 2))]
    got = jpc.pc_energy_fn((model, None), acts, y, x=x, **reg)
    want = ref_energy(model, acts, y, x=x, weights=weights, **reg)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # the nested inner weights matter: dropping them gives a different number
    partial = ref_energy(model, acts, y, x=x, weights=weights[:1] + weights[3:], **reg)
    assert abs(float(want) - float(partial)) > 1e-3


@pytest.mark.parametrize("reg", [{"weight_decay": 0.3}, {"spectral_penalty": 0.2}])
def test_regularisers_skip_one_axis_weights(key, reg):
    """SPEC §3.1 regularises weight matrices: the 1-axis `weight` (gain) of a
    LayerNorm is no matrix and, like a bias, is left out."""
    k = jr.split(key, 2)
    norm = eqx.nn.LayerNorm(4)
    norm = eqx.tree_at(lambda n: n.weight, norm, jnp.array([0.5, 2.0, -1.0, 3.0]))
    layer1 = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=k[0]), norm])
    layer2 = eqx.nn.Linear(4, 2, key=k[1])
    model = [layer1, layer2]
    x = jr.normal(jr.PRNGKey(1), (3, 3))
    y = jr.normal(jr.PRNGKey(2), (3, 2))
    acts = [jr.normal(jr.PRNGKey(3), (3, 4)), jnp.zeros((3, 2))]
    got = jpc.pc_energy_fn((model, None), acts, y, x=x, **reg)
    weights = [layer1.layers[0].weight, layer2.weight]
    want = ref_energy(model, acts, y, x=x, weights=weights, **reg)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_spectral_penalty_explicit_orthogonal(key):
    """‖WᵀW − I‖² vanishes for an orthogonal weight and equals a known value else."""
    model = jpc.make_mlp(key, 2, 2, 2, 2, "linear")
    c, s = np.cos(0.3), np.sin(0.3)
    Q = jnp.array([[c, -s], [s, c]])
    model = eqx.tree_at(lambda m: m[0].layers[1].weight, model, Q)
    model = eqx.tree_at(lambda m: m[1].layers[1].weight, model, 2.0 * jnp.eye(2))
    x = jnp.ones((1, 2))
    y = jnp.ones((1, 2))
    acts = [jnp.ones((1, 2)), jnp.ones((1, 2))]
    base = jpc.pc_energy_fn((model, None), acts, y, x=x)
    got = jpc.pc_energy_fn((model, None), acts, y, x=x, spectral_penalty=1.0) - base
    # Q: 0; 2I: (4 − 1)² · 2 = 18, times ½
    np.testing.assert_allclose(got, 9.0, rtol=1e-10)


def test_skip_model_weights_not_regularised(key):
    """Weight decay covers the model only, not a trainable skip model."""
    p = random_problem(key, [3, 4, 4, 2], 2)
    skip = [None, eqx.nn.Linear(4, 4, use_bias=False, key=jr.PRNGKey(7)), None]
    params = (p.model, skip)
    got = jpc.pc_energy_fn(params, p.activities, p.y, x=p.x, weight_decay=0.5)
    want = ref_energy(
        p.model, p.activities, p.y, x=p.x, skip_model=skip, weight_decay=0.5
    )
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("supervised", [True, False])
def test_record_layers_order(key, depth, supervised):
    """record_layers returns [E_L, E_2, ..., E_{L−1}, E_1], regulariser excluded."""
    p = random_problem(key, [3] + [4] * (depth - 1) + [2], 3, supervised)
    got = lib_energy(p, record_layers=True, weight_decay=0.3, activity_decay=0.2)
    E = ref_layer_energies(p.model, p.activities, p.y, x=p.x)
    want = [E[-1]] + E[1:-1] + [E[0]]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10)
    np.testing.assert_allclose(np.sum(got), lib_energy(p), rtol=1e-10)


def test_record_layers_with_scalings_and_lambda(key):
    p = random_problem(key, [3, 4, 4, 4, 2], 3, param_type="mupc", skip=True, gamma=2.0)
    got = lib_energy(p, record_layers=True, output_energy_scaling=0.3)
    E = ref_layer_energies(
        p.model,
        p.activities,
        p.y,
        x=p.x,
        skip_model=p.skip_model,
        scalings=p.scalings,
        lam=0.3,
    )
    want = [E[-1]] + E[1:-1] + [E[0]]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10)


@pytest.mark.parametrize("supervised", [True, False])
def test_energy_ignores_dummy_last_slot(key, supervised):
    p = random_problem(key, WIDTHS, 3, supervised)
    other = list(p.activities)
    other[-1] = other[-1] + 100.0
    np.testing.assert_allclose(lib_energy(p, other), lib_energy(p), rtol=1e-14)


def test_energy_at_ffwd_equals_output_loss(key):
    for param_type in ["sp", "mupc"]:
        p = random_problem(key, WIDTHS, 4, param_type=param_type, skip=True)
        acts = p.ffwd()
        pred = acts[-1]
        want = 0.5 * jnp.mean(jnp.sum((p.y - pred) ** 2, axis=1))
        np.testing.assert_allclose(lib_energy(p, acts), want, rtol=1e-10)


def test_ce_energy_is_stable_for_large_logits(key):
    """Cross-entropy is computed with log_softmax: huge logits stay finite and exact."""
    p = random_problem(key, [3, 4, 4, 5], 3, loss="ce")
    big = eqx.tree_at(
        lambda m: m[-1].layers[1].weight, p.model, p.model[-1].layers[1].weight * 1e4
    )
    acts = [a * 10 for a in p.activities]
    got = jpc.pc_energy_fn((big, None), acts, p.y, x=p.x, loss="ce")
    want = ref_energy(big, acts, p.y, x=p.x, loss="ce")
    assert np.isfinite(float(got))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_energy_jit_equals_eager(key):
    p = random_problem(key, WIDTHS, 3, skip=True, param_type="mupc")
    kw = dict(x=p.x, param_type="mupc", weight_decay=0.1, activity_decay=0.2)
    eager = jpc.pc_energy_fn(p.params, p.activities, p.y, **kw)
    jitted = eqx.filter_jit(
        lambda params, acts, y, x: jpc.pc_energy_fn(
            params,
            acts,
            y,
            x=x,
            param_type="mupc",
            weight_decay=0.1,
            activity_decay=0.2,
        )
    )(p.params, p.activities, p.y, p.x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-10)


@pytest.mark.parametrize("supervised", [True, False])
def test_energy_batch_mean_equals_loop_over_examples(key, supervised):
    """F(batch) = mean over examples of F(single example) (no regulariser)."""
    p = random_problem(key, WIDTHS, 4, supervised)
    full = lib_energy(p)
    singles = []
    for i in range(4):
        acts = [a[i : i + 1] for a in p.activities]
        x = None if p.x is None else p.x[i : i + 1]
        singles.append(jpc.pc_energy_fn(p.params, acts, p.y[i : i + 1], x=x))
    np.testing.assert_allclose(full, np.mean(singles), rtol=1e-10)


def test_energy_vmap_equals_loop(key):
    """vmap over a stack of targets = Python loop."""
    p = random_problem(key, WIDTHS, 3)
    ys = jr.normal(jr.PRNGKey(11), (5,) + p.y.shape)
    vm = jax.vmap(lambda y: jpc.pc_energy_fn(p.params, p.activities, y, x=p.x))(ys)
    loop = [jpc.pc_energy_fn(p.params, p.activities, y, x=p.x) for y in ys]
    np.testing.assert_allclose(vm, np.asarray(loop), rtol=1e-10)


def _conv_problem(key):
    k = jr.split(key, 6)
    model = [
        eqx.nn.Conv2d(1, 2, 3, padding=1, key=k[0]),
        eqx.nn.Sequential(
            [
                eqx.nn.Lambda(jnp.tanh),
                eqx.nn.MaxPool2d(2, 2),
                eqx.nn.Lambda(jnp.ravel),
                eqx.nn.Linear(8, 3, key=k[1]),
            ]
        ),
    ]
    weights = [model[0].weight, model[1].layers[3].weight]
    x = jr.normal(k[2], (2, 1, 4, 4))
    y = jr.normal(k[3], (2, 3))
    acts = [jr.normal(k[4], (2, 2, 4, 4)), jnp.zeros((2, 3))]
    return model, weights, x, y, acts


@pytest.mark.slow
def test_conv_model_energy(key):
    """User-built conv/pool layers work; energies sum over all non-batch axes."""
    model, weights, x, y, acts = _conv_problem(key)
    reg = dict(weight_decay=0.2, spectral_penalty=0.1, activity_decay=0.3)
    got = jpc.pc_energy_fn((model, None), acts, y, x=x, **reg)
    want = ref_energy(model, acts, y, x=x, weights=weights, **reg)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    g = jpc.compute_pc_activity_grad((model, None), acts, y, x=x, **reg)[1]
    gref = jax.grad(lambda a: ref_energy(model, a, y, x=x, weights=weights, **reg))(
        acts
    )
    for a, b in zip(g, gref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_energy_float32_matches_float64_reference(key):
    """float32 inputs: energy and grads agree with the float64 reference to 1e-5."""
    p = random_problem(key, WIDTHS, 3, skip=True, param_type="mupc")

    def f32(tree):
        return jax.tree_util.tree_map(
            lambda v: v.astype(jnp.float32) if eqx.is_array(v) else v, tree
        )

    model32, acts32, x32, y32 = f32(p.model), f32(p.activities), f32(p.x), f32(p.y)
    got = jpc.pc_energy_fn(
        (model32, p.skip_model), acts32, y32, x=x32, param_type="mupc"
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, p.ref(), rtol=1e-5)
    _, g = jpc.compute_pc_activity_grad(
        (model32, p.skip_model), acts32, y32, x=x32, param_type="mupc"
    )
    gref = jax.grad(lambda a: p.ref(a))(list(p.activities))
    for a, b in zip(g[:-1], gref[:-1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class _TwoMatrices(eqx.Module):
    """A custom module whose weights are not called `weight`."""

    W1: jax.Array
    W2: jax.Array
    b: jax.Array

    def __call__(self, z):
        return self.W2 @ jnp.tanh(self.W1 @ z) + self.b


class _Holder(eqx.Module):
    """A PC layer that carries `extra` (regularised, unused by the forward pass)."""

    linear: eqx.nn.Linear
    extra: object

    def __call__(self, z):
        return self.linear(z)


def _penalty(weights, weight_decay, spectral_penalty):
    """Hand-written ½λ_w Σ‖W‖² + ½λ_s Σ‖WᵀW − I‖², kernels as (out, rest)."""
    total = 0.0
    for w in weights:
        m = w.reshape(w.shape[0], -1)
        total += 0.5 * weight_decay * jnp.sum(m**2)
        gram = m.T @ m - jnp.eye(m.shape[1])
        total += 0.5 * spectral_penalty * jnp.sum(gram**2)
    return total


def _modules(key):
    """(module, function listing the weights a hand-written penalty covers)."""
    k = jr.split(key, 8)
    return {
        "make_mlp": (
            jpc.make_mlp(k[0], 3, 4, 2, 2, "tanh", use_bias=True),
            lambda m: [blk.layers[1].weight for blk in m],
        ),
        "nested_sequential": (
            _nested_model(k[1])[0],
            lambda m: [
                m[0].layers[0].weight,
                m[0].layers[2].weight,
                m[1].layers[1].layers[0].weight,
                m[1].layers[2].weight,
            ],
        ),
        "eqx_mlp": (
            eqx.nn.MLP(3, 2, 4, 2, key=k[2]),
            lambda m: [layer.weight for layer in m.layers],
        ),
        "conv2d": (
            eqx.nn.Conv2d(2, 3, 3, key=k[3]),
            lambda m: [m.weight],
        ),
        "gru_cell": (
            eqx.nn.GRUCell(3, 4, key=k[4]),
            lambda m: [m.weight_ih, m.weight_hh],
        ),
        "multihead_attention": (
            eqx.nn.MultiheadAttention(2, 4, key=k[5]),
            lambda m: [
                m.query_proj.weight,
                m.key_proj.weight,
                m.value_proj.weight,
                m.output_proj.weight,
            ],
        ),
        "layer_norm": (
            eqx.tree_at(
                lambda n: (n.weight, n.bias),
                eqx.nn.LayerNorm(4),
                (jnp.array([0.5, 2.0, -1.0, 3.0]), jnp.array([0.1, 0.2, 0.3, 0.4])),
            ),
            lambda m: [],
        ),
        "custom_w1_w2": (
            _TwoMatrices(jr.normal(k[6], (5, 4)), jr.normal(k[7], (3, 5)), jnp.ones(3)),
            lambda m: [m.W1, m.W2],
        ),
    }


@pytest.mark.parametrize("reg", [(0.3, 0.0), (0.0, 0.2), (0.3, 0.2)])
@pytest.mark.parametrize("name", list(_modules(jr.PRNGKey(0))))
@pytest.mark.slow
def test_regulariser_gradient_reaches_every_weight(key, name, reg):
    """Every floating array with >= 2 axes is a weight, whatever it is called;
    vectors (biases, LayerNorm gains) are not. The parameter gradient added by
    `weight_decay` / `spectral_penalty` equals `jax.grad` of the hand-written
    penalty over the listed weights (conv kernels read as (out, in·k·k))."""
    weight_decay, spectral_penalty = reg
    module, listed = _modules(key)[name]
    k1, k2 = jr.split(jr.PRNGKey(5))
    model = [
        _Holder(eqx.nn.Linear(3, 4, key=k1), module),
        eqx.nn.Linear(4, 2, key=k2),
    ]
    x = jr.normal(jr.PRNGKey(1), (3, 3))
    y = jr.normal(jr.PRNGKey(2), (3, 2))
    acts = [jr.normal(jr.PRNGKey(3), (3, 4)), jnp.zeros((3, 2))]
    kw = dict(x=x, weight_decay=weight_decay, spectral_penalty=spectral_penalty)
    with_reg = jpc.compute_pc_param_grads((model, None), acts, y, **kw)[0]
    without = jpc.compute_pc_param_grads((model, None), acts, y, x=x)[0]
    got = jax.tree_util.tree_map(jnp.subtract, with_reg[0].extra, without[0].extra)

    def hand(m):
        return _penalty(listed(m), weight_decay, spectral_penalty)

    want = eqx.filter_grad(hand)(module)
    assert_trees_close(got, want, rtol=1e-10, atol=1e-12)
    # the module's own weights are in the penalty: a non-zero gradient unless
    # the module holds none (LayerNorm)
    total = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree_util.tree_leaves(got))
    assert (total > 0) == bool(listed(module))
