"""Bregman PC: the matching-loss divergence, energy, residuals, gradients, updates.

References are written here from the formulas (Helmbold, Kivinen & Warmuth 1999):
Φ = log cosh / softplus with Φ' = φ, Φ* its convex conjugate, D(z, a) = Φ(a) − z a +
Φ*(z), and the layered energy with explicit loops over `eqx.nn.Linear` weights.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import count_compiles
from jax.flatten_util import ravel_pytree

import jpc


ACT_FNS = ["tanh", "sigmoid"]
SIZES = (4, 6, 5, 3)  # d_in, hidden, hidden, d_out
BATCH = 5


# Jitted entry points: one compilation per call site instead of one per eager op.
energy_fn = eqx.filter_jit(jpc.bregman_pc_energy_fn)
activity_grad = eqx.filter_jit(jpc.compute_bregman_pc_activity_grad)
param_grads = eqx.filter_jit(jpc.compute_bregman_pc_param_grads)
init_states = eqx.filter_jit(jpc.init_bregman_pc_activities)
divergence = eqx.filter_jit(jpc.bregman_from_preact)
pc_energy_fn = eqx.filter_jit(jpc.pc_energy_fn)
pc_activity_grad = eqx.filter_jit(jpc.compute_pc_activity_grad)


# ---------------------------------------------------------------- references


def ref_phi(act_fn, a):
    return jnp.tanh(a) if act_fn == "tanh" else 1 / (1 + jnp.exp(-a))


def ref_potential(act_fn, a):
    return jnp.log(jnp.cosh(a)) if act_fn == "tanh" else jnp.log1p(jnp.exp(a))


def ref_conjugate(act_fn, z):
    if act_fn == "tanh":
        return z * jnp.arctanh(z) + 0.5 * jnp.log(1 - z**2)
    return z * jnp.log(z) + (1 - z) * jnp.log(1 - z)


def ref_divergence(act_fn, z, a):
    return ref_potential(act_fn, a) - z * a + ref_conjugate(act_fn, z)


def ref_layer_terms(model, us, y, x, act_fn, loss="mse", scalings=None):
    """`[E_1, ..., E_L]` by explicit loops (primal form of D, float64)."""
    scalings = scalings or [1.0] * len(model)
    batch = x.shape[0]
    z, terms = x, []
    for i, layer in enumerate(model):
        a = scalings[i] * (z @ layer.weight.T + layer.bias)
        if i < len(model) - 1 or y is None:
            terms.append(jnp.sum(ref_divergence(act_fn, ref_phi(act_fn, us[i]), a)))
        elif loss == "mse":
            terms.append(0.5 * jnp.sum((y - a) ** 2))
        elif loss == "ce":
            terms.append(-jnp.sum(y * (a - jnp.log(jnp.sum(jnp.exp(a), -1))[:, None])))
        else:
            terms.append(jnp.sum(ref_divergence(act_fn, y, a)))
        z = ref_phi(act_fn, us[i])
    return [t / batch for t in terms]


ref_terms = eqx.filter_jit(ref_layer_terms)


def make_problem(key, act_fn="tanh", sizes=SIZES, batch=BATCH, noise=0.3):
    keys = jr.split(key, len(sizes) + 2)
    model = [
        eqx.nn.Linear(sizes[i], sizes[i + 1], key=keys[i])
        for i in range(len(sizes) - 1)
    ]
    x = jr.normal(keys[-2], (batch, sizes[0]))
    labels = jnp.arange(batch) % sizes[-1]
    y = jax.nn.one_hot(labels, sizes[-1])
    if act_fn == "tanh":
        y_range = 0.8 * y - 0.4  # inside (−1, 1) for the "bregman" loss
    else:
        y_range = 0.8 * y + 0.1
    ffwd = init_states(model, x, act_fn)
    us = [
        u + noise * jr.normal(k, u.shape)
        for u, k in zip(ffwd, jr.split(keys[-1], len(ffwd)))
    ]
    return dict(model=model, x=x, y=y, y_range=y_range, us=us, ffwd=ffwd)


def target(pb, loss):
    return pb["y_range"] if loss == "bregman" else pb["y"]


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_phi_matches_formula(act_fn):
    a = jnp.linspace(-6.0, 6.0, 41)
    np.testing.assert_allclose(
        jpc.bregman_phi(act_fn, a), ref_phi(act_fn, a), rtol=1e-12
    )


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_divergence_properties(act_fn, key):
    k1, k2 = jr.split(key)
    a = jr.uniform(k1, (200,), minval=-3.0, maxval=3.0)
    low = -1.0 if act_fn == "tanh" else 0.0
    z = jr.uniform(k2, (200,), minval=low + 1e-3, maxval=1 - 1e-3)
    d = divergence(act_fn, z, a)
    np.testing.assert_allclose(d, ref_divergence(act_fn, z, a), rtol=1e-10)
    # D >= 0, with equality only at z = φ(a): strictly positive away from it.
    assert jnp.all(d > 0)
    at_min = divergence(act_fn, ref_phi(act_fn, a), a)
    np.testing.assert_allclose(at_min, 0.0, atol=1e-13)
    # Quadratic growth away from the minimum: D ≈ ½ (φ⁻¹(z) − a)² φ'(a) for small
    # moves, so D > 0 for any z ≠ φ(a).
    u = a + 1e-3
    near = divergence(act_fn, ref_phi(act_fn, u), a)
    dphi = jax.vmap(jax.grad(lambda t: ref_phi(act_fn, t)))(a)
    np.testing.assert_allclose(near, 0.5 * 1e-6 * dphi, rtol=5e-3)

    # ∂D/∂a = φ(a) − z and ∂D/∂z = φ⁻¹(z) − a.
    def elementwise(zi, ai):
        return jpc.bregman_from_preact(act_fn, zi, ai)

    grad_a = jax.jit(jax.vmap(jax.grad(elementwise, 1)))
    np.testing.assert_allclose(grad_a(z, a), ref_phi(act_fn, a) - z, rtol=1e-10)
    grad_z = jax.jit(jax.vmap(jax.grad(elementwise)))
    inverse = jnp.arctanh(z) if act_fn == "tanh" else jnp.log(z / (1 - z))
    np.testing.assert_allclose(grad_z(z, a), inverse - a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_divergence_at_range_edges(act_fn):
    """Targets on the edges of φ's range are clipped inside: the closed-form limits."""
    a = jnp.linspace(-5.0, 5.0, 11)
    if act_fn == "tanh":
        # D(±1, a) = log cosh a ∓ a + log 2 = softplus(∓2a).
        edges = {1.0: jax.nn.softplus(-2 * a), -1.0: jax.nn.softplus(2 * a)}
    else:
        edges = {1.0: jax.nn.softplus(-a), 0.0: jax.nn.softplus(a)}
    for z, expected in edges.items():
        d = divergence(act_fn, jnp.full_like(a, z), a)
        np.testing.assert_allclose(d, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_float32_stability_at_large_preactivations(act_fn):
    a = jnp.asarray([-100.0, -30.0, 30.0, 100.0], jnp.float32)
    low = -1.0 if act_fn == "tanh" else 0.0
    grad_a = jax.jit(
        jax.vmap(jax.grad(lambda z, a: jpc.bregman_from_preact(act_fn, z, a), 1))
    )
    for z in (jnp.full_like(a, low), jnp.full_like(a, 1.0), jpc.bregman_phi(act_fn, a)):
        d = divergence(act_fn, z, a)
        assert d.dtype == jnp.float32
        assert jnp.all(jnp.isfinite(d))
        g = grad_a(z, a)
        np.testing.assert_allclose(g, jpc.bregman_phi(act_fn, a) - z, atol=1e-6)
    # Against the closed form in float64 (the float32 error is a few ulps of |a|).
    up = divergence(act_fn, jnp.ones_like(a), a)
    expected = (
        jax.nn.softplus(-2 * a.astype(jnp.float64))
        if act_fn == "tanh"
        else jax.nn.softplus(-a.astype(jnp.float64))
    )
    np.testing.assert_allclose(up, expected, rtol=1e-6, atol=8 * 1.2e-7 * 100)
    # D(c, 30) = Φ(30) − 30 c + Φ*(c) at the centre c of the range.
    if act_fn == "tanh":  # log cosh 30 = 30 − log 2 (+ 1e-26), Φ*(0) = 0
        centre, expected = 0.0, 30 - math.log(2)
    else:  # softplus(30) = 30 (+ 1e-13), Φ*(½) = −log 2
        centre, expected = 0.5, 30 - 15 - math.log(2)
    d = divergence(act_fn, jnp.float32(centre), jnp.float32(30.0))
    np.testing.assert_allclose(d, expected, rtol=1e-6)


# ---------------------------------------------------------------- energy


@pytest.mark.parametrize("act_fn", ACT_FNS)
@pytest.mark.parametrize("loss", ["mse", "ce", "bregman"])
def test_energy_matches_formula(act_fn, loss, key):
    pb = make_problem(key, act_fn)
    y = target(pb, loss)
    params = (pb["model"], None)
    energy = energy_fn(params, pb["us"], y, x=pb["x"], act_fn=act_fn, loss=loss)
    terms = ref_terms(pb["model"], pb["us"], y, pb["x"], act_fn, loss)
    np.testing.assert_allclose(energy, sum(terms), rtol=1e-10)
    layers = energy_fn(
        params, pb["us"], y, x=pb["x"], act_fn=act_fn, loss=loss, record_layers=True
    )
    np.testing.assert_allclose(layers, [terms[2], terms[1], terms[0]], rtol=1e-10)


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_energy_with_free_output(act_fn, key):
    pb = make_problem(key, act_fn)
    energy = energy_fn(
        (pb["model"], None), pb["us"], None, x=pb["x"], act_fn=act_fn, loss="ce"
    )
    terms = ref_terms(pb["model"], pb["us"], None, pb["x"], act_fn)
    np.testing.assert_allclose(energy, sum(terms), rtol=1e-10)


@pytest.mark.parametrize("param_type", ["mupc", "ntp"])
def test_energy_with_param_scalings(param_type, key):
    pb = make_problem(key)
    gamma = 1.7
    d, n = SIZES[0], SIZES[1]
    a_out = 1 / SIZES[2] if param_type == "mupc" else 1 / math.sqrt(SIZES[2])
    scalings = [1 / math.sqrt(d), 1 / math.sqrt(n), a_out / gamma]
    kwargs = dict(param_type=param_type, gamma=gamma)
    us = init_states(pb["model"], pb["x"], "tanh", **kwargs)[:-1]
    us = [*[u + 0.1 for u in us], pb["us"][-1]]
    energy = energy_fn((pb["model"], None), us, pb["y"], x=pb["x"], **kwargs)
    terms = ref_terms(pb["model"], us, pb["y"], pb["x"], "tanh", "mse", scalings)
    np.testing.assert_allclose(energy, sum(terms), rtol=1e-10)


@pytest.mark.parametrize("act_fn", ACT_FNS)
@pytest.mark.parametrize("param_type", ["sp", "mupc"])
def test_zero_energy_at_feedforward_states(act_fn, param_type, key):
    pb = make_problem(key, act_fn)
    params = (pb["model"], None)
    kwargs = dict(act_fn=act_fn, param_type=param_type)
    us = jpc.init_bregman_pc_activities(pb["model"], pb["x"], **kwargs)
    # The states are the feedforward pre-activations, by hand.
    z = pb["x"]
    for u, layer, s in zip(
        us,
        pb["model"],
        jpc.get_param_scalings(pb["model"], pb["x"], param_type=param_type),
    ):
        np.testing.assert_allclose(u, s * (z @ layer.weight.T + layer.bias), rtol=1e-12)
        z = ref_phi(act_fn, u)
    assert float(jpc.bregman_pc_energy_fn(params, us, None, x=pb["x"], **kwargs)) == 0
    layers = jpc.bregman_pc_energy_fn(
        params, us, pb["y"], x=pb["x"], record_layers=True, **kwargs
    )
    assert np.all(np.asarray(layers[1:]) == 0)  # every hidden term, bitwise
    assert float(layers[0]) > 0
    _, res = jpc.compute_bregman_pc_activity_grad(params, us, None, x=pb["x"], **kwargs)
    assert all(np.all(np.asarray(e) == 0) for e in res)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("act_fn", ACT_FNS)
@pytest.mark.parametrize("y_given", [True, False])
def test_residuals_equal_scaled_activity_gradient(act_fn, y_given, key):
    pb = make_problem(key, act_fn)
    params, y = (pb["model"], None), (pb["y"] if y_given else None)

    def energy(us):
        return energy_fn(params, us, y, x=pb["x"], act_fn=act_fn)

    value, residuals = activity_grad(params, pb["us"], y, x=pb["x"], act_fn=act_fn)
    np.testing.assert_allclose(value, energy(pb["us"]), rtol=1e-12)
    grads = jax.jit(jax.grad(energy))(pb["us"])
    for e, g, u in zip(residuals, grads, pb["us"]):
        dphi = jax.vmap(jax.vmap(jax.grad(lambda t: ref_phi(act_fn, t))))(u)
        np.testing.assert_allclose(e, BATCH * g / dphi, rtol=1e-9, atol=1e-12)
    if y_given:
        assert np.all(np.asarray(residuals[-1]) == 0)
    else:
        assert float(jnp.max(jnp.abs(residuals[-1]))) > 1e-3


@pytest.mark.parametrize("act_fn", ACT_FNS)
@pytest.mark.parametrize("loss", ["mse", "ce", "bregman"])
def test_param_grads_autodiff_and_finite_differences(act_fn, loss, key):
    pb = make_problem(key, act_fn)
    y, x, us = target(pb, loss), pb["x"], pb["us"]
    kwargs = dict(x=x, act_fn=act_fn, loss=loss)
    model_grads, skip_grads = param_grads((pb["model"], None), us, y, **kwargs)
    assert skip_grads is None
    auto = eqx.filter_grad(lambda p: energy_fn(p, us, y, **kwargs))(
        (pb["model"], None)
    )[0]
    flat, unravel = ravel_pytree(eqx.filter(pb["model"], eqx.is_array))
    flat_auto, _ = ravel_pytree(eqx.filter(auto, eqx.is_array))
    flat_grads, _ = ravel_pytree(eqx.filter(model_grads, eqx.is_array))
    np.testing.assert_allclose(flat_grads, flat_auto, rtol=1e-12)

    static = eqx.filter(pb["model"], eqx.is_array, inverse=True)

    @jax.jit
    def energy_of(theta):
        model = eqx.combine(unravel(theta), static)
        terms = ref_layer_terms(model, us, y, x, act_fn, loss)
        return sum(terms)

    eps = 1e-6
    basis = jnp.eye(flat.size) * eps
    fd = jax.vmap(lambda d: (energy_of(flat + d) - energy_of(flat - d)) / (2 * eps))(
        basis
    )
    np.testing.assert_allclose(flat_grads, fd, rtol=1e-6, atol=1e-9)


def test_weight_gradient_has_no_derivative_of_phi(key):
    """∂F/∂W_l = (φ(a_l) − φ(u_l))ᵀ z_{l−1} / B for a hidden layer."""
    pb = make_problem(key)
    model, x, us = pb["model"], pb["x"], pb["us"]
    grads, _ = param_grads((model, None), us, pb["y"], x=x)
    z0, z1 = x, jnp.tanh(us[0])
    a2 = z1 @ model[1].weight.T + model[1].bias
    delta = jnp.tanh(a2) - jnp.tanh(us[1])
    np.testing.assert_allclose(grads[1].weight, delta.T @ z1 / BATCH, rtol=1e-10)
    a1 = z0 @ model[0].weight.T + model[0].bias
    delta = jnp.tanh(a1) - jnp.tanh(us[0])
    np.testing.assert_allclose(grads[0].bias, delta.sum(0) / BATCH, rtol=1e-10)


# ---------------------------------------------------------------- updates


@pytest.mark.parametrize("act_fn", ACT_FNS)
def test_activity_updates_decrease_energy(act_fn, key):
    pb = make_problem(key, act_fn, noise=1.0)
    params, lr = (pb["model"], None), 0.5 * BATCH
    optim = optax.sgd(lr)
    us, state = pb["us"], optim.init(pb["us"])
    _, residuals = activity_grad(params, us, pb["y"], x=pb["x"], act_fn=act_fn)
    energies = []
    for step in range(20):
        out = jpc.update_bregman_pc_activities(
            params, us, optim, state, pb["y"], input=pb["x"], act_fn=act_fn
        )
        if step == 0:  # one mirror-descent step: u ← u − lr · e / B
            for new, u, e, g in zip(out["activities"], us, residuals, out["grads"]):
                np.testing.assert_allclose(g, e / BATCH, rtol=1e-12)
                np.testing.assert_allclose(new, u - lr * e / BATCH, rtol=1e-12)
        energies.append(float(out["energy"]))
        us, state = out["activities"], out["opt_state"]
    assert all(b <= a for a, b in zip(energies, energies[1:]))
    assert energies[-1] < 0.5 * energies[0]


def test_param_update_lowers_energy(key):
    pb = make_problem(key)
    params = (pb["model"], None)
    optim = optax.sgd(0.1)
    state = optim.init((eqx.filter(pb["model"], eqx.is_array), None))
    out = jpc.update_bregman_pc_params(
        params, pb["us"], optim, state, pb["y"], input=pb["x"]
    )
    grads, _ = param_grads(params, pb["us"], pb["y"], x=pb["x"])
    np.testing.assert_allclose(
        out["model"][0].weight,
        pb["model"][0].weight - 0.1 * grads[0].weight,
        rtol=1e-12,
    )
    before = energy_fn(params, pb["us"], pb["y"], x=pb["x"])
    after = energy_fn((out["model"], out["skip_model"]), pb["us"], pb["y"], x=pb["x"])
    assert float(after) < float(before)
    assert set(out) == {"model", "skip_model", "grads", "opt_state"}


def test_gamma_is_traced(key):
    pb = make_problem(key)
    optim = optax.sgd(0.1)
    state = optim.init(pb["us"])

    def run(gamma):
        out = jpc.update_bregman_pc_activities(
            (pb["model"], None),
            pb["us"],
            optim,
            state,
            pb["y"],
            input=pb["x"],
            param_type="mupc",
            gamma=gamma,
        )
        return jax.block_until_ready(out["energy"])

    run(2.0)
    with count_compiles() as events:
        energy = run(3.0)
    assert events == []
    np.testing.assert_allclose(energy, run(jnp.asarray(3.0)), rtol=1e-12)


# ---------------------------------------------------------------- linear limit


def test_linear_limit_equals_standard_pc(key):
    r"""With tiny pre-activations, tanh ≈ identity and Bregman PC ≈ linear PC.

    Writing m for the largest |u|, |a| and |ā| (Bregman and linear predictions):
    D(tanh u, a) = ½ φ'(ξ)(a − u)² with 1 − m² ≤ φ'(ξ) ≤ 1, so it differs from
    ½(u − a)² by at most ½ m²(u − a)²; and |a − ā| = |W (tanh u' − u')| ≤
    Σ_j |W_kj| m³/3 elementwise, which changes ½(u − a)² by at most
    |a − ā|(|u − ā| + ½|a − ā|). Summing these bounds over every term gives the
    tolerance, which the test also checks is small against the energy itself.
    """
    k1, k2 = jr.split(key)
    pb = make_problem(k1, noise=0.0)
    model = [
        eqx.tree_at(lambda m: (m.weight, m.bias), m, (1e-3 * m.weight, 0 * m.bias))
        for m in pb["model"]
    ]
    x = pb["x"]
    ffwd = init_states(model, x, "tanh")
    keys = jr.split(k2, len(ffwd))
    us = [u + 1e-3 * jr.normal(k, u.shape) for u, k in zip(ffwd, keys)]
    y = 1e-3 * pb["y"]
    breg = energy_fn((model, None), us, y, x=x, act_fn="tanh")
    linear_pc = pc_energy_fn((model, None), us, y, x=x)

    bound, z_bregman, z_linear = 0.0, x, x
    for layer, u in zip(model, [*us[:-1], y]):
        w = jnp.abs(layer.weight)
        a = z_bregman @ layer.weight.T
        a_lin = z_linear @ layer.weight.T
        m = float(jnp.max(jnp.abs(jnp.concatenate([u, a, a_lin]))))
        m_in = float(jnp.max(jnp.abs(z_linear)))
        diff = (w.sum(1) * m_in**3 / 3) if layer is not model[0] else 0.0
        curve = 0.5 * m**2 * (u - a) ** 2 if layer is not model[-1] else 0.0
        bound += jnp.sum(curve + diff * (jnp.abs(u - a_lin) + 0.5 * diff)) / BATCH
        z_bregman, z_linear = jnp.tanh(u), u
    assert float(bound) < 1e-4 * float(linear_pc)  # the limit is a tight one
    assert abs(float(breg) - float(linear_pc)) <= float(bound)
    # The residuals are the standard PC activity gradients (times B) in the limit.
    _, res = activity_grad((model, None), us, y, x=x)
    _, grads = pc_activity_grad((model, None), us, y, x=x)
    for e, g in zip(res[:-1], grads[:-1]):
        scale = float(jnp.max(jnp.abs(e)))
        np.testing.assert_allclose(e, BATCH * g, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize(
    "loss",
    ["bregman", pytest.param("mse", marks=pytest.mark.slow), "ce"],
)
def test_saturated_states_float32_match_float64(loss, key):
    """Pre-activations of ±30 and more in float32: the energy, residuals and weight
    gradients equal the same computation in float64 to float32 precision."""
    pb = make_problem(key)
    model64 = jax.tree_util.tree_map(
        lambda t: 30.0 * t if eqx.is_array(t) else t, pb["model"]
    )
    us64 = [30.0 * jnp.sign(u) for u in pb["us"]]
    y64 = target(pb, loss)

    def f32(tree):
        return jax.tree_util.tree_map(
            lambda t: t.astype(jnp.float32) if eqx.is_array(t) else t, tree
        )

    results = {}
    for name, cast in (("64", lambda t: t), ("32", f32)):
        model, us, x, y = cast((model64, us64, pb["x"], y64))
        energy, res = activity_grad((model, None), us, y, x=x, loss=loss)
        grads, _ = param_grads((model, None), us, y, x=x, loss=loss)
        results[name] = (energy, res, eqx.filter(grads, eqx.is_array))
    assert results["32"][0].dtype == jnp.float32
    for lo, hi in zip(*(jax.tree_util.tree_leaves(results[k]) for k in ("32", "64"))):
        scale = float(jnp.max(jnp.abs(hi)))
        np.testing.assert_allclose(lo, hi, rtol=1e-5, atol=1e-5 * scale)


def test_zero_energy_at_saturated_feedforward_states_float32(key):
    pb = make_problem(key)
    model = jax.tree_util.tree_map(
        lambda t: (30.0 * t).astype(jnp.float32) if eqx.is_array(t) else t,
        pb["model"],
    )
    x = pb["x"].astype(jnp.float32)
    ffwd = jpc.init_bregman_pc_activities(model, x, "tanh")
    assert float(jnp.max(jnp.abs(ffwd[0]))) > 30
    assert float(jpc.bregman_pc_energy_fn((model, None), ffwd, None, x=x)) == 0


# ---------------------------------------------------------------- errors


def test_errors_raise(key):
    pb = make_problem(key)
    model, x, y, us = pb["model"], pb["x"], pb["y"], pb["us"]
    params = (model, None)
    with pytest.raises(
        ValueError, match=r"`act_fn` must be one of \('tanh', 'sigmoid'\), got 'relu'"
    ):
        jpc.bregman_phi("relu", x)
    with pytest.raises(ValueError, match="`act_fn` must be one of"):
        jpc.bregman_from_preact("linear", x, x)
    with pytest.raises(ValueError, match="`act_fn` must be one of"):
        jpc.init_bregman_pc_activities(model, x, "relu")
    with pytest.raises(ValueError, match="`act_fn` must be one of"):
        jpc.bregman_pc_energy_fn(params, us, y, x=x, act_fn="relu")
    with pytest.raises(
        ValueError, match=r"`loss` must be one of \('mse', 'ce', 'bregman'\), got 'mae'"
    ):
        jpc.bregman_pc_energy_fn(params, us, y, x=x, loss="mae")
    with pytest.raises(ValueError, match="`param_type` must be one of"):
        jpc.compute_bregman_pc_activity_grad(params, us, y, x=x, param_type="big")
    with pytest.raises(ValueError, match="`param_type` must be one of"):
        jpc.init_bregman_pc_activities(model, x, param_type="big")
    skips = [None, lambda z: z, None]
    with pytest.raises(
        ValueError, match="does not support skip connections: `skip_model`"
    ):
        jpc.compute_bregman_pc_param_grads((model, skips), us, y, x=x)
    with pytest.raises(ValueError, match="needs the input clamp `x`.*got `x=None`"):
        jpc.bregman_pc_energy_fn(params, us, y, x=None)
    with pytest.raises(TypeError, match="`params` must be the pair"):
        jpc.bregman_pc_energy_fn(model, us, y, x=x)
    with pytest.raises(ValueError, match="`activities` must have 3 entries"):
        jpc.bregman_pc_energy_fn(params, us[:-1], y, x=x)
    with pytest.raises(ValueError, match="`x` and `y` must have the same batch size"):
        jpc.bregman_pc_energy_fn(params, us, y, x=x[:-1])
    with pytest.raises(
        ValueError, match=r"`activities\[1\]` must have batch size 5 like `x`"
    ):
        jpc.bregman_pc_energy_fn(params, [us[0], us[1][:-1], us[2]], None, x=x)
    with pytest.raises(
        ValueError,
        match=r"`activities\[0\]` has shape \(5, 7\) but `model\[0\]` predicts",
    ):
        jpc.bregman_pc_energy_fn(params, [jnp.ones((5, 7)), *us[1:]], y, x=x)
    with pytest.raises(ValueError, match=r"`y` has shape \(5, 4\) but the prediction"):
        jpc.bregman_pc_energy_fn(params, us, jnp.ones((5, 4)), x=x)
    with pytest.raises(ValueError, match="could not be applied to `x`"):
        jpc.bregman_pc_energy_fn(params, us, y, x=jnp.ones((5, 9)))
    with pytest.raises(TypeError, match="`model` must be a list"):
        jpc.init_bregman_pc_activities(model[0], x)


def test_update_errors_name_their_arguments(key):
    pb = make_problem(key)
    model, x, y, us = pb["model"], pb["x"], pb["y"], pb["us"]
    params = (model, None)
    optim = optax.adam(0.1)
    act_state = optim.init(us)
    with pytest.raises(ValueError, match="needs the input clamp `input`"):
        jpc.update_bregman_pc_activities(params, us, optim, act_state, y, input=None)
    with pytest.raises(ValueError, match=r"`output` has shape \(5, 4\)"):
        jpc.update_bregman_pc_activities(
            params, us, optim, act_state, jnp.ones((5, 4)), input=x
        )
    with pytest.raises(ValueError, match="`input` and `output` must have the same"):
        jpc.update_bregman_pc_params(params, us, optim, act_state, y, input=x[:-1])
    with pytest.raises(ValueError, match="`opt_state` does not have the structure"):
        jpc.update_bregman_pc_params(params, us, optim, act_state, y, input=x)
    with pytest.raises(ValueError, match="`act_fn` must be one of"):
        jpc.update_bregman_pc_activities(
            params, us, optim, act_state, y, input=x, act_fn="relu"
        )
    with pytest.raises(TypeError, match="takes `loss=` instead"):
        jpc.compute_bregman_pc_activity_grad(params, us, y, x=x, loss_id="mse")


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_training_on_digits_raises_accuracy():
    """200 steps of Bregman PC on scikit-learn's digits: measured 0.03 -> 0.93."""
    (x_train, y_train), (x_test, y_test) = jpc.datasets.load_digits_data(0.2, seed=0)
    x_train, x_test = x_train.astype(np.float32), jnp.asarray(x_test, jnp.float32)
    y_train = jpc.datasets.one_hot(y_train, 10).astype(np.float32)
    model = jpc.make_mlp(jr.PRNGKey(0), 64, 64, 3, 10, "linear", use_bias=True)
    model = jax.tree_util.tree_map(
        lambda t: t.astype(jnp.float32) if eqx.is_array(t) else t, model
    )
    batch_size = 64
    optim, activity_optim = optax.adam(1e-3), optax.sgd(0.2 * batch_size)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        us = jpc.init_bregman_pc_activities(model, x, "tanh")

        def infer(carry, _):
            us, state = carry
            out = jpc.update_bregman_pc_activities(
                (model, None), us, activity_optim, state, y, input=x
            )
            return (out["activities"], out["opt_state"]), None

        init = (us, activity_optim.init(us))
        (us, _), _ = jax.lax.scan(infer, init, length=10)
        out = jpc.update_bregman_pc_params(
            (model, None), us, optim, opt_state, y, input=x
        )
        return out["model"], out["opt_state"]

    def accuracy(model):
        logits = jpc.init_bregman_pc_activities(model, x_test, "tanh")[-1]
        return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_test)))

    before = accuracy(model)
    batches = jpc.datasets.batches(x_train, y_train, batch_size, 0)
    for _ in range(200):
        model, opt_state = train_step(model, opt_state, *next(batches))
    after = accuracy(model)
    print(f"accuracy {before:.3f} -> {after:.3f}")
    assert before < 0.3
    assert after > 0.75
