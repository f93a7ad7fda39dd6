"""Edge cases of losses, model leaves, layers, optimisers and data.

Masked classes in cross-entropy, shape checks of the losses, integer leaves in a
model, stateful layers, optax transformations with extra arguments, and the
one-time warnings about misused data and parameterisations.
"""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import jpc


# ----------------------------------------------------------- masked cross-entropy


def _hand_ce(logits, labels):
    """Cross-entropy over the finite (unmasked) classes only, with Python floats."""
    total = 0.0
    for row, label in zip(np.asarray(logits), np.asarray(labels)):
        kept = [k for k in range(len(row)) if np.isfinite(row[k])]
        lse = math.log(sum(math.exp(row[k]) for k in kept))
        total -= sum(label[k] * (row[k] - lse) for k in kept)
    return total / len(logits)


MASKED_LOGITS = np.array([[0.3, -np.inf, 1.2, -0.5], [-np.inf, 2.0, 0.1, -np.inf]])
MASKED_LABELS = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.25, 0.75, 0.0]])


def test_ce_masked_logits_value():
    loss = jpc.cross_entropy_loss(jnp.asarray(MASKED_LOGITS), MASKED_LABELS)
    np.testing.assert_allclose(loss, _hand_ce(MASKED_LOGITS, MASKED_LABELS), 1e-12)


def test_ce_masked_logits_gradients():
    logits, labels = jnp.asarray(MASKED_LOGITS), jnp.asarray(MASKED_LABELS)
    d_logits, d_labels = jax.grad(jpc.cross_entropy_loss, argnums=(0, 1))(
        logits, labels
    )
    # Softmax over the unmasked classes minus the labels, over the batch size.
    exp = np.where(np.isfinite(MASKED_LOGITS), np.exp(MASKED_LOGITS), 0.0)
    probs = exp / exp.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(d_logits, (probs - MASKED_LABELS) / 2, atol=1e-12)
    # d/dy of -y log p is -log p where the class is used, 0 where its label is 0.
    log_probs = np.log(np.where(MASKED_LABELS > 0, probs, 1.0))
    np.testing.assert_allclose(d_labels, -log_probs / 2, atol=1e-12)


def test_ce_label_on_masked_class_is_infinite():
    labels = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert jpc.cross_entropy_loss(jnp.asarray(MASKED_LOGITS), labels) == np.inf


class MaskedLinear(eqx.Module):
    """A linear map whose masked outputs are `-inf` (a boolean array leaf)."""

    linear: eqx.nn.Linear
    mask: jax.Array

    def __call__(self, z):
        return jnp.where(self.mask, self.linear(z), -jnp.inf)


def _masked_classifier(key, d_in=3, width=5, n_classes=4):
    model = jpc.make_mlp(key, d_in, width, 2, n_classes, "tanh")
    mask = jnp.array([True, False, True, True])
    return [model[0], MaskedLinear(model[1].layers[1], mask)]


@pytest.mark.parametrize(
    "discrete", [True, pytest.param(False, marks=pytest.mark.slow)]
)
def test_make_pc_step_ce_with_masked_classes(raise_at_call, discrete):
    k1, k2 = jr.split(jr.PRNGKey(3))
    model = _masked_classifier(k1)
    x = jr.normal(k2, (6, 3))
    y = jax.nn.one_hot(jnp.array([0, 2, 3, 0, 2, 3]), 4)
    lr = 0.1
    optim = optax.sgd(lr)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    inference = (
        dict(activity_optim=optax.sgd(1.0), n_inference_steps=5) if discrete else {}
    )
    result = jpc.make_pc_step(
        model, optim, opt_state, y, input=x, loss_id="ce", **inference
    )
    logits = jax.vmap(model[1])(jax.vmap(model[0])(x))
    np.testing.assert_allclose(result["loss"], _hand_ce(logits, y), rtol=1e-10)
    # The update is plain SGD on the gradient at the inferred activities.
    final = [z[-1] for z in result["activities"]]
    grads = jpc.compute_pc_param_grads((model, None), final, y, x=x, loss_id="ce")
    expected = jax.tree.map(
        lambda p, g: p - lr * g, eqx.filter(model, eqx.is_inexact_array), grads[0]
    )
    assert_trees_close(
        eqx.filter(result["model"], eqx.is_inexact_array), expected, rtol=1e-10
    )
    weight = result["model"][1].linear.weight
    assert np.all(np.isfinite(weight))
    # The masked class never receives a gradient.
    np.testing.assert_array_equal(weight[1], model[1].linear.weight[1])
    np.testing.assert_array_equal(result["model"][1].mask, model[1].mask)


