"""Per-layer learning diagnostics: `compute_layer_learning`, the `layer_learning`
metric of `make_pc_step`, the round-off status and the one-time warning."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import backprop_grads, random_problem

import jpc
from jpc import _layer_learning as ll


T, LR = 12, 0.3  # inference steps; per-example activity step (activity_lr = LR·B)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the one-time warning as if the process had just started."""
    ll._warned.clear()
    yield
    ll._warned.clear()


def _hand_inference(p, n_steps, step):
    """Gradient descent on the reference energy, from the feedforward state."""
    acts = p.ffwd()
    grad = jax.jit(jax.grad(lambda a: p.ref(a)))
    for _ in range(n_steps):
        g = grad(acts)
        acts = [z - step * dz for z, dz in zip(acts[:-1], g[:-1])] + [acts[-1]]
    return acts


def _flat(layer):
    leaves = jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array))
    return np.concatenate([np.ravel(a) for a in leaves])


@pytest.mark.slow
def test_ratio_cosine_and_round_off_against_hand_computation(key):
    p = random_problem(key, [3, 5, 5, 2], 6, act_fn="tanh")
    out = jpc.compute_layer_learning(
        p.model,
        p.x,
        p.y,
        activity_optim=optax.sgd(1.0),
        activity_lr=LR * p.B,
        n_inference_steps=T,
    )
    acts = _hand_inference(p, T, LR * p.B)
    pc = eqx.filter_grad(lambda m: p.ref(acts, model=m))(p.model)
    bp = backprop_grads(p)
    inputs = [p.x, *acts[:-1]]
    for i in range(p.L):
        g, b = _flat(pc[i]), _flat(bp[i])
        np.testing.assert_allclose(out["pc_norm"][i], np.linalg.norm(g), rtol=1e-10)
        np.testing.assert_allclose(out["bp_norm"][i], np.linalg.norm(b), rtol=1e-10)
        ratio = np.linalg.norm(g) / np.linalg.norm(b)
        np.testing.assert_allclose(out["ratio"][i], ratio, rtol=1e-10)
        cos = g @ b / (np.linalg.norm(g) * np.linalg.norm(b))
        np.testing.assert_allclose(out["cosine"][i], cos, rtol=1e-10)
        # Round-off floor: eps·‖(1/B) Σ_i |μ_i| φ(z_{l-1,i})ᵀ‖ for f(z) = W φ(z).
        h = inputs[i] if i == 0 else jnp.tanh(inputs[i])
        mu = h @ p.model[i].layers[1].weight.T
        floor = np.finfo(np.float64).eps * np.linalg.norm(np.abs(mu).T @ h / p.B)
        np.testing.assert_allclose(out["round_off"][i], floor, rtol=1e-10)
    np.testing.assert_array_equal(out["layer"], np.arange(p.L))
    np.testing.assert_array_equal(out["status"], ll.LIVE)


def _layer_column(values):
    return [jnp.asarray(v, jnp.float32) for v in values]


def test_status_of_constructed_gradients():
    """Exact zero, at the round-off floor, and live; ratio and cosine raw."""
    eps = float(jnp.finfo(jnp.float32).eps)
    probe = _layer_column([np.ones(4)] * 3)  # floor: eps·‖1‖ = 2 eps
    pc = _layer_column([np.zeros(4), np.full(4, eps), -2 * np.ones(4)])
    bp = _layer_column([np.ones(4)] * 3)
    out = ll._per_layer(pc, bp, probe)
    np.testing.assert_array_equal(out["status"], [ll.ZERO, ll.ROUND_OFF, ll.LIVE])
    np.testing.assert_allclose(out["round_off"], [2 * eps] * 3, rtol=1e-6)
    np.testing.assert_allclose(out["ratio"], [0.0, eps, 2.0], rtol=1e-6)
    np.testing.assert_allclose(out["cosine"][1:], [1.0, -1.0], rtol=1e-6)
    assert np.isnan(out["cosine"][0])
    # Just above the floor is live; a 1e20-scaled backprop gradient (squares
    # overflow float32) changes the ratio by exactly 1e-20, not to 0.
    above = _layer_column([np.full(4, 1.01 * eps)])
    assert ll._per_layer(above, bp[:1], probe[:1])["status"][0] == ll.LIVE
    huge = ll._per_layer(pc[2:], [bp[2] * 1e20], probe[2:])
    np.testing.assert_allclose(huge["ratio"], [2e-20], rtol=1e-6)
    np.testing.assert_allclose(huge["cosine"], [-1.0], rtol=1e-6)


