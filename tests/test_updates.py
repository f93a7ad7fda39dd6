"""One optax step on activities / parameters (SPEC §4.2, §5 discrete updates)."""

import equinox as eqx
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    init_param_opt,
    optax_param_update,
    random_problem,
    ref_activity_grads,
    ref_param_grads,
    ref_scalings,
    sgd_apply,
)

import jpc


WIDTHS = [4, 5, 5, 3]
CASES = [
    dict(supervised=True, skip=False, param_type="sp", loss="mse"),
    dict(supervised=True, skip=True, param_type="mupc", loss="ce", gamma=2.0),
    dict(supervised=False, skip=True, param_type="ntp", loss="mse"),
]
REG = dict(weight_decay=0.1, spectral_penalty=0.02, activity_decay=0.2)


def _problem(key, case):
    case = dict(case)
    sup, skip = case.pop("supervised"), case.pop("skip")
    return random_problem(key, WIDTHS, 3, sup, skip, use_bias=True, **case)


def _kw(p, **kw):
    return dict(input=p.x, loss_id=p.loss, param_type=p.param_type, gamma=p.gamma, **kw)


@pytest.mark.parametrize("case", CASES)
def test_update_pc_activities_sgd(key, case):
    p = _problem(key, case)
    lr = 0.7
    optim = optax.sgd(lr)
    res = jpc.update_pc_activities(
        p.params,
        p.activities,
        optim,
        optim.init(p.activities),
        p.y,
        **_kw(p, output_energy_scaling=0.5, **REG),
    )
    assert set(res) >= {"energy", "activities", "grads", "opt_state"}
    np.testing.assert_allclose(res["energy"], p.ref(lam=0.5, **REG), rtol=1e-10)
    g = ref_activity_grads(p, lam=0.5, **REG)
    assert_trees_close(
        list(res["grads"]), g, rtol=1e-10, atol=1e-14, check_structure=False
    )
    want = [a - lr * gi for a, gi in zip(p.activities, g, strict=True)]
    assert_trees_close(
        list(res["activities"]), want, rtol=1e-10, atol=1e-14, check_structure=False
    )
    # the dummy last slot is not moved
    np.testing.assert_array_equal(res["activities"][-1], p.activities[-1])


def test_update_pc_activities_adam_sequence(key):
    """Three Adam steps equal optax applied by hand to reference gradients."""
    p = random_problem(key, WIDTHS, 3, skip=True, param_type="mupc")
    optim = optax.adam(0.05)
    acts, state = list(p.activities), optim.init(p.activities)
    ref_acts, ref_state = list(p.activities), optim.init(list(p.activities))
    for _ in range(3):
        res = jpc.update_pc_activities(
            p.params, acts, optim, state, p.y, input=p.x, param_type="mupc"
        )
        acts, state = list(res["activities"]), res["opt_state"]
        g = ref_activity_grads(p, ref_acts)
        upd, ref_state = optim.update(g, ref_state, ref_acts)
        ref_acts = list(optax.apply_updates(ref_acts, upd))
    assert_trees_close(acts, ref_acts, rtol=1e-10, atol=1e-14, check_structure=False)


@pytest.mark.parametrize("case", CASES)
def test_update_pc_params_sgd(key, case):
    p = _problem(key, case)
    lr = 0.3
    optim = optax.sgd(lr)
    res = jpc.update_pc_params(
        p.params,
        p.activities,
        optim,
        init_param_opt(optim, p.model, p.skip_model),
        p.y,
        **_kw(p, output_energy_scaling=0.5, **REG),
    )
    assert set(res) >= {"model", "skip_model", "grads", "opt_state"}
    want_grads = ref_param_grads(p, lam=0.5, **REG)
    assert_trees_close(tuple(res["grads"]), want_grads, rtol=1e-10, atol=1e-14)
    want_model = sgd_apply(p.model, want_grads[0], lr)
    assert_trees_close(res["model"], want_model, rtol=1e-10, atol=1e-14)
    if p.skip_model is None:
        assert res["skip_model"] is None


def test_update_pc_params_trainable_skips_adam(key):
    p = random_problem(key, WIDTHS, 3, param_type="mupc")
    ks = jr.split(jr.PRNGKey(5), 2)
    skip0 = eqx.nn.Linear(5, 5, key=ks[0])
    p.skip_model = [None, skip0, None]
    p.scalings = ref_scalings("mupc", D=4, fan_ins=[4, 5, 5], skip_flags=[0, 1, 0])
    optim = optax.adam(1e-2)
    state = init_param_opt(optim, p.model, p.skip_model)
    ref_state = init_param_opt(optim, p.model, p.skip_model)
    model, skip = p.model, p.skip_model
    ref_model, ref_skip = p.model, p.skip_model
    for _ in range(2):
        res = jpc.update_pc_params(
            (model, skip), p.activities, optim, state, p.y, input=p.x, param_type="mupc"
        )
        model, skip, state = res["model"], res["skip_model"], res["opt_state"]
        p.model, p.skip_model = ref_model, ref_skip
        grads = ref_param_grads(p)
        ref_model, ref_skip, ref_state = optax_param_update(
            optim, ref_state, ref_model, ref_skip, grads
        )
    assert_trees_close((model, skip), (ref_model, ref_skip), rtol=1e-10, atol=1e-14)
    # the skip layer was trained (moved away from its initial weights)
    assert not np.allclose(skip[1].weight, skip0.weight)