# ------------------------------------------------------------------- loss shapes


def test_ce_value_with_matching_shapes():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        jpc.cross_entropy_loss(logits, labels), _hand_ce(logits, labels), 1e-12
    )


@pytest.mark.parametrize(
    ("fn", "names"),
    [
        (jpc.mse_loss, ("preds", "labels")),
        (jpc.cross_entropy_loss, ("logits", "labels")),
        (lambda a, b: jpc.compute_accuracy(b, a), ("truths", "preds")),
    ],
)
def test_losses_refuse_broadcasting(fn, names):
    preds = jnp.zeros((5, 3))
    labels = jnp.ones((5, 1))
    first = "(5, 1)" if names[0] == "truths" else "(5, 3)"
    second = "(5, 3)" if names[0] == "truths" else "(5, 1)"
    match = (
        rf"`{names[0]}` and `{names[1]}` must have the same shape, got "
        rf"{names[0]}.shape=\{first[:-1]}\) and {names[1]}.shape=\{second[:-1]}\)"
    )
    with pytest.raises(ValueError, match=match):
        fn(preds, labels)


def test_integer_labels_suggest_one_hot():
    with pytest.raises(ValueError, match=r"jpc\.datasets\.one_hot"):
        jpc.cross_entropy_loss(jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0]))
    model = jpc.make_mlp(jr.PRNGKey(0), 3, 5, 2, 3, "tanh")
    optim = optax.sgd(0.1)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    with pytest.raises(ValueError, match=r"one_hot\(labels, 3\)"):
        jpc.make_pc_step(
            model, optim, opt_state, jnp.array([0, 1, 2, 0]), input=jnp.ones((4, 3))
        )


# ------------------------------------------------------------ integer leaves


class Counted(eqx.Module):
    """A masked linear layer with an integer counter, as a model might carry."""

    linear: eqx.nn.Linear
    mask: jax.Array
    count: jax.Array

    def __call__(self, z):
        return self.linear(z) * self.mask


def _int_leaf_problem(key):
    k1, k2, k3 = jr.split(key, 3)
    mlp = jpc.make_mlp(k1, 3, 6, 2, 2, "tanh")
    layer = Counted(mlp[1].layers[1], jnp.array([1, 0]), jnp.array(7, jnp.int32))
    model = [mlp[0], layer]
    x = jr.normal(k2, (5, 3))
    y = jr.normal(k3, (5, 2))
    return model, x, y


def _states(optim, model):
    """The optimiser state from both filters (integers included or not)."""
    return [
        optim.init((eqx.filter(model, eqx.is_array), None)),
        optim.init((eqx.filter(model, eqx.is_inexact_array), None)),
    ]


def _manual_adam(model, grads, lr):
    """First Adam step on the floating leaves with optax directly."""
    optim = optax.adam(lr)
    floats = eqx.filter(model, eqx.is_inexact_array)
    grads = eqx.filter(grads, eqx.is_inexact_array)
    updates, _ = optim.update(grads, optim.init(floats), floats)
    return eqx.apply_updates(floats, updates)


