"""One optax step on the activities or on the parameters."""

from typing import Any, TypedDict

import equinox as eqx
import jax
import optax

from ._checks import check_opt_state, traced_floats
from ._energies import check_energy_inputs
from ._grads import _param_value_and_grad, compute_pc_activity_grad
from ._types import Activities, Array, Float, LossId, Params, ParamType, PyTree, Scalar


NAMES = ("loss_id", "output", "input")  # argument names used in error messages
ENERGY_FLOATS = (
    "weight_decay",
    "spectral_penalty",
    "activity_decay",
    "gamma",
    "output_energy_scaling",
)


class ActivityUpdate(TypedDict):
    """Result of [`jpc.update_pc_activities`][]."""

    energy: Float[Array, ""]
    activities: list[Array]
    grads: list[Array]
    opt_state: optax.OptState


class ParamUpdate(TypedDict):
    """Result of [`jpc.update_pc_params`][]."""

    model: Any
    skip_model: Any
    grads: tuple[PyTree, PyTree]
    opt_state: optax.OptState


def activity_step(params, activities, optim, opt_state, y, x, **energy_kwargs):
    """One optimiser step on the activities; shared by the jitted entry points."""
    energy, grads = compute_pc_activity_grad(
        params, activities, y, x=x, **energy_kwargs
    )
    updates, opt_state = optim.update(grads, opt_state, activities)
    activities = optax.apply_updates(list(activities), updates)
    return energy, activities, grads, opt_state


def param_step(params, activities, optim, opt_state, y, x, **energy_kwargs):
    """One optimiser step on `(model, skip_model)` at fixed activities."""
    loss_id = energy_kwargs.pop("loss_id")
    energy, grads = _param_value_and_grad(
        tuple(params), activities, y, x=x, loss=loss_id, **energy_kwargs
    )
    arrays = eqx.filter(tuple(params), eqx.is_array)
    updates, opt_state = optim.update(grads, opt_state, arrays)
    model, skip_model = eqx.apply_updates(tuple(params), updates)
    return energy, model, skip_model, grads, opt_state


@traced_floats(*ENERGY_FLOATS)
def update_pc_activities(
    params: Params,
    activities: Activities,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
) -> ActivityUpdate:
    """One optax step of inference on the free activities.

    **Arguments:**

    - `params`, `activities`: as for [`jpc.pc_energy_fn`][].
    - `optim`, `opt_state`: an optax optimiser and its state, made with
        `optim.init(activities)`.
    - `output`, `input`: the clamps `y` and `x`.
    - the remaining options are those of [`jpc.pc_energy_fn`][].

    **Returns:**

    A dict with `energy` (before the step), `activities` (after it), `grads` and
    `opt_state`.
    """
    check_energy_inputs(params, activities, output, input, loss_id, param_type, NAMES)
    energy, activities, grads, opt_state = activity_step(
        params,
        activities,
        optim,
        opt_state,
        output,
        input,
        loss_id=loss_id,
        param_type=param_type,
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
    )
    return ActivityUpdate(
        energy=energy, activities=activities, grads=grads, opt_state=opt_state
    )


@traced_floats(*ENERGY_FLOATS)
def update_pc_params(
    params: Params,
    activities: Activities,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
) -> ParamUpdate:
    """One optax step on the parameters at the given (usually inferred) activities.

    **Arguments:**

    - `params`, `activities`: as for [`jpc.pc_energy_fn`][].
    - `optim`, `opt_state`: an optax optimiser and its state, made with
        `optim.init((eqx.filter(model, eqx.is_array), skip_model))`.
    - `output`, `input`: the clamps `y` and `x`.
    - the remaining options are those of [`jpc.pc_energy_fn`][].

    **Returns:**

    A dict with the updated `model` and `skip_model`, the `grads`
    `(model_grads, skip_model_grads)` and the new `opt_state`.
    """
    check_energy_inputs(params, activities, output, input, loss_id, param_type, NAMES)
    check_opt_state(optim, opt_state, tuple(params))
    _, model, skip_model, grads, opt_state = param_step(
        params,
        activities,
        optim,
        opt_state,
        output,
        input,
        loss_id=loss_id,
        param_type=param_type,
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
    )
    return ParamUpdate(
        model=model, skip_model=skip_model, grads=grads, opt_state=opt_state
    )


def discrete_inference(
    params, activities, optim, n_steps: int, y, x, record: bool, **energy_kwargs
):
    """`n_steps` optax steps on the activities inside one `lax.scan`.

    The optimiser state is initialised here, from `activities`. Returns the final
    activities and, if `record`, the trajectory (one row per step) else `None`.
    """
    activities = list(activities)

    def step(carry, _):
        z, state = carry
        _, z, _, state = activity_step(params, z, optim, state, y, x, **energy_kwargs)
        return (z, state), (z if record else None)

    init = (activities, optim.init(activities))
    (final, _), trajectory = jax.lax.scan(step, init, length=n_steps)
    return final, trajectory
