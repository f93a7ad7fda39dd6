"""One optax step on the activities or on the parameters."""

from collections.abc import Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.tree_util as jtu
import optax

from ._checks import check_opt_state, traced_floats
from ._energies import ENERGY_FLOATS, check_energy_inputs, pc_energy_fn, regulariser
from ._grads import _param_value_and_grad, compute_pc_activity_grad
from ._types import Activities, Array, Float, LossId, Params, ParamType, PyTree, Scalar


NAMES = ("loss_id", "output", "input")  # argument names used in error messages


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


def _is_none(node: Any) -> bool:
    return node is None


def _grad_or_zero(leaf: Any, grad: Any) -> Any:
    """`grad` for a floating leaf, zeros of the leaf's dtype for another array."""
    if leaf is None:
        return None
    return grad if grad is not None and eqx.is_inexact_array(leaf) else 0 * leaf


def _made_with_integer_leaves(optim, opt_state, tree) -> bool:
    """Whether `opt_state` was made from every array leaf of `tree`, integers too.

    That is the state of `optim.init(eqx.filter(tree, eqx.is_array))` for a tree
    with integer or boolean leaves (masks, counters); for other trees both filters
    give the same state.
    """
    arrays = eqx.filter(tree, eqx.is_array)
    if jtu.tree_structure(arrays) == jtu.tree_structure(
        eqx.filter(tree, eqx.is_inexact_array)
    ):
        return False
    try:
        floats = jax.eval_shape(optim.init, eqx.filter(tree, eqx.is_inexact_array))
    except Exception:  # leave an optimiser that cannot init these to optax
        return False
    return jtu.tree_structure(floats) != jtu.tree_structure(opt_state)


def _call_update(optim, grads, opt_state, arrays, value, value_fn):
    """`optim.update`, with optax's extra arguments where the caller has them."""
    extra_args = isinstance(optim, optax.GradientTransformationExtraArgs)
    if extra_args and value is not None:
        extra = dict(value=value, grad=grads, value_fn=value_fn)
        return optim.update(grads, opt_state, arrays, **extra)
    try:
        return optim.update(grads, opt_state, arrays)
    except TypeError as err:
        if "required keyword-only argument" not in str(err):
            raise
        raise ValueError(
            f"The optimiser needs extra arguments that this function cannot give "
            f"it ({err}). Transformations such as `optax.lbfgs` (`value`, `grad`, "
            "`value_fn`) and `optax.contrib.reduce_on_plateau` (`value`) are "
            "supported by `jpc.make_pc_step`, `jpc.make_bp_step`, "
            "`jpc.update_pc_activities` and `jpc.update_pc_params`; use e.g. "
            "`optax.adam` here."
        ) from err


def optax_update(
    tree: Any,
    grads: Any,
    optim: optax.GradientTransformation,
    opt_state: Any,
    value: Any = None,
    energy_fn: Any = None,
) -> tuple[Any, Any]:
    """One `optim` step on the floating array leaves of `tree`.

    Shared by every parameter and activity update. Integer and boolean array
    leaves (masks, counters, index buffers) are never updated. `opt_state` may be
    `optim.init(eqx.filter(tree, eqx.is_array))` or
    `optim.init(eqx.filter(tree, eqx.is_inexact_array))`; with the first, the
    entries it keeps for integer leaves see zero gradients and keep their dtypes.

    `value` (the energy or loss at `tree`) and `energy_fn` (it as a function of
    `tree`) are passed on, as optax's `value`, `grad` and `value_fn`, to
    transformations that take extra arguments (`optax.lbfgs`,
    `optax.contrib.reduce_on_plateau`).

    Returns `(tree, opt_state)`.
    """
    keep = eqx.is_inexact_array
    integer_state = _made_with_integer_leaves(optim, opt_state, tree)
    if integer_state:
        keep = eqx.is_array
        grads = jtu.tree_map(
            _grad_or_zero, eqx.filter(tree, keep), grads, is_leaf=_is_none
        )
    arrays, rest = eqx.partition(tree, keep)
    value_fn = None
    if energy_fn is not None:
        value_fn = lambda a: energy_fn(eqx.combine(a, rest))  # noqa: E731
    updates, new_state = _call_update(optim, grads, opt_state, arrays, value, value_fn)
    if integer_state:  # integer leaves: no update, state entries keep their dtype
        updates = jtu.tree_map(
            lambda p, u: u if p is None or eqx.is_inexact_array(p) else 0 * p,
            arrays,
            updates,
            is_leaf=_is_none,
        )
        new_state = jtu.tree_map(
            lambda new, old: new.astype(old.dtype) if eqx.is_array(old) else new,
            new_state,
            opt_state,
        )
    return eqx.combine(optax.apply_updates(arrays, updates), rest), new_state


def activity_step(params, activities, optim, opt_state, y, x, **energy_kwargs):
    """One optimiser step on the activities; shared by the jitted entry points."""
    energy, grads = compute_pc_activity_grad(
        params, activities, y, x=x, **energy_kwargs
    )

    def energy_fn(z):
        return compute_pc_activity_grad(params, z, y, x=x, **energy_kwargs)[0]

    activities, opt_state = optax_update(
        list(activities), grads, optim, opt_state, energy, energy_fn
    )
    return energy, activities, grads, opt_state


def param_step(
    params, activities, optim, opt_state, y, x, network=None, **energy_kwargs
):
    """One optimiser step on `(model, skip_model)` at fixed activities.

    `network`, when given, maps `(model, skip_model)` to the `jpc._packed`
    network that `activities` are laid out for; the gradients are then those of
    the user's layers all the same (the transpose of the stacking).
    """
    loss_id = energy_kwargs.pop("loss_id")

    def packed_energy(p):
        energy = pc_energy_fn(
            (network(p), None), activities, y, x=x, loss=loss_id, **energy_kwargs
        )
        weights = regulariser(
            p[0],
            [],
            energy_kwargs.get("weight_decay", 0.0),
            energy_kwargs.get("spectral_penalty", 0.0),
        )
        return energy + weights

    def value_and_grad(p):
        if network is not None:
            return eqx.filter_value_and_grad(packed_energy)(p)
        return _param_value_and_grad(
            p, activities, y, x=x, loss=loss_id, **energy_kwargs
        )

    energy, grads = value_and_grad(tuple(params))
    (model, skip_model), opt_state = optax_update(
        tuple(params),
        grads,
        optim,
        opt_state,
        energy,
        lambda p: value_and_grad(p)[0],
    )
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
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
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
        hidden_energy_scaling=hidden_energy_scaling,
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
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
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
        hidden_energy_scaling=hidden_energy_scaling,
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