def _check_int_leaves(new_model, model):
    for new, old in [
        (new_model[1].mask, model[1].mask),
        (new_model[1].count, model[1].count),
    ]:
        assert new.dtype == old.dtype
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("state_index", [0, 1])
def test_bp_step_with_integer_leaves(state_index):
    model, x, y = _int_leaf_problem(jr.PRNGKey(0))
    optim = optax.adam(1e-2)
    opt_state = _states(optim, model)[state_index]
    result = jpc.make_bp_step(model, optim, opt_state, y, input=x)

    def loss(m):
        return jpc.mse_loss(jax.vmap(m[1])(jax.vmap(m[0])(x)), y)

    grads = eqx.filter_grad(loss)(model)
    expected = _manual_adam(model, grads, 1e-2)
    assert_trees_close(eqx.filter(result["model"], eqx.is_inexact_array), expected)
    _check_int_leaves(result["model"], model)
    # A second step with the returned state works and keeps the state's dtypes.
    again = jpc.make_bp_step(result["model"], optim, result["opt_state"], y, input=x)
    _check_int_leaves(again["model"], model)
    dtypes = lambda s: [a.dtype for a in jax.tree.leaves(s)]  # noqa: E731
    assert dtypes(again["opt_state"]) == dtypes(opt_state)


@pytest.mark.parametrize("state_index", [0, 1])
def test_update_pc_params_with_integer_leaves(state_index):
    model, x, y = _int_leaf_problem(jr.PRNGKey(1))
    optim = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = _states(optim, model)[state_index]
    activities = jpc.init_activities_with_ffwd(model, x)
    activities[0] = activities[0] + 0.3
    result = jpc.update_pc_params(
        (model, None), activities, optim, opt_state, y, input=x
    )
    grads = jpc.compute_pc_param_grads((model, None), activities, y, x=x)[0]
    floats = eqx.filter(model, eqx.is_inexact_array)
    reference = optax.adamw(1e-2, weight_decay=0.1)
    updates, _ = reference.update(grads, reference.init(floats), floats)
    expected = eqx.apply_updates(floats, updates)
    assert_trees_close(eqx.filter(result["model"], eqx.is_inexact_array), expected)
    _check_int_leaves(result["model"], model)


@pytest.mark.parametrize(
    "discrete", [True, pytest.param(False, marks=pytest.mark.slow)]
)
def test_pc_steps_with_integer_leaves(discrete):
    model, x, y = _int_leaf_problem(jr.PRNGKey(2))
    optim = optax.adam(1e-2)
    inference = (
        dict(activity_optim=optax.sgd(1.0), n_inference_steps=4) if discrete else {}
    )
    results = [
        jpc.make_pc_step(model, optim, state, y, input=x, **inference)
        for state in _states(optim, model)
    ]
    final = [z[-1] for z in results[0]["activities"]]
    grads = jpc.compute_pc_param_grads((model, None), final, y, x=x)[0]
    expected = _manual_adam(model, grads, 1e-2)
    for result in results:
        assert_trees_close(eqx.filter(result["model"], eqx.is_inexact_array), expected)
        _check_int_leaves(result["model"], model)


def test_ipc_step_with_integer_leaves():
    model, x, y = _int_leaf_problem(jr.PRNGKey(4))
    optim = optax.adam(1e-2)
    results = [
        jpc.make_ipc_step(
            model,
            optim,
            state,
            y,
            input=x,
            activity_optim=optax.sgd(1.0),
            n_inference_steps=3,
        )
        for state in _states(optim, model)
    ]
    assert_trees_close(
        eqx.filter(results[0]["model"], eqx.is_inexact_array),
        eqx.filter(results[1]["model"], eqx.is_inexact_array),
    )
    for result in results:
        _check_int_leaves(result["model"], model)
    moved = results[0]["model"][1].linear.weight - model[1].linear.weight
    assert np.abs(moved).max() > 1e-3  # the float leaves were trained


# --------------------------------------------------------------- stateful layers


