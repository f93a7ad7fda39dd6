r"""Error-based predictive coding, ePC (Goemaere et al. 2025).

The free variables are the hidden prediction errors $\varepsilon_l$ instead of the
activities: a forward pass adds $\varepsilon_l$ to each hidden layer's prediction,

$$z_l = a_l f_l(z_{l-1}) + s_l(z_{l-1}) + \varepsilon_l \quad (l < L), \qquad
\hat y = a_L f_L(z_{L-1}) + s_L(z_{L-1}),$$

and the energy is $\frac{1}{B}\sum_i\big[\sum_{l<L}\frac{\kappa_l}{2}\lVert
\varepsilon_{l,i}\rVert^2 + \lambda\,\ell(\hat y_i, y_i)\big]$, with the hidden
precisions $\kappa_l$ and output precision $\lambda$ of standard PC (all 1 by
default). The output has no free error, so the energy cannot collapse to zero (the
JPC library's ePC leaves it free): the map $\varepsilon \mapsto z$ is a bijection
onto the activities of standard PC, under which the two energies agree, so both
reach the same equilibrium energy.
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import (
    LOSSES,
    MODES,
    PARAM_TYPES,
    check_batch,
    check_model,
    check_opt_state,
    check_option,
    check_sequence,
    traced_floats,
)
from .._energies import check_hidden_scaling, hidden_precisions
from .._init import _as_shape
from .._layers import check_output, get_param_scalings, predict, skip_at
from .._types import Array, Float, LossId, Mode, Params, ParamType, PyTree, Scalar
from .._utils import LOSS_FNS
from ._common import optax_update


EPC_FLOATS = ("gamma", "output_energy_scaling", "hidden_energy_scaling")


class ErrorUpdate(TypedDict):
    """Result of [`jpc.update_epc_errors`][]."""

    energy: Float[Array, ""]
    errors: list[Array]
    grads: list[Array]
    opt_state: optax.OptState


class EPCParamUpdate(TypedDict):
    """Result of [`jpc.update_epc_params`][]."""

    model: Any
    skip_model: Any
    grads: tuple[PyTree, PyTree]
    opt_state: optax.OptState


def init_epc_errors(
    layer_sizes: Sequence[int | Sequence[int]],
    batch_size: int,
    mode: Mode = "supervised",
) -> list[Float[Array, "batch ..."]]:
    """Zero initial errors for ePC (the state of a feedforward pass).

    **Arguments:**

    - `layer_sizes`: per-example sizes `[d_0, d_1, ..., d_L]` of every layer,
        input (or latent) and output included, as for
        [`jpc.init_activities_from_normal`][].
    - `batch_size`: leading batch size `B`.
    - `mode`: `"supervised"` or `"unsupervised"`.

    **Returns:**

    `len(layer_sizes) - 1` zero arrays, as in the JPC library. Supervised:
    `[ε_1, ..., ε_{L-1}, slot]`, one `(B, d_l)` array per hidden layer, then a
    `(B, d_L)` output slot that the energy never reads and whose gradient is
    always zero: the output error stays clamped (no free output error, so the
    energy cannot collapse to zero). Unsupervised: `[z_0, ε_1, ..., ε_{L-1}]`,
    whose first entry is the free latent $z_0$ itself (not an error, and not
    penalised by the energy, exactly as standard PC puts no prior on $z_0$), also
    initialised to zero; replace it with a random draw if zero is a degenerate
    starting point for your network. Every ePC function accepts these lists with
    or without a trailing output slot.

    **Raises:**

    `ValueError` for an unknown `mode`, a non-positive `batch_size` or fewer than
    two layer sizes.
    """
    check_option("mode", mode, MODES)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer, got {batch_size!r}."
        )
    check_sequence("layer_sizes", layer_sizes)
    if len(layer_sizes) < 2:
        raise ValueError(
            "`layer_sizes` must list the input and output sizes at least, got "
            f"{layer_sizes!r}."
        )
    sizes = layer_sizes[1:] if mode == "supervised" else layer_sizes[:-1]
    return [jnp.zeros((batch_size, *_as_shape(size))) for size in sizes]


def _split_errors(model, errors, x):
    """`(z_0, hidden_errors, name of z_0)`; unsupervised, `z_0` is `errors[0]`.

    A trailing output slot (one entry more than the hidden errors) is dropped: it
    is never read, so its gradient is zero.
    """
    check_sequence("errors", errors)
    expected = len(model) - 1 if x is not None else len(model)
    if len(errors) not in (expected, expected + 1):
        layout = "[ε_1..ε_{L-1}]" if x is not None else "[z_0, ε_1..ε_{L-1}]"
        raise ValueError(
            f"`errors` must have {expected} entries {layout} for a {len(model)}-layer "
            f"model, or {expected + 1} with a trailing output slot, got "
            f"{len(errors)}."
        )
    errors = list(errors[:expected])
    if x is not None:
        return x, list(errors), "x"
    return errors[0], list(errors[1:]), "errors[0]"


def _check_params(params) -> None:
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise TypeError(
            "`params` must be the pair `(model, skip_model)`, got "
            f"{type(params).__name__}."
        )


def perturbed_forward(model, skip_model, scalings, z0, errors, name) -> Array:
    """Output of the forward pass that adds `errors[l - 1]` to hidden layer `l`."""
    z = z0
    for i, error in enumerate([*errors, None]):
        z = predict(model[i], skip_at(skip_model, i), scalings[i], z, name)
        if error is not None:
            if jnp.shape(error) != z.shape:
                raise ValueError(
                    f"The error of hidden layer {i + 1} has shape {jnp.shape(error)} "
                    f"but `model[{i}]` predicts shape {z.shape}."
                )
            z = z + error
        name = f"the output of model[{i}]"
    return z


@traced_floats(*EPC_FLOATS)
def epc_energy_fn(
    params: Params,
    errors: Sequence[Float[Array, "batch ..."]],
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss: LossId = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> Float[Array, ""]:
    r"""Batch-mean ePC energy.

    $$\mathcal{F}(\varepsilon) = \frac{1}{B}\sum_i\Big[\sum_{l<L}\frac{\kappa_l}{2}
    \lVert\varepsilon_{l,i}\rVert^2 + \lambda\,\ell(\hat y_i(\varepsilon), y_i)\Big],$$

    where $\hat y(\varepsilon)$ is the output of the forward pass that adds
    $\varepsilon_l$ to hidden layer $l$. At $\varepsilon = 0$ this is the loss of
    the feedforward pass. At the errors of the activities $z$ of standard PC
    ($\varepsilon_l$ = the prediction error of $z_l$) it equals
    [`jpc.pc_energy_fn`][] with the same $\lambda$ and $\kappa_l$.

    **Arguments:**

    - `params`: `(model, skip_model)`.
    - `errors`: `[ε_1, ..., ε_{L-1}]` (supervised) or `[z_0, ε_1, ..., ε_{L-1}]`
        (unsupervised), optionally followed by an output slot that is never read
        (see [`jpc.init_epc_errors`][]).
    - `y`: target clamping the output.
    - `x`: input; `None` for unsupervised (the latent is then `errors[0]`).
    - `loss`: `"mse"` or `"ce"` output term $\ell$.
    - `param_type`, `gamma`: parameterisation (see [`jpc.get_param_scalings`][]).
    - `output_energy_scaling`: output precision $\lambda$ (default 1).
    - `hidden_energy_scaling`: hidden precisions $\kappa_l$: `None` (every
        $\kappa_l = 1$), one number for every hidden error, or one value per
        hidden error (a sequence or array of length `L - 1`, layer order), as for
        [`jpc.pc_energy_fn`][]. Traced: a new value does not recompile.

    **Returns:**

    The scalar energy.

    **Raises:**

    `ValueError` for an unknown `loss`/`param_type`, a wrong number of errors,
    batch or feature sizes that do not fit the model, or a
    `hidden_energy_scaling` of the wrong length or with a value that is not
    finite and positive; `TypeError` for a `hidden_energy_scaling` that is not a
    number or a sequence of numbers.
    """
    check_option("loss", loss, LOSSES)
    check_option("param_type", param_type, PARAM_TYPES)
    _check_params(params)
    model, skip_model = params
    check_model(model, skip_model)
    check_hidden_scaling(hidden_energy_scaling, model)
    z0, hidden, name = _split_errors(model, errors, x)
    check_batch(y, x, [])
    for i, e in enumerate(errors):
        if jnp.ndim(e) == 0 or jnp.shape(e)[0] != y.shape[0]:
            raise ValueError(
                f"`errors[{i}]` must have batch size {y.shape[0]} like `y`, got shape "
                f"{jnp.shape(e)}."
            )
    scalings = get_param_scalings(
        model, z0, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    prediction = perturbed_forward(model, skip_model, scalings, z0, hidden, name)
    check_output(y, prediction)
    output_energy = LOSS_FNS[loss](prediction, y)
    if output_energy_scaling is not None:
        output_energy = output_energy_scaling * output_energy
    kappas = hidden_precisions(hidden_energy_scaling, len(hidden))
    squares = [0.5 * jnp.sum(e**2) for e in hidden]
    weighted = [sq if k is None else k * sq for sq, k in zip(squares, kappas)]
    return sum(weighted) / y.shape[0] + output_energy


@traced_floats(*EPC_FLOATS)
def compute_epc_error_grad(
    params: Params,
    errors: Sequence[Float[Array, "batch ..."]],
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[Float[Array, ""], list[Array]]:
    """Energy and its gradient with respect to the errors.

    Arguments as for [`jpc.epc_energy_fn`][] (`loss_id` is its `loss`). Like every
    energy here it is a batch mean, so per-example gradients carry a factor `1/B`.

    **Returns:**

    `(energy, grads)`, `grads` a list like `errors`.
    """
    check_option("loss_id", loss_id, LOSSES)
    return jax.value_and_grad(epc_energy_fn, argnums=1)(
        params,
        list(errors),
        y,
        x=x,
        loss=loss_id,
        param_type=param_type,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )


def _param_value_and_grad(params, errors, y, **kwargs):
    return eqx.filter_value_and_grad(lambda p: epc_energy_fn(p, errors, y, **kwargs))(
        tuple(params)
    )


@traced_floats(*EPC_FLOATS)
def compute_epc_param_grads(
    params: Params,
    errors: Sequence[Float[Array, "batch ..."]],
    y: Float[Array, "batch ..."],
    *,
    x: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[PyTree, PyTree]:
    """Gradient of the ePC energy with respect to `(model, skip_model)`.

    Arguments as for [`jpc.epc_energy_fn`][] (`loss_id` is its `loss`).

    **Returns:**

    `(model_grads, skip_model_grads)`, `None` wherever a leaf is not an array.
    """
    check_option("loss_id", loss_id, LOSSES)
    return _param_value_and_grad(
        params,
        list(errors),
        y,
        x=x,
        loss=loss_id,
        param_type=param_type,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )[1]


@traced_floats(*EPC_FLOATS)
def update_epc_errors(
    params: Params,
    errors: Sequence[Float[Array, "batch ..."]],
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> ErrorUpdate:
    """One optax step of ePC inference on the errors.

    **Arguments:**

    - `params`, `errors`: as for [`jpc.epc_energy_fn`][].
    - `optim`, `opt_state`: optimiser and its state, `optim.init(errors)`.
    - `output`, `input`: the clamps `y` and `x`.
    - `loss_id`, `param_type`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: energy options (see [`jpc.epc_energy_fn`][];
        floats traced).

    **Returns:**

    A dict with `energy` (before the step), `errors` (after it), `grads` and
    `opt_state`.
    """
    check_batch(output, input, [], y_name="output", x_name="input")
    check_option("loss_id", loss_id, LOSSES)
    energy, grads = compute_epc_error_grad(
        params,
        errors,
        output,
        x=input,
        loss_id=loss_id,
        param_type=param_type,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )
    errors, opt_state = optax_update(list(errors), grads, optim, opt_state)
    return ErrorUpdate(energy=energy, errors=errors, grads=grads, opt_state=opt_state)


@traced_floats(*EPC_FLOATS)
def update_epc_params(
    params: Params,
    errors: Sequence[Float[Array, "batch ..."]],
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    *,
    input: Float[Array, "batch ..."] | None = None,
    loss_id: LossId = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> EPCParamUpdate:
    """One optax step on `(model, skip_model)` at the given (inferred) errors.

    **Arguments:**

    - `params`, `errors`: as for [`jpc.epc_energy_fn`][].
    - `optim`, `opt_state`: optimiser and its state, made as for
        [`jpc.make_pc_step`][]: `optim.init((eqx.filter(model, eqx.is_array),
        skip_model))`.
    - `output`, `input`: the clamps `y` and `x`.
    - `loss_id`, `param_type`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: energy options (see [`jpc.epc_energy_fn`][];
        floats traced).

    **Returns:**

    A dict with the updated `model` and `skip_model`, the `grads` and `opt_state`.
    """
    check_batch(output, input, [], y_name="output", x_name="input")
    check_option("loss_id", loss_id, LOSSES)
    check_opt_state(optim, opt_state, tuple(params))
    _, grads = _param_value_and_grad(
        params,
        list(errors),
        output,
        x=input,
        loss=loss_id,
        param_type=param_type,
        gamma=gamma,
        output_energy_scaling=output_energy_scaling,
        hidden_energy_scaling=hidden_energy_scaling,
    )
    (model, skip_model), opt_state = optax_update(
        tuple(params), grads, optim, opt_state
    )
    return EPCParamUpdate(
        model=model, skip_model=skip_model, grads=grads, opt_state=opt_state
    )
