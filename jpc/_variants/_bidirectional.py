r"""Bidirectional predictive coding, bPC (Oliviers, Tang & Bogacz 2025).

Two networks share one set of activities $z_0 = x, z_1, \dots, z_H, z_{H+1} = y$
($H$ hidden layers): the top-down model $f$ predicts each activity from the one
below, the bottom-up model $g$ each activity from the one above. Entry $j$ of
`top_down_model` maps $z_j \to z_{j+1}$; entry $j$ of `bottom_up_model` maps
$z_{j+1} \to z_j$ (so entry 0 predicts $x$ from $z_1$ and the last entry predicts
$z_H$ from $y$). The energy is

$$\mathcal{F} = \frac{1}{B}\sum_i \sum_{j=0}^{H}\Big[\frac{\alpha_f
\kappa_{j+1}}{2}\lVert z_{j+1,i} - a_{j+1} f_j(z_{j,i}) - s_j(z_{j,i})\rVert^2
+ \frac{\alpha_b \kappa_j}{2}\lVert z_{j,i} - g_j(z_{j+1,i})
- \tilde s_j(z_{j+1,i})\rVert^2\Big],$$

with $\tilde s_j = s_j$ for $1 \le j \le H - 1$ (each skip also acts downwards) and
$0$ otherwise. The layer precisions $\kappa_1, \dots, \kappa_H$ weight both
prediction errors of hidden layer $l$ (the two clamped ends have $\kappa_0 =
\kappa_{H+1} = 1$; all are 1 by default). The first sum is $\alpha_f$ times the
standard PC energy of the top-down model with precisions $\kappa_l$; the second is
$\alpha_b$ times the standard PC energy of the reversed bottom-up model (input $y$,
target $x$, with the skips $\tilde s$ and the precisions in reverse order), which is
how it is computed here.
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import (
    PARAM_TYPES,
    check_batch,
    check_model,
    check_opt_state,
    check_option,
    check_sequence,
    traced_floats,
)
from .._energies import check_hidden_scaling, hidden_precisions, layer_energies
from .._layers import predict
from .._types import (
    Activities,
    Array,
    Float,
    Model,
    ParamType,
    PyTree,
    Scalar,
    SkipModel,
)
from ._common import check_optim, optax_update


BPC_FLOATS = ("backward_energy_weight", "forward_energy_weight")
_FLOATS = (*BPC_FLOATS, "hidden_energy_scaling")  # those of the bPC updates


class BPCActivityUpdate(TypedDict):
    """Result of [`jpc.update_bpc_activities`][]."""

    energy: Float[Array, ""]
    activities: list[Array]
    grads: list[Array]
    opt_state: optax.OptState


class BPCParamUpdate(TypedDict):
    """Result of [`jpc.update_bpc_params`][]: pairs `(top_down, bottom_up)`."""

    models: tuple[Any, Any]
    grads: tuple[PyTree, PyTree]
    opt_states: tuple[optax.OptState, optax.OptState]


def _check_bpc_inputs(top_down_model, bottom_up_model, activities, y, x, skip_model):
    check_model(top_down_model, skip_model)
    check_model(bottom_up_model)
    if len(bottom_up_model) != len(top_down_model):
        raise ValueError(
            "`bottom_up_model` must have one layer per layer of `top_down_model` "
            f"({len(top_down_model)}), got {len(bottom_up_model)}."
        )
    check_sequence("activities", activities)
    n_free = len(top_down_model) - 1 if x is not None else len(top_down_model)
    if len(activities) not in (n_free, n_free + 1):
        layout = "[z_1, ..., z_H]" if x is not None else "[z_0, z_1, ..., z_H]"
        raise ValueError(
            f"`activities` must have {n_free} entries {layout} for "
            f"{len(top_down_model)}-layer models, or {n_free + 1} with a trailing "
            f"output slot, got {len(activities)}."
        )
    check_batch(y, x, activities)


def _check_first_bottom_up_layer(layer, y, index) -> None:
    """Name `y` when the layer applied to it (the last one) does not fit it."""
    try:
        jax.eval_shape(lambda z: predict(layer, None, 1.0, z, "y"), y)
    except ValueError as err:
        raise ValueError(
            f"`bottom_up_model` runs from `y` down to the bottom activity, so its "
            f"last entry, `bottom_up_model[{index}]`, is applied to `y` first: "
            f"{err} Check the order of the bottom-up layers."
        ) from err


def with_output_slot(top_down_model, activities, y, x) -> list:
    """`activities` with the never-read output slot (filled with `y` if absent)."""
    n_free = len(top_down_model) - 1 if x is not None else len(top_down_model)
    activities = list(activities)
    return activities if len(activities) == n_free + 1 else [*activities, y]


def bottom_up_skips(skip_model, n_layers: int) -> list | None:
    """Skips of the bottom-up model, in its order: entry `j` (predicting hidden
    `z_j` from `z_{j+1}`, `1 <= j <= H - 1`) reuses `skip_model[j]`, the skip from
    `z_j` up into `z_{j+1}`."""
    if skip_model is None:
        return None
    return [skip_model[j] if 1 <= j <= n_layers - 2 else None for j in range(n_layers)]


def _backward_energies(
    bottom_up_model, activities, y, x, param_type, skip_model=None, kappa=None
) -> list:
    """Bottom-up energies in `bottom_up_model` order (entry 0 first); `kappa`
    is `hidden_energy_scaling` in the top-down (layer) order."""
    bottom = x if x is not None else activities[0]
    hidden = activities[:-1] if x is not None else activities[1:-1]
    reversed_model = list(bottom_up_model)[::-1]
    skips = bottom_up_skips(skip_model, len(bottom_up_model))
    reversed_skips = None if skips is None else skips[::-1]
    # The reversed model runs y -> z_H -> ... -> z_1 -> bottom; its last activity
    # slot is never read, so `bottom` fills it.
    reversed_activities = [*hidden[::-1], bottom]
    if kappa is not None:  # hidden layer l is term H - l of the reversed model
        kappa = hidden_precisions(kappa, len(hidden))[::-1]
    _check_first_bottom_up_layer(reversed_model[0], y, len(reversed_model) - 1)
    try:
        energies = layer_energies(
            (reversed_model, reversed_skips),
            reversed_activities,
            bottom,
            y,
            "mse",
            param_type,
            hidden_energy_scaling=kappa,
        )
    except ValueError as err:
        raise ValueError(
            f"`bottom_up_model`, applied from `y` down to the bottom activity: {err}"
        ) from err
    return energies[::-1]


@traced_floats(*_FLOATS)
def bpc_energy_fn(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    record_layers: bool = False,
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> Float[Array, ""] | Float[Array, "2 layers"]:
    r"""Batch-mean bidirectional PC energy.

    See the module description for the formula: $\alpha_f$ (`forward_energy_weight`)
    times the top-down prediction errors, output term included, plus $\alpha_b$
    (`backward_energy_weight`) times the bottom-up prediction errors, input term
    included; every term is $\frac12\lVert\cdot\rVert^2$ divided by `B`.

    **Arguments:**

    - `top_down_model`: `H + 1` layers, `x → z_1 → … → z_H → y`.
    - `bottom_up_model`: `H + 1` layers listed from the bottom: entry 0 predicts
        `x` from `z_1`, entry `j` predicts `z_j` from `z_{j+1}`, the last predicts
        `z_H` from `y`.
    - `activities`: the hidden activities `[z_1, ..., z_H]` (supervised) or
        `[z_0, z_1, ..., z_H]` (unsupervised, `x=None`: the bottom activity `z_0`
        is free and both networks' terms reach it), optionally followed by an
        output slot that is never read (both layouts give the same energy; the
        output term always uses $z_H$).
    - `y`: target clamping the top; `x`: input clamping the bottom, or `None`.
    - `skip_model`: optional skips, used in both directions: entry `j` adds
        $s_j(z_j)$ to the top-down prediction of $z_{j+1}$ (as in PC) and, for
        $1 \le j \le H - 1$, $s_j(z_{j+1})$ to the bottom-up prediction of
        $z_j$.
    - `param_type`: parameterisation of both networks, each with its own input
        (`x` for the top-down, `y` for the bottom-up model).
    - `record_layers`: return the weighted per-layer energies instead of the sum.
    - `backward_energy_weight`, `forward_energy_weight`: $\alpha_b$, $\alpha_f$.
    - `hidden_energy_scaling`: layer precisions $\kappa_l$ of the hidden layers
        $z_1, \dots, z_H$, each weighting both the top-down and the bottom-up
        error of its layer: `None` (every $\kappa_l = 1$), one number for every
        hidden layer, or one value per hidden layer (a sequence or array of
        length `H`, bottom to top), as for [`jpc.pc_energy_fn`][]; traced. With
        `backward_energy_weight=0` the energy is $\alpha_f$ times that of
        [`jpc.pc_energy_fn`][] for the top-down model with the same $\kappa_l$.

    **Returns:**

    A scalar; with `record_layers=True` the flat array of the JPC library's
    layout, `2 (H + 1)` weighted terms each divided by `B`: `[E_td(y), E_bu(x),
    E_td(z_1), E_bu(z_1), ..., E_td(z_H), E_bu(z_H)]`, where `E_td(z_l)` is the
    top-down error of $z_l$ (times $\alpha_f$) and `E_bu(z_l)` its bottom-up error
    (times $\alpha_b$); the entries sum to the energy.

    **Raises:**

    `ValueError` for an unknown `param_type`, models of different lengths, a wrong
    number of activities, batch and feature sizes that do not fit, or a
    `hidden_energy_scaling` of the wrong length or with a value that is not
    finite and positive; `TypeError` for a `hidden_energy_scaling` that is not a
    number or a sequence of numbers.
    """
    check_option("param_type", param_type, PARAM_TYPES)
    _check_bpc_inputs(top_down_model, bottom_up_model, activities, y, x, skip_model)
    check_hidden_scaling(hidden_energy_scaling, top_down_model)
    activities = with_output_slot(top_down_model, activities, y, x)
    forward = layer_energies(
        (top_down_model, skip_model),
        activities,
        y,
        x,
        "mse",
        param_type,
        hidden_energy_scaling=hidden_energy_scaling,
    )
    backward = _backward_energies(
        bottom_up_model,
        activities,
        y,
        x,
        param_type,
        skip_model,
        hidden_energy_scaling,
    )
    if record_layers:
        forward = [forward_energy_weight * e for e in forward]
        backward = [backward_energy_weight * e for e in backward]
        pairs = zip(forward[:-1], backward[1:])
        return jnp.stack(
            [forward[-1], backward[0], *(e for pair in pairs for e in pair)]
        )
    return forward_energy_weight * sum(forward) + backward_energy_weight * sum(backward)


@traced_floats(*_FLOATS)
def compute_bpc_activity_grad(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[Float[Array, ""], list[Array]]:
    """Energy and its gradient with respect to the activities.

    Arguments as for [`jpc.bpc_energy_fn`][]. The energy is a batch mean, so
    per-example gradients carry a factor `1/B`.

    **Returns:**

    `(energy, grads)`, `grads` a list like `activities` (zero for the slot).
    """
    return jax.value_and_grad(bpc_energy_fn, argnums=2)(
        top_down_model,
        bottom_up_model,
        list(activities),
        y,
        x=x,
        skip_model=skip_model,
        param_type=param_type,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        hidden_energy_scaling=hidden_energy_scaling,
    )


def _models_value_and_grad(top_down_model, bottom_up_model, activities, y, **kwargs):
    def energy(models):
        return bpc_energy_fn(*models, activities, y, **kwargs)

    return eqx.filter_value_and_grad(energy)((top_down_model, bottom_up_model))


@traced_floats(*_FLOATS)
def compute_bpc_param_grads(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[PyTree, PyTree]:
    """Gradients of the bPC energy with respect to both models' parameters.

    Arguments as for [`jpc.bpc_energy_fn`][].

    **Returns:**

    `(top_down_grads, bottom_up_grads)`, shaped like the models (`None` where a
    leaf is not an array). The skip model is not trained.
    """
    return _models_value_and_grad(
        top_down_model,
        bottom_up_model,
        list(activities),
        y,
        x=x,
        skip_model=skip_model,
        param_type=param_type,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        hidden_energy_scaling=hidden_energy_scaling,
    )[1]


@traced_floats(*_FLOATS)
def update_bpc_activities(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> BPCActivityUpdate:
    """One optax step of bPC inference on the activities.

    **Arguments:**

    - `top_down_model`, `bottom_up_model`, `activities`, `skip_model`,
        `param_type`, the weights, `hidden_energy_scaling`: as for
        [`jpc.bpc_energy_fn`][].
    - `optim`, `opt_state`: optimiser and its state, `optim.init(activities)`.
    - `output`, `input`: the clamps `y` and `x`.

    **Returns:**

    A dict with `energy` (before the step), `activities` (after it), `grads` and
    `opt_state`.
    """
    check_batch(output, input, [], y_name="output", x_name="input")
    energy, grads = compute_bpc_activity_grad(
        top_down_model,
        bottom_up_model,
        activities,
        output,
        x=input,
        skip_model=skip_model,
        param_type=param_type,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        hidden_energy_scaling=hidden_energy_scaling,
    )
    activities, opt_state = optax_update(list(activities), grads, optim, opt_state)
    return BPCActivityUpdate(
        energy=energy, activities=activities, grads=grads, opt_state=opt_state
    )


@traced_floats(*_FLOATS)
def update_bpc_params(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    top_down_optim: optax.GradientTransformation,
    bottom_up_optim: optax.GradientTransformation,
    top_down_opt_state: optax.OptState,
    bottom_up_opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    skip_model: SkipModel = None,
    param_type: ParamType = "sp",
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> BPCParamUpdate:
    """One optax step on both models at the given (inferred) activities.

    **Arguments:**

    - `top_down_model`, `bottom_up_model`, `activities`, `skip_model`,
        `param_type`, the weights, `hidden_energy_scaling`: as for
        [`jpc.bpc_energy_fn`][].
    - `top_down_optim`, `bottom_up_optim`: the two optimisers.
    - `top_down_opt_state`, `bottom_up_opt_state`: their states, each
        `optim.init(eqx.filter(that_model, eqx.is_array))`.
    - `output`, `input`: the clamps `y` and `x`.

    **Returns:**

    A dict with `models`, `grads` and `opt_states`, each a pair `(top_down,
    bottom_up)`.

    **Raises:**

    `TypeError` if an optimiser is not an `optax.GradientTransformation`;
    `ValueError` as [`jpc.bpc_energy_fn`][].
    """
    check_batch(output, input, [], y_name="output", x_name="input")
    optims = (top_down_optim, bottom_up_optim)
    opt_states = (top_down_opt_state, bottom_up_opt_state)
    for name, optim in zip(("top_down_optim", "bottom_up_optim"), optims):
        check_optim(name, optim)
    for which, model, optim, opt_state in zip(
        ("top_down", "bottom_up"), (top_down_model, bottom_up_model), optims, opt_states
    ):
        how = f"{which}_optim.init(eqx.filter({which}_model, eqx.is_array))"
        check_opt_state(optim, opt_state, model, f"{which}_opt_state", how)
    _, grads = _models_value_and_grad(
        top_down_model,
        bottom_up_model,
        list(activities),
        output,
        x=input,
        skip_model=skip_model,
        param_type=param_type,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        hidden_energy_scaling=hidden_energy_scaling,
    )
    models, states = zip(
        *(
            optax_update(model, g, optim, state)
            for model, g, optim, state in zip(
                (top_down_model, bottom_up_model), grads, optims, opt_states
            )
        )
    )
    return BPCParamUpdate(models=tuple(models), grads=grads, opt_states=tuple(states))
