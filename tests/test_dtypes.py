"""dtypes: with `jax_enable_x64` on (conftest), every public step, update and
inference function returns activities, parameters and optimiser states in the dtype
of the model and data it is given: float32 stays float32 (Python-float
hyperparameters are weakly typed, the ODE's time variables follow the state), and
float64 stays float64."""

import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

import jpc


B, D, N, C = 4, 3, 5, 2


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree
    )


def _data(dtype):
    x = jr.normal(jr.PRNGKey(1), (B, D)).astype(dtype)
    y = jax.nn.one_hot(jnp.arange(B) % C, C).astype(dtype)
    return x, y


def _mlp(dtype, width=N, act="tanh", d_in=D, d_out=C):
    return _cast(jpc.make_mlp(jr.PRNGKey(0), d_in, width, 3, d_out, act), dtype)


def _opt_state(optim, model, skip=None):
    return optim.init((eqx.filter(model, eqx.is_array), skip))


ADAM = optax.adam(1e-2)
SGD = optax.sgd(0.1)


def pc_step(dtype, **kw):
    model = _mlp(dtype)
    x, y = _data(dtype)
    return jpc.make_pc_step(
        model, ADAM, _opt_state(ADAM, model), y, input=x, max_t1=5, **kw
    )


def pc_step_unsupervised(dtype):
    model = _mlp(dtype, d_in=C, d_out=D)
    x, y = _data(dtype)
    return jpc.make_pc_step(
        model,
        ADAM,
        _opt_state(ADAM, model),
        x,
        key=jr.PRNGKey(3),
        layer_sizes=[C, N, N, D],
        batch_size=B,
        sigma=0.1,
        max_t1=5,
    )


def bp_step(dtype):
    model = _mlp(dtype)
    x, y = _data(dtype)
    return jpc.make_bp_step(model, ADAM, _opt_state(ADAM, model), y, input=x)


def ipc_step(dtype):
    model = _mlp(dtype)
    x, y = _data(dtype)
    return jpc.make_ipc_step(
        model,
        ADAM,
        _opt_state(ADAM, model),
        y,
        input=x,
        activity_optim=SGD,
        n_inference_steps=3,
        weight_decay=0.01,
    )


def zil_step(dtype):
    model = _mlp(dtype)
    x, y = _data(dtype)
    return jpc.make_zil_step(model, SGD, _opt_state(SGD, model), y, input=x)


def hpc_step(dtype):
    generator = _mlp(dtype, d_in=C, d_out=D)
    amortiser = _mlp(dtype, d_in=D, d_out=C)
    x, y = _data(dtype)
    states = (
        _opt_state(ADAM, generator),
        ADAM.init(eqx.filter(amortiser, eqx.is_array)),
    )
    return jpc.make_hpc_step(
        generator, amortiser, (ADAM, ADAM), states, x, input=y, max_t1=5
    )


def pc_updates(dtype):
    model = _mlp(dtype)
    x, y = _data(dtype)
    acts = jpc.init_activities_with_ffwd(model, x)
    kw = dict(input=x, gamma=2.0, output_energy_scaling=0.5, weight_decay=0.1)
    a = jpc.update_pc_activities((model, None), acts, SGD, SGD.init(acts), y, **kw)
    p = jpc.update_pc_params(
        (model, None), a["activities"], ADAM, _opt_state(ADAM, model), y, **kw
    )
    return a, p


def bpc_updates(dtype):
    top = _mlp(dtype)
    bottom = _mlp(dtype, d_in=C, d_out=D)[::-1]
    x, y = _data(dtype)
    acts = jpc.init_activities_with_ffwd(top, x)
    kw = dict(input=x, backward_energy_weight=0.5, forward_energy_weight=2.0)
    a = jpc.update_bpc_activities(top, bottom, acts, SGD, SGD.init(acts), y, **kw)
    states = (
        ADAM.init(eqx.filter(top, eqx.is_array)),
        ADAM.init(eqx.filter(bottom, eqx.is_array)),
    )
    p = jpc.update_bpc_params(
        top, bottom, a["activities"], ADAM, ADAM, *states, y, **kw
    )
    return a, p


def epc_updates(dtype):
    model = _mlp(dtype)
    x, y = _data(dtype)
    errors = _cast(jpc.init_epc_errors([D, N, N, C], B), dtype)
    kw = dict(input=x, gamma=2.0, output_energy_scaling=0.5)
    e = jpc.update_epc_errors((model, None), errors, SGD, SGD.init(errors), y, **kw)
    p = jpc.update_epc_params(
        (model, None), e["errors"], ADAM, _opt_state(ADAM, model), y, **kw
    )
    return e, p


