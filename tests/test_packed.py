"""Training steps that hold runs of identical layers stacked (`jpc._packed`) give
the numbers of the unrolled program (float64), keep the hidden errors at the
feedforward state exactly 0 (float32), and fall back to the unrolled program for
activity optimisers that are not elementwise."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc
from jpc import _packed, _stacked
from jpc._layers import get_param_scalings
from jpc._packed import packer


DEPTH, WIDTH, D_IN, D_OUT, BATCH = 8, 8, 5, 3, 4


def problem(skip, depth=DEPTH, dtype=jnp.float64, act="tanh", key=jr.PRNGKey(0)):
    k_model, k_x, k_y = jr.split(key, 3)
    model = jpc.make_mlp(k_model, D_IN, WIDTH, depth, D_OUT, act, use_bias=True)
    model = jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model
    )
    skip_model = jpc.make_skip_model(depth) if skip else None
    x = jr.normal(k_x, (BATCH, D_IN), dtype)
    y = jr.normal(k_y, (BATCH, D_OUT), dtype)
    return model, skip_model, x, y


@pytest.fixture(autouse=True)
def stacked(monkeypatch):
    """Runs of four identical layers or more are stacked (the default is longer)."""
    monkeypatch.setattr(_packed, "MIN_RUN", _packed.ALWAYS)


def unrolled(fn):
    """`fn()` with every layer apart, run op by op (no compiled program, which
    would be one traced with the stacked layers and reused)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_packed, "MIN_RUN", None)
        patch.setattr(_stacked, "ENABLED", False)
        with jax.disable_jit():
            return fn()


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for u, v in zip(leaves_a, leaves_b):
        if u is None:
            assert v is None
            continue
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def pc_step(problem, optim, activity_optim, **options):
    """`make_pc_step` from the optimiser's initial state, as a function of no
    arguments returning its array outputs (for `unrolled`)."""
    model, skips, x, y = problem
    state = optim.init((eqx.filter(model, eqx.is_array), skips))

    def step():
        out = jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            skip_model=skips,
            activity_optim=activity_optim,
            **options,
        )
        return arrays(out)

    return step


def arrays(result: dict) -> dict:
    """The array outputs of a step (the models as their array leaves)."""
    out = dict(result)
    out["model"] = eqx.filter(result["model"], eqx.is_array)
    return out


def test_runs_and_layout():
    model, skips, x, _ = problem(skip=True)
    scalings = get_param_scalings(model, x, skip_model=skips, param_type="mupc")
    # the hidden layers 1..6 form the run; the output layer is never part of it
    assert _packed.find_runs(model, skips, scalings) == {1: 7}
    net = _packed.pack_network(model, skips, scalings, x)
    assert len(net) == DEPTH and len(net.entries) == 3
    acts = _packed.feedforward(net, x)
    assert [a.shape for a in acts] == [(4, 8), (6, 4, 8), (4, 3)]
    # unpacking gives the unrolled feedforward pass
    expected = unrolled(
        lambda: jpc.init_activities_with_ffwd(
            model, x, skip_model=skips, param_type="mupc"
        )
    )
    assert_close(_packed.unpack(net, acts), expected)
    # too short a run, or a broken one, is not stacked
    short, short_skips, x4, _ = problem(skip=True, depth=4)
    assert packer((short, short_skips), x4, "mupc", None) == (None, None)
    skips[3] = None
    assert _packed.find_runs(model, skips, scalings) == {}


def test_split_and_stack():
    """`split` equals indexing (forward and transposed), and `stack` is
    `jnp.stack` with `split` as its transpose: checked against `jax.grad` of the
    plain functions."""
    a = jr.normal(jr.PRNGKey(1), (5, 3, 2))
    for axis in (0, 1):
        parts = _packed.split(a, axis)
        assert_close(parts, [jnp.take(a, i, axis) for i in range(a.shape[axis])])
    xs = tuple(jr.normal(jr.PRNGKey(i), (3, 2)) for i in range(5))
    weights = jnp.arange(30.0).reshape(5, 3, 2)

    def loss(stack):
        return lambda xs: jnp.sum(jnp.sin(stack(xs)) * weights)

    assert_close(_packed.stack(xs), jnp.stack(xs))
    assert_close(jax.grad(loss(_packed.stack))(xs), jax.grad(loss(jnp.stack))(xs))
    # the indices are not folded into constants: one dynamic slice per entry
    program = jax.jit(_packed.split).lower(a).compile().as_text()
    assert program.count(" dynamic-slice(") == 5
    assert " while(" in program


@pytest.mark.parametrize(
    "param_type,skip",
    [("mupc", True), pytest.param("sp", False, marks=pytest.mark.slow)],
)
def test_energies_equal_unrolled(param_type, skip):
    """The stacked energies and activity gradients at a perturbed state equal
    `jpc.pc_energy_fn` and `jpc.compute_pc_activity_grad` on the list."""
    model, skips, x, y = problem(skip)
    scalings = get_param_scalings(model, x, skip_model=skips, param_type=param_type)
    net = _packed.pack_network(model, skips, scalings, x)
    acts = [a + 0.1 * jnp.cos(3 * a) for a in _packed.feedforward(net, x)]
    kappas = jnp.linspace(0.5, 2.0, DEPTH - 1)
    kw = dict(x=x, param_type=param_type, hidden_energy_scaling=kappas)
    kw |= dict(output_energy_scaling=3.0, activity_decay=0.2)
    listed = _packed.unpack(net, acts)
    params = (model, skips)
    expected = (
        jpc.pc_energy_fn(params, listed, y, record_layers=True, **kw),
        jpc.compute_pc_activity_grad(params, listed, y, **kw),
    )
    energies = jpc.pc_energy_fn((net, None), acts, y, record_layers=True, **kw)
    energy, grads = jpc.compute_pc_activity_grad((net, None), acts, y, **kw)
    assert_close((energies, (energy, _packed.unpack(net, grads))), expected)


