"""The depth study's own pieces: ePC's per-layer evidence, the frozen-layers
control, the learning criterion and the learning-rate choice."""

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc
from experiments import depth_study


DEPTH, WIDTH = 5, 6


def _net():
    model = jpc.make_mlp(
        jr.PRNGKey(0), 4, WIDTH, DEPTH, 3, "relu", use_bias=False, param_type="mupc"
    )
    x = jr.normal(jr.PRNGKey(1), (8, 4))
    y = jax.nn.one_hot(jnp.arange(8) % 3, 3)
    return (
        (model, jpc.make_skip_model(DEPTH)),
        x,
        y,
        (4,) + (WIDTH,) * (DEPTH - 1) + (3,),
    )


def _bp_grads(params, x, y):
    def loss(model):
        out = jpc.init_activities_with_ffwd(
            model, x, skip_model=params[1], param_type="mupc"
        )[-1]
        return jpc.mse_loss(out, y)

    return eqx.filter_grad(loss)(params[0])


def _flat(layer):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(layer)])


@pytest.mark.parametrize("n_steps", [0, 4])
def test_epc_evidence_against_hand_computed_norms(n_steps):
    """Ratio and cosine of ePC's weight gradient (errors after `n_steps` steps of
    inference, done here by hand) to backprop's (`jax.grad` of the loss)."""
    params, x, y, sizes = _net()
    optim = jpc.per_example(optax.sgd(0.1))
    ratio, cosine = depth_study.epc_layer_evidence(
        params, x, y, error_optim=optim, layer_sizes=sizes, n_steps=n_steps
    )
    errors = jpc.init_epc_errors(list(sizes), batch_size=8)
    state = optim.init(errors)
    for _ in range(n_steps):
        out = jpc.update_epc_errors(
            params, errors, optim, state, y, input=x, param_type="mupc"
        )
        errors, state = out["errors"], out["opt_state"]
    pc = jpc.compute_epc_param_grads(params, errors, y, x=x, param_type="mupc")[0]
    bp = _bp_grads(params, x, y)
    for i, (p, b) in enumerate(zip(pc, bp)):
        p, b = _flat(p), _flat(b)
        np.testing.assert_allclose(
            ratio[i], np.linalg.norm(p) / np.linalg.norm(b), rtol=1e-5
        )
        expected = p @ b / (np.linalg.norm(p) * np.linalg.norm(b))
        np.testing.assert_allclose(cosine[i], expected, rtol=1e-5, atol=1e-6)
    if n_steps == 0:  # no inference: ePC's gradient is backprop's
        np.testing.assert_allclose(ratio, 1.0, rtol=1e-5)
        np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


def test_frozen_control_moves_only_the_top_layers():
    (model, skip), x, y, _ = _net()
    optim = depth_study.frozen_optim(optax.adam(0.1), model, n_trainable=2)
    opt_state = optim.init((eqx.filter(model, eqx.is_array), skip))
    new = jpc.make_bp_step(
        model, optim, opt_state, y, input=x, skip_model=skip, param_type="mupc"
    )["model"]
    for i, (old, updated) in enumerate(zip(model, new)):
        moved = not np.array_equal(_flat(old), _flat(updated))
        assert moved == (i >= DEPTH - 2), i


def test_learning_criterion():
    evidence = {
        "ratio": [0.0, 0.05, 0.2, 0.2, 20.0, 1.0],
        "cosine": [None, 0.9, 0.4, 0.9, 0.9, 0.6],
        "status": [0, 2, 2, 2, 2, 2],
    }
    np.testing.assert_array_equal(
        depth_study.learning_layers(evidence), [0, 0, 0, 1, 0, 1]
    )
    assert depth_study.describe_layers(evidence) == "2/6, lowest 4, 1 exactly 0"


def test_learning_rate_choice_skips_diverged_runs():
    args = argparse.Namespace(lr_grid=[0.1, 0.01], depths=[8], max_select_depth=64)
    done = {
        depth_study.selection_key("mnist", 8, "PC", 0.1): {
            "final_val_acc": 90.0,
            "diverged": True,
        },
        depth_study.selection_key("mnist", 8, "PC", 0.01): {
            "final_val_acc": 50.0,
            "diverged": False,
        },
    }
    assert depth_study.chosen_lr(args, done, "mnist", 8, "PC") == 0.01
    assert depth_study.chosen_lr(args, {}, "mnist", 8, "PC") is None


def test_push_follows_up_only_what_reached_every_layer():
    """Over the budget, a long-inference setting runs at a depth only where it got
    every layer learning at a shallower push depth."""
    args = argparse.Namespace(
        push_depths=[64, 128], push_long_t=[64], push_budget=64**3
    )
    all_learn = {"ratio": [1.0] * 64, "cosine": [0.9] * 64, "status": [2] * 64}
    one_dead = dict(all_learn, ratio=[0.0] + [1.0] * 63)
    done = {
        "push/depth64/muPC_pe0.25_T64L": all_learn,
        "push/depth64/PC_pe0.1_T64L": one_dead,
    }
    names = [name for name, _ in depth_study.follow_ups(args, done, 128)]
    assert names == ["muPC_pe0.25_T64L"]
    assert depth_study.follow_ups(args, done, 64) == []  # within the budget there
