r"""Nudging (SPEC §6.5): make_pc_step(nudging=..., beta=...) against its definition.

Definition (the nudging page): phase $s\beta$ ($s = \pm 1$) weights the output energy
by $s\beta\lambda$, runs inference from the feedforward state and takes the parameter
gradient $g(s\beta)$ of that phase's energy at its final state. The update is
$g(\beta)/\beta$ (positive), $g(-\beta)/(-\beta)$ (negative) or
$(g(\beta) - g(-\beta))/(2\beta)$ (centred); the weight regulariser's gradient is added
once, unscaled. The references below are written from that definition with the
hand-written energy of `helpers` (never the library's energy or inference code).
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    backprop_grads,
    init_param_opt,
    mlp_weights,
    random_problem,
    ref_activity_grads,
    ref_equilibrium,
    ref_param_grads,
    ref_regulariser,
    sgd_apply,
)
from jax.flatten_util import ravel_pytree

import jpc


SIGNS = {"positive": (1.0,), "negative": (-1.0,), "centred": (1.0, -1.0)}
LR = 0.5


def arrays(tree):
    return eqx.filter(tree, eqx.is_array)


def pc_step(p, optim, **kw):
    return jpc.make_pc_step(
        p.model,
        optim,
        init_param_opt(optim, p.model, p.skip_model),
        p.y,
        input=p.x,
        loss_id=p.loss,
        param_type=p.param_type,
        skip_model=p.skip_model,
        **kw,
    )


def hand_update(p, nudging, beta, infer, lam=1.0, weight_decay=0.0):
    """The nudged gradient of the definition; `infer(lam)` gives a phase's state."""
    signs = SIGNS[nudging]
    total = None
    for s in signs:
        acts = infer(s * beta * lam)
        g = ref_param_grads(p, acts, lam=s * beta * lam)[0]
        g = jax.tree_util.tree_map(lambda v, s=s: v / (s * beta * len(signs)), g)
        total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)

    def reg(model):
        return ref_regulariser(
            mlp_weights(model), [], supervised=True, L=p.L, weight_decay=weight_decay
        )

    return jax.tree_util.tree_map(jnp.add, total, eqx.filter_grad(reg)(p.model))


def hand_sgd_inference(p, lr, T, activity_decay=0.0):
    """`infer(lam)`: T plain SGD steps on the hand-written energy from feedforward."""

    grad = jax.jit(
        lambda a, lam: ref_activity_grads(p, a, lam=lam, activity_decay=activity_decay)
    )

    def infer(lam):
        acts = list(p.ffwd())
        for _ in range(T):
            g = grad(acts, lam)
            acts = [a - lr * d for a, d in zip(acts[:-1], g[:-1])] + [acts[-1]]
        return acts

    return infer


CASES = {
    "positive": dict(
        problem=dict(param_type="sp", loss="mse"), beta=0.3, reg={}, energy={}
    ),
    "negative": dict(
        problem=dict(param_type="mupc", loss="ce", skip=True),
        beta=0.2,
        reg=dict(weight_decay=0.1),
        energy=dict(activity_decay=0.05, output_energy_scaling=2.0),
    ),
    "centred": dict(
        problem=dict(param_type="ntp", loss="mse", skip=True, gamma=2.0),
        beta=0.25,
        reg=dict(weight_decay=0.05),
        energy={},
    ),
}