OPTIONS = {
    "plain": {},
    "metrics": dict(
        calculate_accuracy=True,
        activity_norms=True,
        param_norms=True,
        grad_norms=True,
        record_activities=True,
        record_energies=True,
    ),
    "regularised": dict(
        weight_decay=0.1,
        spectral_penalty=0.01,
        activity_decay=0.1,
        hidden_energy_scaling=[float(k) for k in np.linspace(0.5, 2.0, DEPTH - 1)],
        output_energy_scaling=2.0,
        activity_lr=0.5,
        gamma=1.5,
    ),
}


# one case in the default run, the others slow
STEP_CASES = [
    (pt, skip, options)
    if (pt, options) == ("mupc", "metrics")
    else pytest.param(pt, skip, options, marks=pytest.mark.slow)
    for pt, skip in (("mupc", True), ("sp", False))
    for options in OPTIONS
]


@pytest.mark.parametrize("param_type,skip,options", STEP_CASES)
def test_pc_step_equals_unrolled(param_type, skip, options):
    model, skips, x, y = problem(skip)
    assert packer((model, skips), x, param_type, None)[1] is not None
    step = pc_step(
        (model, skips, x, y),
        optax.adam(1e-2),
        optax.adam(0.05),
        param_type=param_type,
        n_inference_steps=5,
        **OPTIONS[options],
    )
    stacked = step()
    assert_close(stacked, unrolled(step))
    assert stacked["activities"][0].shape[1:] == (BATCH, WIDTH)


@pytest.mark.slow
def test_layer_learning_equals_unrolled():
    step = pc_step(
        problem(skip=True),
        optax.sgd(1e-2),
        optax.sgd(0.1),
        param_type="mupc",
        n_inference_steps=3,
        layer_learning=True,
    )
    assert_close(step(), unrolled(step))


@pytest.mark.parametrize(
    "activity_optim,elementwise",
    [
        (optax.sgd(0.1, momentum=0.9), True),
        pytest.param(
            optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
            True,
            marks=pytest.mark.slow,
        ),
        (optax.lars(0.1), False),  # a trust ratio per array
        pytest.param(  # factored
            optax.adafactor(0.1, min_dim_size_to_factor=4),
            False,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_elementwise_probe_and_fallback(activity_optim, elementwise):
    """Optimisers that treat each array as a whole see the layers apart; either
    way the step equals the unrolled one."""
    model, skips, x, y = problem(skip=True)
    scalings = get_param_scalings(model, x, skip_model=skips, param_type="mupc")
    net = _packed.pack_network(model, skips, scalings, x)
    acts = _packed.feedforward(net, x)
    assert _packed.elementwise(activity_optim, net, acts) is elementwise
    step = pc_step(
        (model, skips, x, y),
        optax.sgd(1e-2),
        activity_optim,
        param_type="mupc",
        n_inference_steps=4,
    )
    assert_close(step(), unrolled(step))


def test_hidden_errors_exactly_zero_at_the_feedforward_state():
    """float32, inside one compiled program: each stacked hidden energy at the
    feedforward state is exactly 0, as in the unrolled program, so the PC
    gradients of layers the output error has not reached are exactly 0 too."""
    model, skips, x, y = problem(skip=True, depth=12, dtype=jnp.float32, act="relu")
    dynamic, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def energies(dynamic, x, y):
        model = eqx.combine(dynamic, static)
        scalings = get_param_scalings(model, x, skip_model=skips, param_type="mupc")
        net = _packed.pack_network(model, skips, scalings, x)
        acts = _packed.feedforward(net, x)
        return jpc.pc_energy_fn((net, None), acts, y, x=x, record_layers=True)

    out = energies(dynamic, x, y)
    # record order: the output energy first, then the hidden ones
    assert out[0] > 0
    assert np.all(np.asarray(out[1:]) == 0.0)


def test_set_layer_stacking():
    """The public setting: validated, returns the previous value, drops compiled
    programs so that the next call of a step is traced with the new setting."""
    model, skips, x, y = problem(skip=True)
    optim = optax.sgd(1e-2)
    state = optim.init((eqx.filter(model, eqx.is_array), skips))
    activity_optim = optax.sgd(0.1)
    traced = []
    original = _packed.feedforward

    def spy(*args):
        traced.append(1)
        return original(*args)

    def step():
        return jpc.make_pc_step(
            model,
            optim,
            state,
            y,
            input=x,
            skip_model=skips,
            activity_optim=activity_optim,
            n_inference_steps=2,
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_packed, "feedforward", spy)
        previous = jpc.set_layer_stacking(None)
        try:
            assert previous == _packed.ALWAYS
            step()
            assert not traced  # off: the layers are apart
            assert jpc.set_layer_stacking(6) is None
            step()
            assert traced  # a run of 6 hidden layers: stacked, traced again
            count = len(traced)
            assert jpc.set_layer_stacking(7) == 6
            step()
            assert len(traced) == count  # the run is too short now
        finally:
            jpc.set_layer_stacking(previous)
    for bad in (1, 0, 2.5, True, "64"):
        with pytest.raises(ValueError, match="min_layers"):
            jpc.set_layer_stacking(bad)