def test_batch_norm_is_refused():
    k1, k2 = jr.split(jr.PRNGKey(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norm = eqx.nn.BatchNorm(4, "batch", mode="batch")
    model = [eqx.nn.Linear(3, 4, key=k1), norm, eqx.nn.Linear(4, 2, key=k2)]
    optim = optax.sgd(0.1)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    with pytest.raises(ValueError, match=r"`model\[1\]` \(BatchNorm\).*LayerNorm"):
        jpc.make_pc_step(
            model, optim, opt_state, jnp.ones((2, 2)), input=jnp.ones((2, 3))
        )


def test_dropout_is_refused_unless_inference():
    k1, k2 = jr.split(jr.PRNGKey(0))
    first = eqx.nn.Linear(3, 4, key=k1)
    last = eqx.nn.Linear(4, 2, key=k2)
    x, y = jr.normal(k1, (5, 3)), jr.normal(k2, (5, 2))
    dropped = [eqx.nn.Sequential([first, eqx.nn.Dropout(0.5)]), last]
    activities = jpc.init_activities_with_ffwd([first, last], x)
    with pytest.raises(
        ValueError, match=r"`model\[0\]` \(Sequential\).*Dropout.*inference=True"
    ):
        jpc.pc_energy_fn((dropped, None), activities, y, x=x)
    off = [eqx.nn.Sequential([first, eqx.nn.Dropout(0.5, inference=True)]), last]
    np.testing.assert_allclose(
        jpc.pc_energy_fn((off, None), activities, y, x=x),
        jpc.pc_energy_fn(([first, last], None), activities, y, x=x),
        rtol=1e-12,
    )


# ------------------------------------------------- optimisers with extra arguments


def _linear_problem(key):
    k1, k2, k3 = jr.split(key, 3)
    model = jpc.make_mlp(k1, 3, 4, 3, 2, "linear")
    return model, jr.normal(k2, (4, 3)), jr.normal(k3, (4, 2))


def _inferred(model, x, y, activity_optim, n_steps):
    optim = optax.sgd(0.0)  # the parameters stay put
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    result = jpc.make_pc_step(
        model,
        optim,
        opt_state,
        y,
        input=x,
        activity_optim=activity_optim,
        n_inference_steps=n_steps,
    )
    return [z[-1] for z in result["activities"]]


@pytest.mark.slow
def test_lbfgs_activity_optim_reaches_sgd_equilibrium():
    model, x, y = _linear_problem(jr.PRNGKey(5))
    by_lbfgs = _inferred(model, x, y, optax.lbfgs(), 30)
    by_sgd = _inferred(model, x, y, optax.sgd(1.0), 3000)
    assert_trees_close(by_lbfgs[:-1], by_sgd[:-1], rtol=1e-6, atol=1e-9)
    # and it is an equilibrium: the activity gradient vanishes there
    _, grads = jpc.compute_pc_activity_grad((model, None), by_lbfgs, y, x=x)
    assert max(float(jnp.abs(g).max()) for g in grads) < 1e-8
    # One step at a time with `update_pc_activities`, from the feedforward state.
    optim = optax.lbfgs()
    activities = jpc.init_activities_with_ffwd(model, x)
    state = optim.init(activities)
    energies = []
    for _ in range(8):
        result = jpc.update_pc_activities(
            (model, None), activities, optim, state, y, input=x
        )
        activities, state = result["activities"], result["opt_state"]
        energies.append(float(result["energy"]))
    lowest = float(jpc.pc_energy_fn((model, None), by_sgd, y, x=x))
    assert energies[-1] - lowest < 0.01 * (energies[0] - lowest)


def test_reduce_on_plateau_as_optim():
    model, x, y = _linear_problem(jr.PRNGKey(7))
    lr = 0.05
    optim = optax.chain(optax.sgd(lr), optax.contrib.reduce_on_plateau(patience=1))
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    result = jpc.make_pc_step(
        model,
        optim,
        opt_state,
        y,
        input=x,
        activity_optim=optax.sgd(1.0),
        n_inference_steps=10,
    )
    # The plateau state saw the energy at the inferred activities as `value`.
    plateau = result["opt_state"][1]
    np.testing.assert_allclose(plateau.best_value, jnp.sum(result["energies"]), 1e-10)
    final = [z[-1] for z in result["activities"]]
    grads = jpc.compute_pc_param_grads((model, None), final, y, x=x)[0]
    expected = jax.tree.map(
        lambda p, g: p - lr * g, eqx.filter(model, eqx.is_inexact_array), grads
    )
    assert_trees_close(eqx.filter(result["model"], eqx.is_inexact_array), expected)


def test_extra_args_optim_without_value_is_explained():
    model, x, y = _linear_problem(jr.PRNGKey(8))
    optim = optax.contrib.reduce_on_plateau()
    opt_state = optim.init((eqx.filter(model, eqx.is_array), None))
    with pytest.raises(ValueError, match=r"needs extra arguments.*reduce_on_plateau"):
        jpc.make_pc_step(model, optim, opt_state, y, input=x, nudging="positive")


# -------------------------------------------------------------- silent misuse


def _fresh(fn):
    """Re-arm the one-time value checks of a jitted entry point."""
    fn.value_checks[:] = [True]
    return fn


def _mnist_like(dtype):
    pixels = np.arange(4 * 64).reshape(4, 64) % 256
    return jnp.asarray(pixels.astype(dtype))


SGD = optax.sgd(0.1)  # one object, so that the calls below share a program


def _activity_step(model, x, y, param_type="sp"):
    """One `update_pc_activities` call, the cheapest compiled entry point."""
    activities = jpc.init_activities_with_ffwd(model, x, param_type=param_type)
    state = SGD.init(activities)
    return jpc.update_pc_activities(
        (model, None), activities, SGD, state, y, input=x, param_type=param_type
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_raw_pixels_warn(dtype):
    model = jpc.make_mlp(jr.PRNGKey(0), 64, 8, 2, 2, "tanh")
    y = jnp.zeros((4, 2))
    _fresh(jpc.update_pc_activities)
    with pytest.warns(UserWarning, match=r"raw pixel values.*scale to \[0, 1\]"):
        _activity_step(model, _mnist_like(dtype), y)
    with warnings.catch_warnings():  # scaled data: no warning; raw: not again
        warnings.simplefilter("error")
        _activity_step(model, _mnist_like(dtype), y)
        _fresh(jpc.update_pc_activities)
        _activity_step(model, _mnist_like(dtype) / 255, y)


@pytest.mark.parametrize(("built", "used"), [("mupc", "sp"), ("sp", "mupc")])
def test_param_type_mismatch_warns(built, used):
    model = jpc.make_mlp(jr.PRNGKey(0), 64, 64, 2, 2, "tanh", param_type=built)
    x, y = jnp.full((4, 64), 0.1), jnp.zeros((4, 2))
    _fresh(jpc.update_pc_activities)
    match = rf"`param_type='{used}'`: pass the `param_type`"
    with pytest.warns(UserWarning, match=match):
        _activity_step(model, x, y, param_type=used)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fresh(jpc.update_pc_activities)
        _activity_step(model, x, y, param_type=built)


def test_unflattened_images_name_the_size():
    model = jpc.make_mlp(jr.PRNGKey(0), 784, 8, 2, 10, "tanh")
    images = jnp.zeros((3, 28, 28))
    with pytest.raises(ValueError, match=r"flatten each example to 784"):
        jpc.init_activities_with_ffwd(model, images)
    activities = [jnp.zeros((3, 8)), jnp.zeros((3, 10))]
    with pytest.raises(ValueError, match=r"flatten each example to 784"):
        jpc.pc_energy_fn((model, None), activities, jnp.zeros((3, 10)), x=images)


class _NeedsKey(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, z, key):
        return self.linear(z) + jr.normal(key, (self.linear.out_features,))


def test_layer_needing_a_key_is_refused():
    k1, k2 = jr.split(jr.PRNGKey(0))
    model = [_NeedsKey(eqx.nn.Linear(3, 4, key=k1)), eqx.nn.Linear(4, 2, key=k2)]
    x, y = jr.normal(k1, (5, 3)), jr.normal(k2, (5, 2))
    activities = [jnp.zeros((5, 4)), jnp.zeros((5, 2))]
    with pytest.raises(ValueError, match=r"`model\[0\]` \(_NeedsKey\).*_NeedsKey"):
        jpc.pc_energy_fn((model, None), activities, y, x=x)
