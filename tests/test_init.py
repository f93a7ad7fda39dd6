"""Model builders, parameter scalings, activity initialisation (SPEC §3.3-§3.4, §5)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    REF_ACT_FNS,
    array_leaves,
    assert_trees_close,
    random_problem,
    ref_forward,
    ref_scalings,
)

import jpc


# ------------------------------------------------------------------ make_mlp


@pytest.mark.parametrize("use_bias", [False, True])
def test_make_mlp_layout(key, use_bias):
    model = jpc.make_mlp(key, 5, 7, 4, 3, "tanh", use_bias=use_bias)
    assert len(model) == 4
    shapes = [(7, 5), (7, 7), (7, 7), (3, 7)]
    for blk, shape in zip(model, shapes, strict=True):
        assert isinstance(blk, eqx.nn.Sequential)
        assert isinstance(blk.layers[0], eqx.nn.Lambda)
        assert isinstance(blk.layers[1], eqx.nn.Linear)
        assert blk.layers[1].weight.shape == shape
        if use_bias:
            assert blk.layers[1].bias.shape == (shape[0],)
        else:
            assert blk.layers[1].bias is None


@pytest.mark.parametrize("act", sorted(REF_ACT_FNS))
def test_make_mlp_computes_W_phi_plus_b(key, act):
    """f_1(z) = W_1 z + b_1 and f_l(z) = W_l φ(z) + b_l for l > 1 (SPEC §3.4)."""
    model = jpc.make_mlp(key, 4, 6, 3, 2, act, use_bias=True)
    phi = REF_ACT_FNS[act]
    z_in = jr.normal(jr.PRNGKey(5), (4,)) * 2.0
    z_hid = jr.normal(jr.PRNGKey(6), (6,)) * 2.0
    for k, blk in enumerate(model):
        W, b = blk.layers[1].weight, blk.layers[1].bias
        z = z_in if k == 0 else z_hid
        expected = W @ (z if k == 0 else phi(z)) + b
        np.testing.assert_allclose(blk(z), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("act", ["leaky_relu", "gelu"])
def test_make_mlp_other_activations(key, act):
    model = jpc.make_mlp(key, 3, 5, 2, 2, act)
    W = model[1].layers[1].weight
    z = jnp.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    phi = jpc.get_act_fn(act)
    np.testing.assert_allclose(model[1](z), W @ phi(z), rtol=1e-12)


def test_make_mlp_depth_one(key):
    model = jpc.make_mlp(key, 5, 9, 1, 3, "relu")
    assert len(model) == 1
    W = model[0].layers[1].weight
    assert W.shape == (3, 5)
    z = jnp.arange(5.0) - 2.0
    np.testing.assert_allclose(model[0](z), W @ z, rtol=1e-12)  # identity activation


def test_make_mlp_deterministic_and_key_dependent(key):
    a = jpc.make_mlp(key, 4, 6, 3, 2, "tanh")
    b = jpc.make_mlp(key, 4, 6, 3, 2, "tanh")
    c = jpc.make_mlp(jr.PRNGKey(42), 4, 6, 3, 2, "tanh")
    assert_trees_close(array_leaves(a), array_leaves(b), rtol=0)
    assert not np.allclose(a[1].layers[1].weight, c[1].layers[1].weight)


@pytest.mark.parametrize("param_type", ["mupc", "ntp"])
def test_make_mlp_standard_normal_weights_for_mupc_ntp(key, param_type):
    """For mupc and ntp every weight is drawn from N(0, 1) (SPEC §3.3)."""
    model = jpc.make_mlp(key, 200, 200, 3, 200, "relu", param_type=param_type)
    for blk in model:
        W = np.asarray(blk.layers[1].weight)
        assert abs(W.mean()) < 0.02
        assert 0.97 < W.std() < 1.03


def test_make_mlp_sp_weights_scale_with_fan_in(key):
    """Standard parameterisation keeps weights O(1/sqrt(fan_in)), unlike mupc/ntp."""
    sp = jpc.make_mlp(key, 200, 200, 2, 10, "relu", param_type="sp")
    W = np.asarray(sp[1].layers[1].weight)
    assert W.std() < 0.5


# ------------------------------------------------------------------ skip model


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_make_skip_model(depth):
    skips = jpc.make_skip_model(depth)
    assert len(skips) == depth
    assert skips[0] is None
    assert skips[-1] is None
    z = jnp.arange(4.0)
    for s in skips[1:-1]:
        assert s is not None
        assert array_leaves(s) == []
        np.testing.assert_array_equal(s(z), z)


# ------------------------------------------------------------------ activations


@pytest.mark.parametrize("name", sorted(REF_ACT_FNS))
def test_get_act_fn_values(name):
    z = jnp.linspace(-3.0, 3.0, 13)
    np.testing.assert_allclose(
        jpc.get_act_fn(name)(z), REF_ACT_FNS[name](z), rtol=1e-12, atol=1e-14
    )


def test_get_act_fn_leaky_relu_and_gelu():
    z = jnp.linspace(-3.0, 3.0, 13)
    leaky = jpc.get_act_fn("leaky_relu")(z)
    pos = z > 0
    np.testing.assert_allclose(leaky[pos], z[pos])
    slope = leaky[~pos & (z < 0)] / z[~pos & (z < 0)]
    assert np.all((slope > 0) & (slope < 1))
    # gelu: z Φ(z) (exact or tanh approximation agree to ~1e-3)
    phi = 0.5 * (1 + jax.scipy.special.erf(z / math.sqrt(2)))
    np.testing.assert_allclose(jpc.get_act_fn("gelu")(z), z * phi, atol=2e-3)


# ------------------------------------------------------------------ scalings


@pytest.mark.parametrize("param_type", ["sp", "mupc", "ntp"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("gamma", [None, 2.5])
@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.slow
def test_get_param_scalings_table(key, param_type, skip, gamma, depth):
    D, N, out = 6, 9, 4
    model = jpc.make_mlp(key, D, N, depth, out, "tanh", param_type=param_type)
    skip_model = jpc.make_skip_model(depth) if skip else None
    x = jnp.ones((3, D))
    got = jpc.get_param_scalings(
        model, x, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    flags = [s is not None for s in skip_model] if skip else None
    want = ref_scalings(
        param_type, D=D, fan_ins=[D] + [N] * (depth - 1), skip_flags=flags, gamma=gamma
    )
    assert len(got) == depth
    np.testing.assert_allclose(np.asarray(got, dtype=float), want, rtol=1e-12)


@pytest.mark.slow
def test_get_param_scalings_explicit_values(key):
    """Spot values written directly from the table: D=4, N=16, L=3."""
    model = jpc.make_mlp(key, 4, 16, 3, 2, "tanh", param_type="mupc")
    x = jnp.ones((2, 4))
    mupc = jpc.get_param_scalings(model, x, param_type="mupc")
    np.testing.assert_allclose(np.asarray(mupc, float), [0.5, 0.25, 1 / 16])
    ntp = jpc.get_param_scalings(model, x, param_type="ntp", gamma=2.0)
    np.testing.assert_allclose(np.asarray(ntp, float), [0.5, 0.25, 0.125])
    skips = jpc.make_skip_model(3)
    mupc_s = jpc.get_param_scalings(model, x, skip_model=skips, param_type="mupc")
    np.testing.assert_allclose(
        np.asarray(mupc_s, float), [0.5, 1 / math.sqrt(48), 1 / 16]
    )


def test_get_param_scalings_depth_one_uses_first_layer_rule(key):
    model = jpc.make_mlp(key, 9, 5, 1, 3, "tanh", param_type="mupc")
    got = jpc.get_param_scalings(model, jnp.ones((2, 9)), param_type="mupc")
    np.testing.assert_allclose(np.asarray(got, float), [1 / 3])


@pytest.mark.parametrize("param_type", ["mupc", "ntp"])
def test_get_param_scalings_unsupervised(key, param_type):
    """input=None: D is the latent width, from the first layer (SPEC §3.3, §11.6)."""
    model = jpc.make_mlp(key, 16, 9, 3, 4, "tanh", param_type=param_type)
    got = jpc.get_param_scalings(model, None, param_type=param_type)
    want = ref_scalings(param_type, D=16, fan_ins=[16, 9, 9])
    np.testing.assert_allclose(np.asarray(got, float), want, rtol=1e-12)


def test_get_param_scalings_input_example_size(key):
    """D is the size of one example of `input` (all non-batch axes)."""
    model = [
        eqx.nn.Sequential([eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(12, 5, key=key)]),
        eqx.nn.Linear(5, 3, key=jr.PRNGKey(3)),
    ]
    x = jnp.ones((2, 3, 4))
    got = jpc.get_param_scalings(model, x, param_type="ntp")
    np.testing.assert_allclose(
        np.asarray(got, float), [1 / math.sqrt(12), 1 / math.sqrt(5)]
    )


def test_get_param_scalings_custom_model_of_linears(key):
    """Works for models that are not the make_mlp layout (bare Linear layers)."""
    k1, k2, k3 = jr.split(key, 3)
    model = [
        eqx.nn.Linear(4, 8, key=k1),
        eqx.nn.Linear(8, 8, key=k2),
        eqx.nn.Linear(8, 2, key=k3),
    ]
    got = jpc.get_param_scalings(model, jnp.ones((3, 4)), param_type="mupc")
    np.testing.assert_allclose(
        np.asarray(got, float), [0.5, 1 / math.sqrt(8), 1 / 8], rtol=1e-12
    )


@pytest.mark.parametrize("param_type", ["mupc", "ntp"])
def test_get_param_scalings_output_layer_without_weight(key, param_type):
    """SPEC §3.3 asks only the first and hidden layers to expose a weight: a plain
    function as the last layer gets N from the hidden width (z_{L-1})."""
    k1, k2, k3 = jr.split(key, 3)
    w_out = jr.normal(k3, (2, 8))
    model = [
        eqx.nn.Linear(4, 8, key=k1),
        eqx.nn.Linear(8, 8, key=k2),
        lambda z: w_out @ z,
    ]
    got = jpc.get_param_scalings(model, jnp.ones((3, 4)), param_type=param_type)
    want = ref_scalings(param_type, D=4, fan_ins=[4, 8, 8])
    np.testing.assert_allclose(np.asarray(got, float), want, rtol=1e-12)
    # same numbers as the equivalent model whose last layer holds the weight
    linear = eqx.tree_at(lambda m: m.weight, eqx.nn.Linear(8, 2, key=k3), w_out)
    same = jpc.get_param_scalings(
        [*model[:2], linear], jnp.ones((3, 4)), param_type=param_type
    )
    np.testing.assert_allclose(np.asarray(got, float), np.asarray(same, float))


def test_private_alias_get_param_scalings(key):
    model = jpc.make_mlp(key, 4, 6, 3, 2, "tanh")
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(
        np.asarray(jpc._get_param_scalings(model, x, param_type="ntp"), float),
        np.asarray(jpc.get_param_scalings(model, x, param_type="ntp"), float),
    )


# ------------------------------------------------------------------ activities


@pytest.mark.parametrize(
    "param_type,skip,gamma",
    [("sp", False, None), ("sp", True, None), ("mupc", True, 2.0), ("ntp", False, 0.5)],
)
@pytest.mark.slow
def test_init_activities_with_ffwd(key, param_type, skip, gamma):
    p = random_problem(
        key, [5, 7, 7, 7, 3], 4, skip=skip, param_type=param_type, gamma=gamma
    )
    got = jpc.init_activities_with_ffwd(
        p.model, p.x, skip_model=p.skip_model, param_type=param_type, gamma=gamma
    )
    assert_trees_close(list(got), p.ffwd(), rtol=1e-10, check_structure=False)
    assert len(got) == p.L


@pytest.mark.slow
def test_ntp_ffwd_scales_weights_once(key):
    """§11.6: with N(0,1) weights, z_1 = W_1 x / sqrt(D) exactly (no second scaling)."""
    D, N = 16, 25
    model = jpc.make_mlp(key, D, N, 3, 4, "linear", param_type="ntp")
    x = jr.normal(jr.PRNGKey(1), (3, D))
    zs = jpc.init_activities_with_ffwd(model, x, param_type="ntp")
    W1, W2, W3 = (blk.layers[1].weight for blk in model)
    z1 = x @ W1.T / 4.0
    z2 = z1 @ W2.T / 5.0
    z3 = z2 @ W3.T / 5.0
    assert_trees_close(list(zs), [z1, z2, z3], check_structure=False)


def test_init_activities_with_ffwd_matches_manual_mlp(key):
    """Fully hand-written forward pass of the make_mlp layout (no module calls)."""
    model = jpc.make_mlp(key, 3, 4, 3, 2, "tanh", use_bias=True)
    x = jr.normal(jr.PRNGKey(2), (5, 3))
    z = x
    want = []
    for k, blk in enumerate(model):
        W, b = blk.layers[1].weight, blk.layers[1].bias
        h = z if k == 0 else jnp.tanh(z)
        z = h @ W.T + b
        want.append(z)
    got = jpc.init_activities_with_ffwd(model, x)
    assert_trees_close(list(got), want, check_structure=False)
    assert_trees_close(ref_forward(model, x), want, check_structure=False)


def test_init_activities_from_normal_numpy_batch_size(key):
    """A NumPy integer batch size (e.g. from `x.shape` of a NumPy array) works."""
    sizes = [5, 7, 3]
    got = jpc.init_activities_from_normal(key, sizes, "supervised", np.int64(4))
    want = jpc.init_activities_from_normal(key, sizes, "supervised", 4)
    assert_trees_close(got, want, rtol=0)


@pytest.mark.parametrize(
    "mode, shapes",
    [
        ("supervised", [(100, 300), (100, 400), (100, 200)]),
        ("unsupervised", [(100, 50), (100, 300), (100, 400), (100, 200)]),
    ],
)
@pytest.mark.slow
def test_init_activities_from_normal_modes(key, mode, shapes):
    """Supervised draws z_1..z_L, unsupervised also z_0; every entry is sigma times
    an N(0, 1) draw (checked by its moments and by rescaling sigma)."""
    sizes = [50, 300, 400, 200]
    a = jpc.init_activities_from_normal(key, sizes, mode, 100, sigma=0.05)
    b = jpc.init_activities_from_normal(key, sizes, mode, 100, sigma=0.2)
    assert [z.shape for z in a] == shapes
    for z in a:
        assert abs(float(jnp.mean(z))) < 0.003
        assert abs(float(jnp.std(z)) - 0.05) < 0.003
    assert_trees_close(list(b), [4.0 * z for z in a], rtol=1e-12, check_structure=False)


def test_init_activities_from_normal_statistics_and_sigma(key):
    sizes = [300, 400]
    a = jpc.init_activities_from_normal(key, sizes, "unsupervised", 200, sigma=0.05)
    b = jpc.init_activities_from_normal(key, sizes, "unsupervised", 200, sigma=0.2)
    for z in a:
        assert abs(float(jnp.mean(z))) < 0.002
        assert abs(float(jnp.std(z)) - 0.05) < 0.002
    # same key: the draws are N(0,1) samples times sigma
    assert_trees_close(list(b), [4.0 * z for z in a], rtol=1e-12, check_structure=False)
    c = jpc.init_activities_from_normal(key, sizes, "unsupervised", 200, sigma=0.05)
    assert_trees_close(list(a), list(c), rtol=0, check_structure=False)
    d = jpc.init_activities_from_normal(
        jr.PRNGKey(9), sizes, "unsupervised", 200, sigma=0.05
    )
    assert not np.allclose(a[0], d[0])


def test_init_activities_from_normal_array_sigma(key):
    """sigma may be a JAX array (SPEC §2)."""
    a = jpc.init_activities_from_normal(key, [3, 4], "unsupervised", 2, sigma=0.1)
    b = jpc.init_activities_from_normal(
        key, [3, 4], "unsupervised", 2, sigma=jnp.asarray(0.1)
    )
    assert_trees_close(list(a), list(b), rtol=1e-12, check_structure=False)
