"""Gradients of the PC energy with respect to activities and parameters."""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from diffrax import AbstractStepSizeController

from ._checks import traced_floats
from ._energies import ENERGY_FLOATS, check_energy_inputs, pc_energy_fn
from ._types import Activities, Array, Float, LossId, Params, ParamType, PyTree, Scalar


_NAMES = ("loss_id", "y", "x")  # argument names used in error messages


@traced_floats(*ENERGY_FLOATS)
def compute_pc_activity_grad(
    params: Params,
    activities: Activities,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[Float[Array, ""], list[Array]]:
    r"""Energy and its gradient $\partial\mathcal{F}/\partial z_l$.

    Arguments as for [`jpc.pc_energy_fn`][] (`loss_id` is its `loss`).

    !!! note
        The energy is a batch mean, so each example's activity gradient carries a
        factor $1/B$.

    **Returns:**

    `(energy, grads)`; `grads` is a list like `activities`, zero for the last
    (clamped, never read) entry.
    """
    check_energy_inputs(params, activities, y, x, loss_id, param_type, _NAMES)
    return jax.value_and_grad(pc_energy_fn, argnums=1)(
        params,
        activities,
        y,
        x=x,
        loss=loss_id,
        param_type=param_type,
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )


@traced_floats(*ENERGY_FLOATS)
def compute_pc_param_grads(
    params: Params,
    activities: Activities,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    weight_decay: Scalar = 0.0,
    spectral_penalty: Scalar = 0.0,
    activity_decay: Scalar = 0.0,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[PyTree, PyTree]:
    r"""Gradient $\partial\mathcal{F}/\partial\theta$ at the given activities.

    Arguments as for [`jpc.pc_energy_fn`][] (`loss_id` is its `loss`).

    **Returns:**

    `(model_grads, skip_model_grads)`, shaped like `(model, skip_model)` with
    `None` wherever a leaf is not an array.
    """
    check_energy_inputs(params, activities, y, x, loss_id, param_type, _NAMES)
    return _param_value_and_grad(
        params,
        activities,
        y,
        x=x,
        loss=loss_id,
        param_type=param_type,
        weight_decay=weight_decay,
        spectral_penalty=spectral_penalty,
        activity_decay=activity_decay,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )[1]


def _param_value_and_grad(params, activities, y, **energy_kwargs):
    def energy(p):
        return pc_energy_fn(p, activities, y, **energy_kwargs)

    return eqx.filter_value_and_grad(energy)(params)


VECTOR_FIELD_ARGS = (
    "params",
    "y",
    "x",
    "loss_id",
    "param_type",
    "weight_decay",
    "spectral_penalty",
    "activity_decay",
    "gamma",
    "output_energy_scaling",
    "hidden_energy_scaling",
)


def vector_field_args(params, y, x, **energy_kwargs) -> tuple:
    """The `args` tuple of [`jpc.neg_pc_activity_grad`][] from keyword options."""
    return (params, y, x, *(energy_kwargs.get(n) for n in VECTOR_FIELD_ARGS[3:]))


def unpack_vector_field_args(args: tuple) -> dict[str, Any]:
    """Keyword arguments of the energy from the `args` tuple of the vector field."""
    if not isinstance(args, tuple) or len(args) not in (8, 10, 11, 12):
        raise ValueError(
            "`args` must be `(params, y, x, loss_id, param_type, weight_decay, "
            "spectral_penalty, activity_decay[, gamma, output_energy_scaling"
            "[, hidden_energy_scaling][, stepsize_controller]])`, got "
            f"{type(args).__name__} {args!r:.80}."
        )
    # The JPC library's forms end with the step-size controller, which the vector
    # field does not use.
    args = tuple(a for a in args if not isinstance(a, AbstractStepSizeController))
    n = len(VECTOR_FIELD_ARGS)
    return dict(zip(VECTOR_FIELD_ARGS, args + (None,) * (n - len(args))))


def neg_pc_activity_grad(t: Any, activities: Activities, args: tuple) -> list[Array]:
    r"""Vector field $-\partial\mathcal{F}/\partial z$ of inference, for diffrax.

    **Arguments:**

    - `t`: time (unused; the field is autonomous).
    - `activities`: current activities.
    - `args`: `(params, y, x, loss_id, param_type, weight_decay, spectral_penalty,
        activity_decay)`, optionally followed by `gamma, output_energy_scaling`,
        then `hidden_energy_scaling`, and then a step-size controller (the JPC
        library's forms; the controller is ignored here).

    **Returns:**

    The negative activity gradient, a list like `activities`.
    """
    kwargs = unpack_vector_field_args(args)
    params, y = kwargs.pop("params"), kwargs.pop("y")
    _, grads = compute_pc_activity_grad(params, activities, y, **kwargs)
    return jtu.tree_map(lambda g: -g, grads)
