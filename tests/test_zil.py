"""Z-IL and its hybrid (SPEC §6.6): make_zil_step against backprop and a hand loop.

The references never call the library's energy, gradient or inference code: the
backprop gradient is `jax.grad` of the hand-written forward pass (`helpers`), and the
activities after the Z-IL sweep are the feedforward activities minus B times the
backprop gradient of the batch-mean loss with respect to each hidden activity.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    backprop_grads,
    init_param_opt,
    optax_param_update,
    random_problem,
    ref_activity_grads,
    ref_output_loss,
    ref_param_grads,
    sgd_apply,
)

import jpc


LR = 0.3


def zil_step(p, optim, state, **kw):
    return jpc.make_zil_step(
        p.model,
        optim,
        state,
        p.y,
        input=p.x,
        loss_id=p.loss,
        skip_model=p.skip_model,
        param_type=p.param_type,
        **kw,
    )


def arrays(tree):
    return eqx.filter(tree, eqx.is_array)


CASES = [
    dict(widths=[3, 5, 5, 5, 2], skip=False, param_type="sp", loss="mse"),
    dict(widths=[3, 5, 5, 4], skip=True, param_type="mupc", loss="ce"),
    dict(widths=[3, 5, 5, 2], skip=True, param_type="ntp", loss="mse"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['param_type']}-{c['loss']}")
@pytest.mark.slow
def test_zil_update_is_minus_lr_times_backprop_gradient(key, case):
    case = dict(case)
    p = random_problem(key, case.pop("widths"), 5, use_bias=True, **case)
    optim = optax.sgd(LR)
    out = zil_step(p, optim, init_param_opt(optim, p.model, p.skip_model))
    expected = sgd_apply(arrays(p.model), backprop_grads(p, p.loss), LR)
    assert_trees_close(arrays(out["model"]), expected, rtol=1e-12, atol=1e-15)
    assert_trees_close(out["skip_model"], p.skip_model)
    ref_loss = ref_output_loss(p.ffwd()[-1], p.y, p.loss) / p.B
    np.testing.assert_allclose(out["loss"], ref_loss, rtol=1e-12)


def test_zil_with_adam_equals_backprop_step(key):
    """A stateful optimiser sees the backprop gradient too (optax on jax.grad)."""
    p = random_problem(key, [3, 5, 5, 2], 4, skip=True, use_bias=True)
    optim = optax.adam(1e-2)
    state = init_param_opt(optim, p.model, p.skip_model)
    zil = zil_step(p, optim, state)
    skip_grads = eqx.filter(p.skip_model, eqx.is_array)  # identity skips: no arrays
    model, _, ref_state = optax_param_update(
        optim, state, p.model, p.skip_model, (backprop_grads(p), skip_grads)
    )
    assert_trees_close(arrays(zil["model"]), arrays(model), rtol=1e-10)
    assert_trees_close(zil["opt_state"], ref_state, rtol=1e-10, atol=1e-15)


def test_zil_custom_layers(key):
    """Any list of per-example layers, here plain `eqx.nn.Linear` with a tanh block."""
    k1, k2, k3, kx, ky = jr.split(key, 5)
    model = [
        eqx.nn.Linear(3, 4, key=k1),
        eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(4, 4, key=k2)]),
        eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh), eqx.nn.Linear(4, 2, key=k3)]),
    ]
    x, y = jr.normal(kx, (6, 3)), jr.normal(ky, (6, 2))

    def loss(m):
        z = x
        for layer in m:
            z = jax.vmap(layer)(z)
        return 0.5 * jnp.sum((y - z) ** 2) / x.shape[0]

    optim = optax.sgd(LR)
    out = jpc.make_zil_step(model, optim, init_param_opt(optim, model), y, input=x)
    expected = sgd_apply(arrays(model), eqx.filter_grad(loss)(model), LR)
    assert_trees_close(arrays(out["model"]), expected, rtol=1e-12, atol=1e-15)


def swept_activities(p, model):
    """Feedforward activities minus B × d(batch-mean loss)/d(hidden activity)."""
    ffwd = p.ffwd()

    def loss(shifts):
        z = p.x
        for k, layer in enumerate(model):
            pred = p.scalings[k] * jax.vmap(layer)(z)
            if p.skip_model is not None and p.skip_model[k] is not None:
                pred = pred + jax.vmap(p.skip_model[k])(z)
            z = pred + shifts[k] if k < len(model) - 1 else pred
        return ref_output_loss(z, p.y, p.loss) / p.B

    deltas = jax.grad(loss)([jnp.zeros_like(z) for z in ffwd[:-1]])
    return [z - p.B * d for z, d in zip(ffwd[:-1], deltas)] + [ffwd[-1]]


# One set of optimiser objects and one problem shape for both hybrid tests, so
# they share a compiled step (a new optax object is a new program).
HYBRID_K, HYBRID_WIDTHS, HYBRID_BATCH = 3, [3, 5, 5, 2], 4
SGD = optax.sgd(LR)
ACTIVITY_LR = 0.2 * HYBRID_BATCH
ACTIVITY_SGD = optax.sgd(ACTIVITY_LR)


def hybrid_step(p, model, state):
    return jpc.make_zil_step(
        model,
        SGD,
        state,
        p.y,
        input=p.x,
        hybrid_steps=HYBRID_K,
        activity_optim=ACTIVITY_SGD,
    )


def test_hybrid_zil_equals_hand_loop(key):
    """Sweep (= backprop update), K SGD inference steps, one PC update."""
    p = random_problem(key, HYBRID_WIDTHS, HYBRID_BATCH, use_bias=True)
    out = hybrid_step(p, p.model, init_param_opt(SGD, p.model))
    acts = swept_activities(p, p.model)
    q = random_problem(key, HYBRID_WIDTHS, HYBRID_BATCH, use_bias=True)
    q.model = sgd_apply(p.model, backprop_grads(p), LR)
    for _ in range(HYBRID_K):
        grads = ref_activity_grads(q, acts)
        acts = [a - ACTIVITY_LR * g for a, g in zip(acts[:-1], grads[:-1])]
        acts = acts + [p.ffwd()[-1]]
    model_grads, _ = ref_param_grads(q, acts)
    expected = sgd_apply(arrays(q.model), model_grads, LR)
    assert_trees_close(arrays(out["model"]), expected, rtol=1e-10, atol=1e-14)


def test_hybrid_zil_reduces_loss_on_fixed_batch(key):
    p = random_problem(key, HYBRID_WIDTHS, HYBRID_BATCH, use_bias=True)
    model, state, losses = p.model, init_param_opt(SGD, p.model), []
    for _ in range(30):
        out = hybrid_step(p, model, state)
        model, state = out["model"], out["opt_state"]
        losses.append(float(out["loss"]))
    final_loss = float(ref_output_loss(_ffwd_out(model, p.x), p.y) / p.B)
    assert final_loss < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses[::10], losses[10::10]))


def _ffwd_out(model, x):
    for layer in model:
        x = jax.vmap(layer)(x)
    return x


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input=None), "Z-IL is supervised"),
        (dict(hybrid_steps=-1), "hybrid_steps"),
        (dict(hybrid_steps=1.5), "hybrid_steps"),
        (dict(hybrid_steps=True), "non-negative integer"),
        (dict(hybrid_steps=3), "activity_optim"),
        (dict(loss_id="hinge"), "loss_id"),
        (dict(skip_model=[None]), "skip_model"),
        (dict(input="short"), "`input` and `output` must have the same batch size"),
    ],
)
def test_make_zil_step_errors(key, kwargs, match):
    p = random_problem(key, [3, 4, 2], 2)
    optim = optax.sgd(LR)
    kw = dict(input=p.x) | kwargs
    if isinstance(kw["input"], str):
        kw["input"] = p.x[:1]
    with pytest.raises(ValueError, match=match):
        jpc.make_zil_step(p.model, optim, init_param_opt(optim, p.model), p.y, **kw)