def test_layers_without_parameters_are_skipped():
    pc = [jnp.ones(2), None, jnp.ones(3)]
    out = ll._per_layer(pc, pc, pc)
    np.testing.assert_array_equal(out["layer"], [0, 2])


def test_inert_layers_rule():
    live = np.full(4, ll.LIVE)
    ratios = np.array([1e-7, 0.5, 2e-7, 0.2])
    # below 1e-6 × the output layer's ratio (0.2): only the first
    np.testing.assert_array_equal(ll.inert_layers(live, ratios), [True, False, False])
    status = np.array([ll.ZERO, ll.ROUND_OFF, ll.LIVE, ll.LIVE])
    np.testing.assert_array_equal(
        ll.inert_layers(status, np.ones(4)), [True, True, False]
    )
    dead_top = np.array([ll.ZERO, ll.ZERO])  # nothing to compare against
    assert not ll.inert_layers(dead_top, np.zeros(2)).any()


def test_format_layer_learning_table():
    eps = float(jnp.finfo(jnp.float32).eps)
    out = ll._per_layer(
        _layer_column([np.zeros(4), np.full(4, eps), np.ones(4)]),
        _layer_column([np.ones(4)] * 3),
        _layer_column([np.ones(4)] * 3),
    )
    lines = jpc.format_layer_learning(out).splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "layer"
    assert [line.split()[-1] for line in lines[1:]] == ["zero", "round-off", "live"]
    assert float(lines[3].split()[3]) == pytest.approx(1.0)  # the ratio column
    stacked = {k: np.stack([v, v]) for k, v in out.items()}
    with pytest.raises(ValueError, match="one value per layer"):
        jpc.format_layer_learning(stacked)


@pytest.mark.slow
def test_make_pc_step_metric_equals_standalone_call(key):
    p = random_problem(key, [3, 4, 4, 2], 5, act_fn="tanh", skip=True)
    optim = optax.sgd(0.1)
    opt_state = optim.init((eqx.filter(p.model, eqx.is_array), p.skip_model))
    options = dict(
        skip_model=p.skip_model,
        param_type="mupc",
        activity_optim=optax.sgd(1.0),
        activity_lr=LR * p.B,
        n_inference_steps=T,
        output_energy_scaling=0.5,
        hidden_energy_scaling=2.0,
    )
    step = jpc.make_pc_step(
        p.model, optim, opt_state, p.y, input=p.x, layer_learning=True, **options
    )
    alone = jpc.compute_layer_learning(p.model, p.x, p.y, **options)
    for name in jpc.LayerLearning.__annotations__:
        np.testing.assert_allclose(
            step["layer_learning"][name], alone[name], rtol=1e-10, err_msg=name
        )
    off = jpc.make_pc_step(p.model, optim, opt_state, p.y, input=p.x, **options)
    assert "layer_learning" not in off  # the compatible keys only


@pytest.mark.slow
def test_standalone_call_cosine_equals_compare_to_backprop(key):
    """A second code path on the ODE default: `compare_to_backprop`'s PC entry."""
    p = random_problem(key, [3, 4, 2], 4, act_fn="tanh")
    out = jpc.compute_layer_learning(p.model, p.x, p.y, max_t1=5.0)
    cmp = jpc.compare_to_backprop(p.model, p.x, p.y, key=key, n_samples=2, max_t1=5.0)
    np.testing.assert_allclose(
        out["cosine"], cmp["pc_equilibrium"]["per_layer"], rtol=1e-10
    )


def _deep_mupc(depth=8, batch=64):
    model = jpc.make_mlp(jr.PRNGKey(0), 20, 32, depth, 4, "relu", param_type="mupc")
    x = jr.normal(jr.PRNGKey(1), (batch, 20), jnp.float32)
    labels = jr.randint(jr.PRNGKey(2), (batch,), 0, 4)
    y = jax.nn.one_hot(labels, 4, dtype=jnp.float32)
    model = jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_array(a) else a, model
    )
    return model, jpc.make_skip_model(depth), x, y


def _inert(warning):
    return "do not learn" in str(warning.message)


