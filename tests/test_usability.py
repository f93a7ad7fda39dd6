"""What a newcomer meets first: exact accuracies, errors that say how to fix the
call, and jitted functions that present themselves like the functions they wrap.

References: exact rational arithmetic (`fractions.Fraction`) for the accuracy; for
the errors, the message text (each hint is asserted) and, where a call is
corrected as the hint says, the corrected call's result.
"""

import inspect
import pydoc
import warnings
from fractions import Fraction

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import jpc
from jpc._checks import traced_floats
from jpc._jit import RECOMPILE_WARNING_AFTER
from jpc._updates import ENERGY_FLOATS


def _labels(n, correct):
    """One-hot truths and predictions agreeing on the first `correct` of `n` rows."""
    truths = np.eye(3, dtype=np.float32)[np.zeros(n, dtype=int)]
    preds = np.eye(3, dtype=np.float32)[(np.arange(n) >= correct).astype(int)]
    return truths, preds


@pytest.mark.slow
def test_compute_accuracy_is_exact_for_exact_fractions():
    """9 of 9 gives exactly 100.0 in float32 (also under jit, where XLA turns a mean
    into a product with 1/n); every percentage is the float nearest the exact one
    within one rounding."""
    with jax.enable_x64(False):
        for fn in (jpc.compute_accuracy, jax.jit(jpc.compute_accuracy)):
            assert fn(*_labels(9, 9)).item() == 100.0
            assert fn(*_labels(8, 3)).item() == 37.5
        # Every count k = 0..n at once (vmap over the predictions), under jit.
        fn = jax.jit(jax.vmap(jpc.compute_accuracy, in_axes=(None, 0)))
        for n in (3, 6, 7, 9, 12, 30, 64):
            truths = _labels(n, 0)[0]
            preds = np.stack([_labels(n, k)[1] for k in range(n + 1)])
            out = fn(truths, preds)
            assert out.dtype == jnp.float32
            for k, value in enumerate(out.tolist()):
                exact = Fraction(100 * k, n)
                if Fraction(float(np.float32(exact))) == exact:
                    assert Fraction(value) == exact, (k, n, value)
                else:
                    assert abs(Fraction(value) - exact) <= exact / 2**23


# ------------------------------------------------------------ jitted presentation


def _jitted_public_functions():
    """Public functions that are wrappers (jit or keyword hints) of another."""
    found = {}
    for name in dir(jpc):
        obj = getattr(jpc, name)
        if callable(obj) and hasattr(obj, "__wrapped__") and not name.startswith("_"):
            found[name] = obj
    return found


JITTED = _jitted_public_functions()


def test_every_compiled_entry_point_is_presented():
    for name in (
        "make_pc_step",
        "make_bp_step",
        "make_ipc_step",
        "make_hpc_step",
        "make_zil_step",
        "compute_infer_energies",
        "test_discriminative_pc",
        "update_pc_activities",
        "solve_inference",
    ):
        assert name in JITTED, name


@pytest.mark.parametrize("name", sorted(JITTED))
def test_jitted_functions_show_the_wrapped_function(name):
    fn = JITTED[name]
    wrapped = fn.__wrapped__
    assert inspect.isfunction(fn) and fn.__name__ == name == wrapped.__name__
    assert fn.__doc__ == wrapped.__doc__ and fn.__doc__
    assert fn.__module__ == wrapped.__module__
    shown, real = inspect.signature(fn), inspect.signature(wrapped)
    assert [(p.name, p.kind, p.default) for p in shown.parameters.values()] == [
        (p.name, p.kind, p.default) for p in real.parameters.values()
    ]
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    assert text.splitlines()[0] == (
        f"Python Library Documentation: function {name} in module {fn.__module__}"
    )
    assert "_JitWrapper" not in text and fn.__doc__.splitlines()[0] in text
    assert "jaxlib" not in str(shown) and "Union[" not in str(shown)


def test_scalar_annotations_read_briefly():
    parameters = inspect.signature(jpc.make_pc_step).parameters
    assert repr(parameters["weight_decay"].annotation) == "float | Array"
    assert repr(parameters["gamma"].annotation) == "float | Array | None"
    assert repr(parameters["dt"].annotation) == "float | None"
    assert repr(parameters["opt_state"].annotation) == "OptState"
    assert repr(parameters["input"].annotation) == "Float[Array, 'batch ...'] | None"
    assert "weight_decay: float | Array = 0.0" in str(
        inspect.signature(jpc.make_pc_step)
    )
    # help() on the function itself, as a user types it.
    text = pydoc.render_doc(jpc.compute_infer_energies, renderer=pydoc.plaintext)
    assert "weight_decay: float | Array = 0.0" in text


# --------------------------------------------------------- the other spelling


