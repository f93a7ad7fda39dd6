"""`activity_lr`: the activity step size as a traced value.

References: the same step with the rate built into the optimiser
(`optax.sgd(lr)`, a second code path); separate calls for the vmapped sweep; the
jit's own compilation counter for "compiles once".
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close, random_problem

import jpc


RATES = (0.05, 0.2, 0.7)
STEPS = {"make_pc_step": jpc.make_pc_step, "make_ipc_step": jpc.make_ipc_step}


@pytest.fixture
def problem(key):
    p = random_problem(key, [3, 5, 5, 2], batch=4)
    optim = optax.sgd(1e-2, momentum=0.5)
    opt_state = optim.init((eqx.filter(p.model, eqx.is_array), None))
    return p, optim, opt_state


def _step(name, problem, activity_optim, **kwargs):
    p, optim, opt_state = problem
    return STEPS[name](
        p.model,
        optim,
        opt_state,
        p.y,
        input=p.x,
        activity_optim=activity_optim,
        n_inference_steps=6,
        activity_decay=0.1,
        **kwargs,
    )


def _outputs(result):
    return (
        eqx.filter(result["model"], eqx.is_array),
        result["opt_state"],
        result["activities"],
    )


@pytest.mark.filterwarnings("ignore:.*has compiled")  # new optimisers, on purpose
@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("momentum", [None, 0.9])
@pytest.mark.slow
def test_activity_lr_equals_the_rate_built_into_the_optimiser(problem, name, momentum):
    unit = optax.sgd(1.0, momentum=momentum)
    for lr in RATES:
        swept = _step(name, problem, unit, activity_lr=lr)
        built_in = _step(name, problem, optax.sgd(lr, momentum=momentum))
        assert_trees_close(_outputs(swept), _outputs(built_in), rtol=1e-10)
    # `None` (the default) is the optimiser unchanged.
    assert_trees_close(
        _outputs(_step(name, problem, unit, activity_lr=None)),
        _outputs(_step(name, problem, unit)),
        rtol=0,
    )


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.slow
def test_a_sweep_compiles_once(problem, name):
    counter = STEPS[name].jitted.compilations
    unit = optax.sgd(1.0)
    _step(name, problem, unit, activity_lr=RATES[0])
    before = counter.count
    for lr in (*RATES, 1.5, jnp.asarray(0.3)):
        _step(name, problem, unit, activity_lr=lr)
    assert counter.count == before
    # The counter does count: a new optimiser object is a new program.
    _step(name, problem, optax.sgd(0.3))
    assert counter.count == before + 1


@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.slow
def test_vmap_over_activity_lr_equals_separate_runs(problem, name):
    unit = optax.sgd(1.0)

    def run(lr):
        return _outputs(_step(name, problem, unit, activity_lr=lr))

    batched = eqx.filter_vmap(run)(jnp.asarray(RATES))
    for i, lr in enumerate(RATES):
        row = jax.tree_util.tree_map(lambda a, i=i: a[i], batched)
        assert_trees_close(row, run(lr), rtol=1e-10, atol=1e-14)


def test_activity_lr_needs_an_activity_optimiser(problem):
    p, optim, opt_state = problem
    with pytest.raises(ValueError, match="`activity_lr` multiplies the updates of"):
        jpc.make_pc_step(p.model, optim, opt_state, p.y, input=p.x, activity_lr=0.1)