@pytest.mark.slow
def test_warning_fires_once_for_inert_deep_mupc_network():
    """The μPC notebook's settings (`optax.sgd(0.5)` on the activities, T = depth,
    batch 64) leave the lower layers of a deep residual network with zero or
    round-off gradients: one warning naming the fixes, however many steps."""
    model, skip, x, y = _deep_mupc()
    optim = optax.adam(1e-3)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), skip))
    options = dict(
        input=x,
        skip_model=skip,
        param_type="mupc",
        activity_optim=optax.sgd(0.5),
        n_inference_steps=len(model),
        layer_learning=True,
    )
    with pytest.warns(UserWarning, match="do not learn") as record:
        for _ in range(2):
            out = jpc.make_pc_step(model, optim, opt_state, y, **options)
            model, opt_state = out["model"], out["opt_state"]
    inert = [w for w in record if _inert(w)]
    assert len(inert) == 1
    message = str(inert[0].message)
    for fix in ("jpc.per_example", "n_inference_steps", "hidden_energy_scaling", "ePC"):
        assert fix.lower() in message.lower()
    assert out["layer_learning"]["status"][0] != ll.LIVE
    # ... and the same network with a per-example step: every layer live, no warning.
    ll._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        healthy = jpc.compute_layer_learning(
            model,
            x,
            y,
            skip_model=skip,
            param_type="mupc",
            activity_optim=jpc.per_example(optax.sgd(0.5)),
            n_inference_steps=len(model),
        )
    assert not [w for w in caught if _inert(w)]
    np.testing.assert_array_equal(healthy["status"], ll.LIVE)


@pytest.mark.slow
def test_no_warning_for_healthy_shallow_network(key, recwarn):
    p = random_problem(key, [3, 5, 5, 2], 6, act_fn="tanh")
    out = jpc.compute_layer_learning(
        p.model,
        p.x,
        p.y,
        activity_optim=optax.sgd(1.0),
        activity_lr=LR * p.B,
        n_inference_steps=T,
    )
    assert not [w for w in recwarn if _inert(w)]
    assert np.all(out["ratio"] > 1e-3)


def test_needs_an_input(key):
    p = random_problem(key, [3, 4, 2], 4)
    with pytest.raises(ValueError, match="needs an input: pass `x`"):
        jpc.compute_layer_learning(p.model, None, p.y)
    optim = optax.sgd(0.1)
    opt_state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    with pytest.raises(ValueError, match="needs an input: pass `input`"):
        jpc.make_pc_step(
            p.model,
            optim,
            opt_state,
            p.y,
            key=key,
            layer_sizes=[3, 4, 2],
            batch_size=4,
            activity_optim=optax.sgd(0.1),
            n_inference_steps=2,
            layer_learning=True,
        )


def test_feedforward_state_ratio_is_output_precision(key):
    """At the feedforward state (a zero activity step) only the output layer's
    PC gradient is non-zero, exactly λ times backprop's."""
    p = random_problem(key, [3, 4, 4, 2], 5, act_fn="tanh")
    with pytest.warns(UserWarning, match="do not learn"):  # inert by construction
        out = jpc.compute_layer_learning(
            p.model,
            p.x,
            p.y,
            activity_optim=optax.sgd(0.0),
            n_inference_steps=1,
            output_energy_scaling=0.25,
        )
    np.testing.assert_array_equal(out["status"][:-1], ll.ZERO)
    np.testing.assert_allclose(out["ratio"][-1], 0.25, rtol=1e-10)
    np.testing.assert_allclose(out["cosine"][-1], 1.0, rtol=1e-10)


@pytest.mark.slow
def test_weight_regularisers_are_left_out_of_the_comparison(key):
    """With weight decay and a spectral penalty the PC update carries their
    gradient, which backprop's lacks: the comparison leaves it out, so at the
    feedforward state the lower layers are still exactly zero and the output
    layer's ratio is still λ."""
    p = random_problem(key, [3, 4, 4, 2], 5, act_fn="tanh")
    with pytest.warns(UserWarning, match="do not learn"):
        out = jpc.compute_layer_learning(
            p.model,
            p.x,
            p.y,
            activity_optim=optax.sgd(0.0),
            n_inference_steps=1,
            weight_decay=0.3,
            spectral_penalty=0.1,
        )
    np.testing.assert_array_equal(out["status"][:-1], ll.ZERO)
    np.testing.assert_allclose(out["ratio"][-1], 1.0, rtol=1e-10)
    np.testing.assert_allclose(out["cosine"][-1], 1.0, rtol=1e-10)