def linear_update(dtype):
    model = _cast(jpc.make_mlp(jr.PRNGKey(0), D, N, 3, C, "linear"), dtype)
    x, y = _data(dtype)
    return jpc.update_linear_equilib_energy_params(
        (model, None), ADAM, _opt_state(ADAM, model), x, y, gamma=2.0
    )


def solve(dtype, **kw):
    model = _mlp(dtype)
    x, y = _data(dtype)
    acts = jpc.init_activities_with_ffwd(model, x)
    return jpc.solve_inference(
        (model, None), acts, y, input=x, max_t1=5, gamma=2.0, **kw
    )


def generative_tests(dtype):
    generator = _mlp(dtype, d_in=C, d_out=D)
    amortiser = _mlp(dtype, d_in=D, d_out=C)
    x, y = _data(dtype)
    sizes = [C, N, N, D]
    # predictions and losses (accuracies are percentages, not the user's arrays)
    return (
        jpc.test_generative_pc(generator, x, y, jr.PRNGKey(4), sizes, B, max_t1=5)[1],
        jpc.test_hpc(generator, amortiser, x, y, jr.PRNGKey(4), sizes, B, max_t1=5)[3],
        jpc.test_discriminative_pc(_mlp(dtype), y, x, gamma=2.0)[0],
    )


CASES = {
    "make_pc_step_ode": lambda dt: pc_step(dt, gamma=2.0, weight_decay=0.1),
    "make_pc_step_record": lambda dt: pc_step(
        dt, record_activities=True, record_energies=True, activity_norms=True
    ),
    "make_pc_step_record_every": lambda dt: pc_step(
        dt, record_activities=True, record_every=1.0
    ),
    "make_pc_step_constant_step": lambda dt: pc_step(
        dt, stepsize_controller=diffrax.ConstantStepSize(), dt=0.5
    ),
    "make_pc_step_discrete": lambda dt: pc_step(
        dt, activity_optim=SGD, n_inference_steps=3, spectral_penalty=0.1
    ),
    "make_pc_step_centred": lambda dt: pc_step(dt, nudging="centred", beta=0.1),
    "make_pc_step_unsupervised": pc_step_unsupervised,
    "make_bp_step": bp_step,
    "make_ipc_step": ipc_step,
    "make_zil_step": zil_step,
    "make_hpc_step": hpc_step,
    "update_pc": pc_updates,
    "update_bpc": bpc_updates,
    "update_epc": epc_updates,
    "update_linear_equilib_energy_params": linear_update,
    "solve_inference": solve,
    "solve_inference_record_every": lambda dt: solve(dt, record_every=1.0),
    "test_generative_pc_hpc_discriminative": generative_tests,
}


def _float_dtypes(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return {a.dtype for a in leaves if eqx.is_inexact_array(a)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_outputs_keep_the_users_dtype(name, dtype):
    assert jax.config.jax_enable_x64
    out = CASES[name](dtype)
    assert _float_dtypes(out) == {jnp.dtype(dtype)}, name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_ode_inference_runs_in_the_states_dtype(dtype):
    """No float64 inside the float32 ODE solve (not only a cast at the end)."""
    model = _mlp(dtype)
    x, y = _data(dtype)
    acts = jpc.init_activities_with_ffwd(model, x)
    jaxpr = jax.make_jaxpr(
        lambda a: jpc.solve_inference.jitted((model, None), a, y, input=x, max_t1=5)
    )(acts)
    # arrays with an axis (scalars of the error checks may be float64)
    other = "f64" if dtype == jnp.float32 else "f32"
    assert re.search(other + r"\[\d", str(jaxpr)) is None


@pytest.mark.slow
def test_adam_state_stays_float32_over_steps():
    """The nudged (centred) update used to turn params and Adam state to float64,
    which then stayed float64 in later steps."""
    model = _mlp(jnp.float32)
    x, y = _data(jnp.float32)
    state = _opt_state(ADAM, model)
    for _ in range(2):
        out = jpc.make_pc_step(
            model, ADAM, state, y, input=x, max_t1=5, nudging="centred", beta=0.1
        )
        model, state = out["model"], out["opt_state"]
    assert _float_dtypes((model, state)) == {jnp.dtype(jnp.float32)}