@pytest.mark.parametrize(
    "fn, wrong, right",
    [
        (jpc.make_pc_step, "loss", "loss_id"),
        (jpc.make_pc_step, "solver", "ode_solver"),
        (jpc.update_pc_params, "loss", "loss_id"),
        (jpc.test_discriminative_pc, "loss_id", "loss"),
        (jpc.compute_infer_energies, "loss_id", "loss"),
        (jpc.pc_energy_fn, "loss_id", "loss"),
        (jpc.compute_pc_activity_grad, "loss", "loss_id"),
        (jpc.epc_energy_fn, "loss_id", "loss"),
        (jpc.solve_inference, "ode_solver", "solver"),
    ],
)
def test_other_spelling_names_the_keyword_this_function_takes(fn, wrong, right):
    with pytest.raises(TypeError, match=rf"`{wrong}`: this function takes `{right}=`"):
        fn(None, None, None, None, **{wrong: "ce"})


# ------------------------------------------------------------ errors with a fix


@pytest.fixture
def clf(key):
    """A 6-8-8-3 classifier, a batch of 5 and Adam (whose state has the params'
    structure, so a wrongly made state cannot pass by accident)."""
    model = jpc.make_mlp(key, 6, 8, 3, 3, act_fn="tanh")
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 6)))
    y = np.eye(3)[[0, 1, 2, 0, 1]]
    optim = optax.adam(1e-2)
    return model, x, y, optim


def _model_only_state(model, optim):
    return optim.init(eqx.filter(model, eqx.is_array))


OPT_STATE_CALLS = {
    "make_pc_step": lambda m, o, s, x, y: jpc.make_pc_step(m, o, s, y, input=x),
    "make_bp_step": lambda m, o, s, x, y: jpc.make_bp_step(m, o, s, y, input=x),
    "make_ipc_step": lambda m, o, s, x, y: jpc.make_ipc_step(
        m, o, s, y, input=x, activity_optim=optax.sgd(0.1), n_inference_steps=2
    ),
    "make_zil_step": lambda m, o, s, x, y: jpc.make_zil_step(m, o, s, y, input=x),
    "update_pc_params": lambda m, o, s, x, y: jpc.update_pc_params(
        (m, None), jpc.init_activities_with_ffwd(m, x), o, s, y, input=x
    ),
    "update_epc_params": lambda m, o, s, x, y: jpc.update_epc_params(
        (m, None), jpc.init_epc_errors([6, 8, 8, 3], 5), o, s, y, input=x
    ),
}


@pytest.mark.parametrize("name", sorted(OPT_STATE_CALLS))
@pytest.mark.slow
def test_opt_state_of_the_model_alone_says_how_to_make_it(clf, name):
    model, x, y, optim = clf
    call = OPT_STATE_CALLS[name]
    with pytest.raises(
        ValueError,
        match=r"`opt_state` does not have the structure.*Make it with "
        r"`optim\.init\(\(eqx\.filter\(model, eqx\.is_array\), skip_model\)\)`.*"
        r"made from the model alone",
    ):
        call(model, optim, _model_only_state(model, optim), x, y)
    # Made as the message says, the same call runs, and updates the parameters
    # exactly as optax does with the gradients it reports (make_bp_step: jax.grad).
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    call(model, optim, state, x, y)
    if name == "make_bp_step":
        out = call(model, optim, state, x, y)

        def loss(m):
            return jpc.mse_loss(jpc.init_activities_with_ffwd(m, x)[-1], y)

        grads = eqx.filter_grad(loss)(model)
        updates, _ = optim.update((grads, None), state)
        expected = eqx.apply_updates(model, updates[0])
        assert_trees_close(
            eqx.filter(out["model"], eqx.is_array),
            eqx.filter(expected, eqx.is_array),
            rtol=1e-10,
        )


def test_single_example_hints_at_the_batch_axis(clf):
    model, x, y, optim = clf
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    hint = r"inputs need a leading batch axis: `input\[None\]`"
    with pytest.raises(ValueError, match=hint):
        jpc.make_pc_step(model, optim, state, y[0], input=x[0])
    with pytest.raises(ValueError, match=hint + r", `output\[None\]`"):
        jpc.test_discriminative_pc(model, y[0], x[0])
    with pytest.raises(ValueError, match=hint):
        jpc.make_bp_step(model, optim, state, y[0], input=x[0])
    # With the axis added, the batch of one scores as the first row of the batch.
    loss, acc = jpc.test_discriminative_pc(model, y[0][None], x[0][None])
    prediction = jpc.init_activities_with_ffwd(model, x)[-1][0]
    assert acc == 100.0 * (np.argmax(prediction) == np.argmax(y[0]))
    np.testing.assert_allclose(loss, 0.5 * np.sum((prediction - y[0]) ** 2), rtol=1e-12)
    # A batch whose sizes merely differ gets no such hint.
    with pytest.raises(ValueError, match="same batch size") as info:
        jpc.test_discriminative_pc(model, y[:4], x)
    assert "leading batch axis" not in str(info.value)