@pytest.mark.parametrize("nudging", list(CASES))
@pytest.mark.slow
def test_fused_nudging_equals_definition(key, nudging):
    case = CASES[nudging]
    p = random_problem(key, [3, 5, 5, 2], 4, use_bias=True, **case["problem"])
    lr, T, beta = 0.2 * p.B, 15, case["beta"]
    optim, activity_optim = optax.sgd(LR), optax.sgd(lr)
    out = pc_step(
        p,
        optim,
        nudging=nudging,
        beta=beta,
        activity_optim=activity_optim,
        n_inference_steps=T,
        gamma=p.gamma,
        **case["reg"],
        **case["energy"],
    )
    energy = case["energy"]
    infer = hand_sgd_inference(p, lr, T, energy.get("activity_decay", 0.0))
    lam = energy.get("output_energy_scaling", 1.0)
    grads = hand_update(p, nudging, beta, infer, lam, **case["reg"])
    expected = sgd_apply(arrays(p.model), grads, LR)
    assert_trees_close(arrays(out["model"]), expected, rtol=1e-10, atol=1e-14)
    if nudging == "positive":  # with beta = 1 the update is standard PC's
        kw = dict(activity_optim=activity_optim, n_inference_steps=T, gamma=p.gamma)
        nudged = pc_step(p, optim, nudging="positive", beta=1.0, **kw)
        plain = pc_step(p, optim, **kw)
        assert_trees_close(arrays(nudged["model"]), arrays(plain["model"]), rtol=1e-12)
        # A traced zero cannot be caught at trace time; it fails at run time
        # (at the call with the "call" timing of training-step checks).
        previous = jpc.set_step_error_timing("call")
        with pytest.raises(eqx.EquinoxRuntimeError, match="`beta` must be non-zero"):
            pc_step(p, optim, nudging="positive", beta=jnp.asarray(0.0), **kw)
        jpc.set_step_error_timing(previous)


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def centred_vs_backprop(p, out):
    """Cosine similarity and relative distance of the update (lr 1) to backprop's."""
    update = ravel_pytree(arrays(p.model))[0] - ravel_pytree(arrays(out["model"]))[0]
    bp = ravel_pytree(arrays(backprop_grads(p)))[0]
    return cosine(update, bp), np.linalg.norm(update - bp) / np.linalg.norm(bp)


@pytest.mark.slow
def test_ode_centred_nudging(key):
    """ODE inference: Newton reference at beta = 0.2, backprop as beta -> 0.

    `beta` is traced, so the second call (a JAX scalar) reuses the compiled step.
    """
    p = random_problem(key, [3, 5, 5, 2], 4, use_bias=True)
    optim = optax.sgd(1.0)
    kw = dict(
        nudging="centred",
        ode_solver=dfx.Tsit5(),
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        max_t1=400,
    )
    out = pc_step(p, optim, beta=0.2, **kw)
    grads = hand_update(p, "centred", 0.2, lambda lam: ref_equilibrium(p, lam=lam))
    expected = sgd_apply(arrays(p.model), grads, 1.0)
    assert_trees_close(arrays(out["model"]), expected, rtol=1e-6, atol=1e-12)
    cos, dist = centred_vs_backprop(
        p, pc_step(p, optim, beta=jnp.asarray(0.01, jnp.float64), **kw)
    )
    assert cos > 0.99 and dist < 0.02


@pytest.mark.slow
def test_fused_centred_nudging_approaches_backprop(key):
    """Fused discrete inference run to equilibrium, small beta: backprop's update."""
    p = random_problem(key, [4, 8, 8, 3], 8, use_bias=True)
    kw = dict(activity_optim=optax.sgd(0.5 * p.B), n_inference_steps=100)
    out = pc_step(p, optax.sgd(1.0), nudging="centred", beta=0.01, **kw)
    cos, dist = centred_vs_backprop(p, out)
    assert cos > 0.99 and dist < 0.02


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(nudging="both"), ValueError, "`nudging` must be one of"),
        (dict(nudging=True), ValueError, "`nudging` must be one of"),
        (dict(nudging="centred", beta=0), ValueError, "`beta` must be non-zero"),
        (dict(nudging="positive", beta=0.0), ValueError, "`beta` must be non-zero"),
        (dict(nudging="centred", beta="0.1"), TypeError, "`beta` must be a float"),
        (dict(nudging="centred", beta=True), TypeError, "`beta` must be a float"),
        (dict(nudging="negative", beta=None), TypeError, "`beta` must be a float"),
    ],
)
def test_nudging_option_errors(key, kwargs, error, match):
    p = random_problem(key, [3, 4, 2], 2)
    with pytest.raises(error, match=match):
        pc_step(p, optax.sgd(LR), **kwargs)
