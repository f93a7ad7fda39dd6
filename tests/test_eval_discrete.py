"""`test_generative_pc` with discrete inference: the same equilibrium as the ODE."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import jpc
from jpc._eval import generative_equilibrium


BATCH, SIZES = 4, [3, 4, 5]


@pytest.fixture
def problem():
    """A linear generator z0 -> z1 -> y (float64) and its closed-form equilibrium.

    With only `y` clamped the energy ½|z1 - W1 z0|² + ½|y - W2 z1|² of each
    example is a quadratic in (z0, z1) with Hessian H = [[W1ᵀW1, -W1ᵀ],
    [-W1, I + W2ᵀW2]]; its minimum solves H (z0, z1) = (0, W2ᵀ y). The weights
    have orthonormal columns, so H is well conditioned (eigenvalues in
    [0.38, 2.62]) and both inference paths converge in a few hundred steps.
    """
    rng = np.random.default_rng(0)
    w1 = np.linalg.qr(rng.normal(size=(SIZES[1], SIZES[0])))[0]
    w2 = np.linalg.qr(rng.normal(size=(SIZES[2], SIZES[1])))[0]
    model = jpc.make_mlp(jr.PRNGKey(0), SIZES[0], SIZES[1], 2, SIZES[2], "linear")
    model = eqx.tree_at(
        lambda m: (m[0].layers[1].weight, m[1].layers[1].weight),
        model,
        (jnp.asarray(w1), jnp.asarray(w2)),
    )
    y = jr.normal(jr.PRNGKey(1), (BATCH, SIZES[2]))
    hessian = np.block([[w1.T @ w1, -w1.T], [-w1, np.eye(SIZES[1]) + w2.T @ w2]])
    rhs = np.concatenate([np.zeros((BATCH, SIZES[0])), np.asarray(y) @ w2], axis=1)
    z = np.linalg.solve(hessian, rhs.T).T
    return model, y, (z[:, : SIZES[0]], z[:, SIZES[0] :])


def args_of(model, y):
    return ((model, None), y, None, "mse", "sp", 0.0, 0.0, 0.0)


def start(y):
    acts = jpc.init_activities_from_normal(jr.PRNGKey(5), SIZES, "unsupervised", BATCH)
    return [a.astype(y.dtype) for a in acts]


CONTROLLER = dfx.PIDController(rtol=1e-8, atol=1e-8)
ODE = (dfx.Tsit5(), 1000.0, None, CONTROLLER)
STOP = dict(
    max_steps=None,
    steady_state_rtol=1e-12,
    steady_state_atol=1e-12,
    caller="test_generative_pc",
)
# Batch-mean energy: a per-example step of 0.3 is a step of 0.3 × BATCH.
DISCRETE = (optax.sgd(0.3 * BATCH), 400)


def test_discrete_inference_reaches_the_closed_form_equilibrium(problem):
    model, y, z = problem
    disc, _ = generative_equilibrium(args_of(model, y), start(y), ODE, STOP, DISCRETE)
    for found, expected in zip(disc, z):
        np.testing.assert_allclose(found, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_discrete_and_ode_reach_the_same_equilibrium(problem):
    model, y, z = problem
    ode, _ = generative_equilibrium(args_of(model, y), start(y), ODE, STOP)
    disc, _ = generative_equilibrium(args_of(model, y), start(y), ODE, STOP, DISCRETE)
    for found, expected in zip(ode, z):
        np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-8)
    for a, b in zip(ode, disc):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_public_accuracy_is_the_same_on_both_paths(problem):
    model, y, z = problem
    predicted = np.argmax(z[0], axis=1)
    wrong = (predicted[-1] + 1) % SIZES[0]
    labels = jax.nn.one_hot(np.r_[predicted[:-1], wrong], SIZES[0])  # 3 of 4 right
    common = dict(
        layer_sizes=SIZES,
        batch_size=BATCH,
        ode_solver=dfx.Tsit5(),
        max_t1=1000.0,
        stepsize_controller=CONTROLLER,
        steady_state_rtol=1e-12,
        steady_state_atol=1e-12,
    )
    key = jr.PRNGKey(5)
    acc_ode, pred_ode = jpc.test_generative_pc(model, y, labels, key, **common)
    acc_disc, pred_disc = jpc.test_generative_pc(
        model,
        y,
        labels,
        key,
        activity_optim=DISCRETE[0],
        n_inference_steps=DISCRETE[1],
        **common,
    )
    assert float(acc_ode) == float(acc_disc) == 75.0
    # the second output is the feedforward prediction from the labels
    w1, w2 = (np.asarray(layer.layers[1].weight) for layer in model)
    np.testing.assert_allclose(pred_disc, labels @ w1.T @ w2.T, rtol=1e-10)
    np.testing.assert_allclose(pred_disc, pred_ode, rtol=1e-10)


def test_discrete_inference_needs_both_options(problem):
    model, y, _ = problem
    labels = jnp.eye(SIZES[0])[jnp.arange(BATCH) % SIZES[0]]
    common = dict(layer_sizes=SIZES, batch_size=BATCH)
    with pytest.raises(ValueError, match="must be given together for discrete"):
        jpc.test_generative_pc(
            model, y, labels, jr.PRNGKey(0), activity_optim=optax.sgd(1.0), **common
        )
    with pytest.raises(ValueError, match="`n_inference_steps` must be a positive"):
        jpc.test_generative_pc(
            model,
            y,
            labels,
            jr.PRNGKey(0),
            activity_optim=optax.sgd(1.0),
            n_inference_steps=0,
            **common,
        )


def test_discrete_path_names_a_non_finite_observation(problem):
    model, y, _ = problem
    labels = jnp.eye(SIZES[0])[jnp.arange(BATCH) % SIZES[0]]
    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match=r"^test_generative_pc: `output` contains NaN or inf",
    ):
        jpc.test_generative_pc(
            model,
            y.at[0, 0].set(jnp.nan),
            labels,
            jr.PRNGKey(0),
            layer_sizes=SIZES,
            batch_size=BATCH,
            activity_optim=optax.sgd(1.0),
            n_inference_steps=3,
        )