def test_swapped_test_arguments_hint_that_labels_come_first(clf):
    model, x, y, _ = clf
    with pytest.raises(ValueError, match=r"labels come first, `test_discriminat"):
        jpc.test_discriminative_pc(model, x, y)
    # Shapes that the swap does not explain get no such hint.
    with pytest.raises(ValueError, match="could not be applied") as info:
        jpc.test_discriminative_pc(model, y, x[:, :4])
    assert "swapped" not in str(info.value)
    # In the right order: the feedforward accuracy, computed here by hand.
    _, acc = jpc.test_discriminative_pc(model, y, x)
    prediction = jpc.init_activities_with_ffwd(model, x)[-1]
    expected = 100.0 * np.mean(np.argmax(prediction, 1) == np.argmax(y, 1))
    assert acc == expected


def test_bpc_bottom_up_model_in_the_wrong_order_names_y(key):
    top_down = jpc.make_mlp(key, 6, 8, 3, 3, act_fn="tanh")
    listed_top_down = jpc.make_mlp(jax.random.PRNGKey(1), 3, 8, 3, 6, act_fn="tanh")
    x, y = np.ones((5, 6)), np.ones((5, 3))
    activities = jpc.init_activities_with_ffwd(top_down, x)
    with pytest.raises(ValueError, match=r"applied to `y` first") as info:
        jpc.bpc_energy_fn(top_down, listed_top_down, activities, y, x=x)
    assert "to `y` of per-example shape (3,)" in str(info.value)
    assert "`x`" not in str(info.value)
    # Listed from the bottom, the same layers work.
    jpc.bpc_energy_fn(top_down, listed_top_down[::-1], activities, y, x=x)


# ------------------------------------------------------- repeated compilation


@pytest.mark.slow
def test_a_new_optimiser_per_step_warns_once_naming_it(clf):
    model, x, y, optim = clf
    step = traced_floats(*ENERGY_FLOATS, "sigma", "beta", "activity_lr")(
        jpc.make_pc_step.__wrapped__
    )
    counter = step.jitted.compilations
    state = optim.init((eqx.filter(model, eqx.is_array), None))
    reused = optax.sgd(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reusing one optimiser never warns
        for _ in range(6):
            step(
                model,
                optim,
                state,
                y,
                input=x,
                activity_optim=reused,
                n_inference_steps=2,
            )
    assert counter.count == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # new plain values are deliberate: no warning
        for n_steps in range(1, 7):
            step(
                model,
                optim,
                state,
                y,
                input=x,
                activity_optim=reused,
                n_inference_steps=n_steps,
            )
    assert counter.count == 6
    with pytest.warns(
        UserWarning, match=r"because `activity_optim` was a new object"
    ) as record:
        for i in range(8):
            step(
                model,
                optim,
                state,
                y,
                input=x,
                activity_optim=optax.sgd(0.1),
                n_inference_steps=2,
            )
            if i < RECOMPILE_WARNING_AFTER - 1:
                assert not record, i  # only after a few compilations
    assert counter.count == 14
    assert len(record) == 1  # once
    assert "create it once before the loop" in str(record[0].message)


def test_opt_states_of_pair_steps_say_how_to_make_them(key):
    td = jpc.make_mlp(key, 6, 8, 3, 3, act_fn="tanh")
    bu = jpc.make_mlp(jax.random.PRNGKey(1), 3, 8, 3, 6, act_fn="tanh")[::-1]
    x, y = np.ones((5, 6)), np.eye(3)[[0, 1, 2, 0, 1]]
    adam = optax.adam(1e-3)

    def alone(model):
        return adam.init(eqx.filter(model, eqx.is_array))

    def pair(model):
        return adam.init((eqx.filter(model, eqx.is_array), None))

    activities = jpc.init_activities_with_ffwd(td, x)
    with pytest.raises(
        ValueError,
        match=r"`bottom_up_opt_state` does not have.*"
        r"`bottom_up_optim\.init\(eqx\.filter\(bottom_up_model, eqx\.is_array\)\)`",
    ):
        jpc.update_bpc_params(
            td, bu, activities, adam, adam, alone(td), pair(bu), y, input=x
        )
    jpc.update_bpc_params(
        td, bu, activities, adam, adam, alone(td), alone(bu), y, input=x
    )
    # Hybrid PC: generator label -> image, amortiser image -> label.
    generator, amortiser = bu[::-1], td
    with pytest.raises(
        ValueError, match=r"`opt_states\[0\]`.*made from the model alone"
    ):
        jpc.make_hpc_step(
            generator, amortiser, (adam, adam), (alone(generator), alone(amortiser)), x
        )
    # Theory of linear networks: a pair, as for make_pc_step.
    linear = jpc.make_mlp(key, 6, 8, 3, 3, act_fn="linear", use_bias=False)
    with pytest.raises(ValueError, match="made from the model alone"):
        jpc.update_linear_equilib_energy_params(
            (linear, None), adam, alone(linear), x, y
        )
