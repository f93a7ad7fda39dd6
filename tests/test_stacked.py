"""Runs of identical hidden layers traced as one `jax.lax.scan` give the numbers of
the unrolled program: energies, gradients, the feedforward pass and whole training
steps (float64), and exact zeros for the hidden errors at the feedforward state
(float32)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc
from jpc import _stacked
from jpc._layers import feedforward, get_param_scalings, layer_predictions


DEPTH, WIDTH, D_IN, D_OUT, BATCH = 7, 8, 5, 3, 4
CASES = [(pt, skip) for pt in ("sp", "mupc") for skip in (False, True)]
# one case in the default run, the others slow
SOME_SLOW = [
    case if case == ("mupc", True) else pytest.param(*case, marks=pytest.mark.slow)
    for case in CASES
]


def problem(skip, depth=DEPTH, dtype=jnp.float64, key=jr.PRNGKey(0)):
    k_model, k_x, k_y = jr.split(key, 3)
    model = jpc.make_mlp(k_model, D_IN, WIDTH, depth, D_OUT, "tanh", use_bias=True)
    model = jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model
    )
    skip_model = jpc.make_skip_model(depth) if skip else None
    x = jr.normal(k_x, (BATCH, D_IN), dtype)
    y = jr.normal(k_y, (BATCH, D_OUT), dtype)
    return model, skip_model, x, y


@pytest.fixture(autouse=True)
def stacked(monkeypatch):
    monkeypatch.setattr(_stacked, "ENABLED", True)


@pytest.fixture
def unrolled(monkeypatch):
    """Call `fn()` with every layer unrolled, without the compiled programs (which
    were traced with the scan and are reused for the same shapes)."""

    def call(fn):
        with monkeypatch.context() as patch:
            patch.setattr(_stacked, "ENABLED", False)
            with jax.disable_jit():
                return fn()

    return call


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for u, v in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def test_runs_of_identical_layers():
    model, skips, _, _ = problem(skip=True, depth=8)
    scalings = get_param_scalings(model, None, skip_model=skips, param_type="mupc")
    assert _stacked.find_runs(model, skips, scalings) == {1: 7}
    # a hidden layer without its skip, or with another scaling, breaks the run
    skips[4] = None
    assert _stacked.find_runs(model, skips, scalings) == {}
    assert _stacked.find_runs(model, [None] * 8, [1.0] * 8) == {1: 7}
    assert _stacked.find_runs(model, [None] * 8, [1.0] * 6 + [2.0] * 2) == {1: 6}
    # two hidden layers are too few to scan
    short, short_skips, _, _ = problem(skip=True, depth=4)
    assert _stacked.find_runs(short, short_skips, [1.0] * 4) == {}


def test_unrolled_when_disabled(monkeypatch):
    model, skips, x, _ = problem(skip=True)
    scalings = [1.0] * DEPTH

    def primitives():
        jaxpr = jax.make_jaxpr(lambda x: feedforward(model, x, skips, scalings))(x)
        return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}

    assert "scan" in primitives()
    monkeypatch.setattr(_stacked, "ENABLED", False)
    assert "scan" not in primitives()


@pytest.mark.parametrize("param_type,skip", CASES)
def test_feedforward_and_predictions_equal_unrolled(param_type, skip, unrolled):
    model, skips, x, _ = problem(skip)
    scalings = get_param_scalings(model, x, skip_model=skips, param_type=param_type)
    names = [f"z{i}" for i in range(DEPTH)]

    def run():
        acts = feedforward(model, x, skips, scalings)
        noisy = [a + 0.1 * jnp.sin(a) for a in acts]
        return acts, layer_predictions(model, skips, scalings, [x, *noisy[:-1]], names)

    assert_close(run(), unrolled(run))


def test_traced_scalings(unrolled):
    """Scalings that are arrays (a traced `gamma`, say) are scanned over."""
    model, skips, x, _ = problem(skip=True)
    scales = jnp.linspace(0.5, 1.5, DEPTH)

    def run(scales):
        scalings = [scales[i] for i in range(DEPTH)]
        acts = feedforward(model, x, skips, scalings)
        names = [f"z{i}" for i in range(DEPTH)]
        return acts, layer_predictions(model, skips, scalings, [x, *acts[:-1]], names)

    jaxpr = jax.make_jaxpr(run)(scales)
    assert "scan" in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert_close(jax.jit(run)(scales), unrolled(lambda: run(scales)))


def test_layers_without_arrays_and_mixed_shapes(unrolled):
    """Parameter-free layers scan too; inputs of different shapes fall back."""
    layers = [eqx.nn.Lambda(jnp.tanh)] * 5
    z = jr.normal(jr.PRNGKey(1), (BATCH, 6))
    inputs = [jnp.full((BATCH, 2 + i), 0.3 * i) for i in range(5)]

    def run():
        acts = feedforward(layers, z)
        preds = layer_predictions(layers, None, [2.0] * 5, inputs, ["z"] * 5)
        return acts, preds

    acts, preds = run()
    assert_close(acts[-1], unrolled(run)[0][-1])
    assert_close(preds, [2.0 * jnp.tanh(z_i) for z_i in inputs])


@pytest.mark.parametrize("param_type,skip", SOME_SLOW)
def test_energies_and_gradients_equal_unrolled(param_type, skip, unrolled):
    model, skips, x, y = problem(skip)

    def ffwd():
        return jpc.init_activities_with_ffwd(
            model, x, skip_model=skips, param_type=param_type
        )

    assert_close(ffwd(), unrolled(ffwd))
    acts = [a + 0.1 * jnp.cos(3 * a) for a in ffwd()]
    params = (model, skips)
    kw = dict(x=x, param_type=param_type)

    def run():
        energies = jpc.pc_energy_fn(params, acts, y, record_layers=True, **kw)
        act_grads = jpc.compute_pc_activity_grad(params, acts, y, **kw)[1]
        param_grads = jpc.compute_pc_param_grads(params, acts, y, **kw)
        return energies, act_grads, param_grads

    assert_close(run(), unrolled(run))


@pytest.mark.slow
@pytest.mark.parametrize("param_type,skip", [("mupc", True), ("sp", False)])
def test_training_steps_equal_unrolled(param_type, skip, unrolled):
    model, skips, x, y = problem(skip)
    optim = optax.adam(1e-2)
    state = optim.init((eqx.filter(model, eqx.is_array), skips))
    activity_optim = optax.sgd(0.1)
    kw = dict(input=x, skip_model=skips, param_type=param_type)

    def pc_step():
        out = jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            activity_optim=activity_optim,
            n_inference_steps=5,
            **kw,
        )
        return eqx.filter(out["model"], eqx.is_array), out["loss"]

    def bp_step():
        out = jpc.make_bp_step(model, optim, state, y, **kw)
        return eqx.filter(out["model"], eqx.is_array), out["loss"]

    assert_close(pc_step(), unrolled(pc_step))
    assert_close(bp_step(), unrolled(bp_step))


@pytest.mark.parametrize("param_type,skip", SOME_SLOW)
def test_hidden_errors_exactly_zero_at_the_feedforward_state(param_type, skip):
    """float32, inside one compiled program: the scanned feedforward pass and the
    scanned predictions are the same operations, so the hidden errors are 0."""
    model, skips, x, _ = problem(skip, depth=10, dtype=jnp.float32)
    scalings = get_param_scalings(model, x, skip_model=skips, param_type=param_type)
    dynamic, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def errors(dynamic, x):
        layers = eqx.combine(dynamic, static)
        acts = feedforward(layers, x, skips, scalings)
        names = [f"z{i}" for i in range(10)]
        preds = layer_predictions(layers, skips, scalings, [x, *acts[:-1]], names)
        return [a - p for a, p in zip(acts, preds)]

    for error in errors(dynamic, x):
        assert error.dtype == jnp.float32
        np.testing.assert_array_equal(error, 0.0)
