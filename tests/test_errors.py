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


@pytest.mark.parametrize("steps", [0, 2.0, True])
def test_n_inference_steps_must_be_a_positive_int(p, steps):
    opt = optax.sgd(0.1)
    state = init_param_opt(opt, p.model)
    check(
        lambda: jpc.make_pc_step(
            p.model,
            opt,
            state,
            p.y,
            input=p.x,
            activity_optim=opt,
            n_inference_steps=steps,
        ),
        re.escape(f"`n_inference_steps` must be a positive integer, got {steps!r}"),
    )


# ------------------------------------------- the caller's own argument names


def _sgd_state(p):
    return init_param_opt(optax.sgd(0.1), p.model)


LOSS_ID_CALLS = [
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
        p.params, p.activities, optax.sgd(0.1), _sgd_state(p), p.y, loss_id="mae"
    ),
    lambda p: jpc.test_generative_pc(
        p.model, p.y, p.x, jr.PRNGKey(0), p.widths, 5, loss_id="mae"
    ),
]


@pytest.mark.parametrize("call", LOSS_ID_CALLS)
@pytest.mark.slow
def test_unknown_loss_id_names_loss_id(p, call):
    """Functions whose option is called `loss_id` name `loss_id`, not `loss`."""
    check(lambda: call(p), re.escape("`loss_id`"), "mae")


CLAMP_CALLS = {
    "solve_inference": lambda p, y, x: jpc.solve_inference(
        p.params, p.activities, y, input=x
    ),
    "update_pc_activities": lambda p, y, x: jpc.update_pc_activities(
        p.params,
        p.activities,
        optax.sgd(0.1),
        optax.sgd(0.1).init(p.activities),
        y,
        input=x,
    ),
    "update_pc_params": lambda p, y, x: jpc.update_pc_params(
        p.params, p.activities, optax.sgd(0.1), _sgd_state(p), y, input=x
    ),
    "make_pc_step": lambda p, y, x: jpc.make_pc_step(
        p.model, optax.sgd(0.1), _sgd_state(p), y, input=x
    ),
    "make_pc_step_discrete": lambda p, y, x: jpc.make_pc_step(
        p.model,
        optax.sgd(0.1),
        _sgd_state(p),
        y,
        input=x,
        activity_optim=optax.sgd(0.1),
        n_inference_steps=2,
    ),
    "make_bp_step": lambda p, y, x: jpc.make_bp_step(
        p.model, optax.sgd(0.1), _sgd_state(p), y, input=x
    ),
}


@pytest.mark.parametrize("name", sorted(CLAMP_CALLS))
def test_batch_mismatch_names_input_and_output(p, name):
    """Functions taking `output`/`input` name them (make_bp_step used to fail
    deep in jnp with a TypeError naming nothing)."""
    x7 = jnp.ones((7, 4))
    check(
        lambda: CLAMP_CALLS[name](p, p.y, x7),
        r"`input` and `output`",
        "(7, 4)",
        "(5, 3)",
    )


@pytest.mark.parametrize("name", sorted(CLAMP_CALLS))
def test_output_feature_size_names_output(p, name):
    y11 = jnp.ones((5, 11))
    check(lambda: CLAMP_CALLS[name](p, y11, p.x), r"`output`", "(5, 11)", "(5, 3)")


@pytest.mark.parametrize("name", ["solve_inference", "update_pc_activities"])
def test_input_feature_size_names_input(p, name):
    x13 = jnp.ones((5, 13))
    check(lambda: CLAMP_CALLS[name](p, p.y, x13), r"`input`", "(13,)")


def test_hidden_activity_shape_is_named(p):
    bad = [p.activities[0], jnp.ones((5, 2)), p.activities[2]]
    check(
        lambda: jpc.solve_inference(p.params, bad, p.y, input=p.x),
        re.escape("`activities[1]`"),
        "(5, 2)",
        "(5, 6)",
    )


def _unsupervised_step(pu, layer_sizes, batch_size):
    return jpc.make_pc_step(
        pu.model,
        optax.sgd(0.1),
        _sgd_state(pu),
        pu.y,
        key=jr.PRNGKey(0),
        layer_sizes=layer_sizes,
        batch_size=batch_size,
    )


def test_layer_sizes_length_is_named(pu):
    short = pu.widths[1:]
    check(lambda: _unsupervised_step(pu, short, 5), "layer_sizes", str(short))
    check(
        lambda: jpc.test_generative_pc(
            pu.model, pu.y, jnp.ones((5, 4)), jr.PRNGKey(0), short, 5
        ),
        "layer_sizes",
        str(short),
    )


def test_batch_size_mismatch_is_named(pu):
    check(lambda: _unsupervised_step(pu, pu.widths, 4), "batch_size", "4", "5")
    check(
        lambda: jpc.test_generative_pc(
            pu.model, pu.y, jnp.ones((5, 4)), jr.PRNGKey(0), pu.widths, 4
        ),
        "batch_size",
        "4",
    )


def test_zero_gamma(p):
    """`gamma` divides a_L: 0 is a ValueError, not a ZeroDivisionError."""
    check(lambda: jpc.get_param_scalings(p.model, p.x, gamma=0.0), "gamma", "0")
    check(
        lambda: jpc.pc_energy_fn(p.params, p.activities, p.y, x=p.x, gamma=0),
        "gamma",
    )
