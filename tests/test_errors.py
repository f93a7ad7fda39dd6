"""Every ValueError of SPEC §2 "Errors" and §11.7: fail fast, name the argument and
show the value received."""

import re

import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from helpers import init_param_opt, random_problem

import jpc


WIDTHS = [4, 6, 6, 3]


@pytest.fixture
def p(key):
    return random_problem(key, WIDTHS, 5)


@pytest.fixture
def pu(key):
    return random_problem(key, WIDTHS, 5, supervised=False)


def check(fn, pattern, *shown, exc=ValueError):
    """`fn()` raises `exc` whose message matches `pattern` and contains `shown`."""
    with pytest.raises(exc, match=pattern) as info:
        fn()
    msg = str(info.value)
    for s in shown:
        assert s in msg, f"{s!r} not in error message {msg!r}"


# ------------------------------------------------------------------ option strings


def test_unknown_loss_pc_energy_fn(p):
    """§11.7: an unknown loss is a ValueError, not an UnboundLocalError."""
    check(
        lambda: jpc.pc_energy_fn(p.params, p.activities, p.y, x=p.x, loss="mae"),
        "loss",
        "mae",
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda p: jpc.compute_pc_activity_grad(
            p.params, p.activities, p.y, x=p.x, loss_id="mae"
        ),
        lambda p: jpc.compute_pc_param_grads(
            p.params, p.activities, p.y, x=p.x, loss_id="mae"
        ),
        lambda p: jpc.solve_inference(
            p.params, p.activities, p.y, input=p.x, loss_id="mae"
        ),
        lambda p: jpc.update_pc_activities(
            p.params,
            p.activities,
            optax.sgd(0.1),
            optax.sgd(0.1).init(p.activities),
            p.y,
            input=p.x,
            loss_id="mae",
        ),
        lambda p: jpc.update_pc_params(
            p.params,
            p.activities,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            p.y,
            input=p.x,
            loss_id="mae",
        ),
        lambda p: jpc.make_pc_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            p.y,
            input=p.x,
            loss_id="mae",
        ),
        lambda p: jpc.make_bp_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            p.y,
            input=p.x,
            loss_id="mae",
        ),
        lambda p: jpc.test_discriminative_pc(p.model, p.y, p.x, loss="mae"),
    ],
)
def test_unknown_loss_everywhere(p, call):
    check(lambda: call(p), "loss", "mae")


@pytest.mark.parametrize(
    "call",
    [
        lambda p: jpc.pc_energy_fn(
            p.params, p.activities, p.y, x=p.x, param_type="mup"
        ),
        lambda p: jpc.compute_pc_activity_grad(
            p.params, p.activities, p.y, x=p.x, param_type="mup"
        ),
        lambda p: jpc.get_param_scalings(p.model, p.x, param_type="mup"),
        lambda p: jpc.init_activities_with_ffwd(p.model, p.x, param_type="mup"),
        lambda p: jpc.make_mlp(jr.PRNGKey(0), 4, 6, 3, 3, "tanh", param_type="mup"),
        lambda p: jpc.make_pc_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            p.y,
            input=p.x,
            param_type="mup",
        ),
    ],
)
def test_unknown_param_type(p, call):
    check(lambda: call(p), "param_type", "mup")


def test_unknown_mode(key):
    """§11.7: typos in `mode` are rejected, not silently accepted."""
    check(
        lambda: jpc.init_activities_from_normal(key, [3, 4, 2], "supervize", 2),
        "mode",
        "supervize",
    )


def test_unknown_act_fn(key):
    check(lambda: jpc.get_act_fn("swishy"), "swishy")
    check(lambda: jpc.make_mlp(key, 3, 4, 2, 2, "swishy"), "act_fn", "swishy")


# ------------------------------------------------------------------ list lengths


def test_activities_length_supervised(p):
    short = p.activities[:-1]
    check(lambda: jpc.pc_energy_fn(p.params, short, p.y, x=p.x), "activities", "2", "3")
    check(
        lambda: jpc.compute_pc_activity_grad(p.params, short, p.y, x=p.x), "activities"
    )
    check(lambda: jpc.solve_inference(p.params, short, p.y, input=p.x), "activities")


def test_activities_length_unsupervised(pu):
    # x=None requires L+1 activities (z_0 included); L is wrong
    short = pu.activities[1:]
    check(lambda: jpc.pc_energy_fn(pu.params, short, pu.y), "activities", "3", "4")
    check(lambda: jpc.compute_pc_param_grads(pu.params, short, pu.y), "activities")


def test_skip_model_length(p):
    bad = jpc.make_skip_model(2)
    check(
        lambda: jpc.pc_energy_fn((p.model, bad), p.activities, p.y, x=p.x), "skip_model"
    )
    check(
        lambda: jpc.init_activities_with_ffwd(p.model, p.x, skip_model=bad),
        "skip_model",
    )
    check(
        lambda: jpc.make_pc_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model, bad),
            p.y,
            input=p.x,
            skip_model=bad,
        ),
        "skip_model",
    )


# ------------------------------------------------------------------ shapes


def test_x_y_batch_sizes_differ(p):
    x7 = jnp.ones((7, 4))
    check(
        lambda: jpc.pc_energy_fn(p.params, p.activities, p.y, x=x7), "batch", "7", "5"
    )
    check(
        lambda: jpc.make_pc_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            p.y,
            input=x7,
        ),
        "batch",
        "7",
        "5",
    )


def test_y_feature_size(p):
    y11 = jnp.ones((5, 11))
    check(
        lambda: jpc.pc_energy_fn(p.params, p.activities, y11, x=p.x),
        r"\by\b|output",
        "11",
    )
    check(
        lambda: jpc.make_pc_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            y11,
            input=p.x,
        ),
        r"\by\b|output",
        "11",
    )


def test_x_feature_size(p):
    x13 = jnp.ones((5, 13))
    check(
        lambda: jpc.pc_energy_fn(p.params, p.activities, p.y, x=x13),
        r"\bx\b|input",
        "13",
    )
    check(
        lambda: jpc.make_pc_step(
            p.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), p.model),
            p.y,
            input=x13,
        ),
        r"\bx\b|input",
        "13",
    )


# ------------------------------------------------------------------ make_pc_step


@pytest.mark.parametrize("missing", ["key", "layer_sizes", "batch_size"])
def test_unsupervised_make_pc_step_requires(pu, missing):
    kw = dict(key=jr.PRNGKey(0), layer_sizes=pu.widths, batch_size=5)
    kw[missing] = None
    check(
        lambda: jpc.make_pc_step(
            pu.model,
            optax.sgd(0.1),
            init_param_opt(optax.sgd(0.1), pu.model),
            pu.y,
            **kw,
        ),
        re.escape(missing),
    )


def test_activity_optim_requires_n_inference_steps(p):
    opt = optax.sgd(0.1)
    state = init_param_opt(opt, p.model)
    check(
        lambda: jpc.make_pc_step(
            p.model, opt, state, p.y, input=p.x, activity_optim=opt
        ),
        "n_inference_steps",
    )
    check(
        lambda: jpc.make_pc_step(
            p.model, opt, state, p.y, input=p.x, n_inference_steps=5
        ),
        "activity_optim",
    )
