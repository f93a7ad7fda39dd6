r"""Predictive dendrites, PDM: bidirectional PC with layer-local energies.

The networks are those of bidirectional PC ([`jpc.bpc_energy_fn`][]): a top-down
model $f$ (entry $j$ maps $z_j \to z_{j+1}$) and a bottom-up model $g$ (entry $j$
maps $z_{j+1} \to z_j$), $H$ hidden layers, $z_0 = x$ and $z_{H+1} = y$. Each
hidden layer $l$ has a forward and a backward error,

$$e_l = z_l - a_l f_l(z_{l-1}) - s_l(z_{l-1}), \qquad
\delta_l = z_l - \phi_l\big(b_l V_l z_{l+1} + s_{l+1}(z_{l+1}) + A_l z_l\big),$$

($s_l$ only for $l \ge 2$, $s_{l+1}$ only for $l \le H - 1$, $A_l$ an optional
lateral layer), and its own local energy
$F_l = \frac1B\sum_i\big[\frac{\alpha_f}{2}\lVert e_l\rVert^2 +
\frac{\alpha_b}{2}\lVert\delta_l\rVert^2\big]$, optionally mixed with the
neighbours' errors. Inference moves each $z_l$ down its **own** $F_l$ only, as a
dendritic compartment that sees the errors arriving at its neuron; learning
descends the sum $\sum_l F_l$. The bottom-up map moves the activation to after the
linear map: for a bottom-up layer `Sequential([Lambda(φ), Linear])` (the
[`jpc.make_mlp`][] layout) $V_l$ is its `Linear` and $\phi_l$ its `Lambda`.
"""

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import PARAM_TYPES, check_batch, check_option, traced_floats
from .._layers import _matrix, batched, get_param_scalings, predict, skip_at
from .._types import Activities, Array, Float, Model, ParamType, PyTree, Scalar
from ._bidirectional import (
    BPC_FLOATS,
    _check_bpc_inputs,
    bottom_up_skips,
    compute_bpc_activity_grad,
)
from ._common import check_optim, optax_update


PDM_FLOATS = (*BPC_FLOATS, "spectral_penalty", "lateral_gamma", "bpc_terms_factor")


class PDMActivityUpdate(TypedDict):
    """Result of [`jpc.update_pdm_activities`][]."""

    energy: Float[Array, ""]
    activities: list[Array]
    grads: list[Array]
    opt_state: optax.OptState


def _split_activation(layer) -> tuple[Any, Any]:
    """`(Lambda, Linear)` of a `Sequential([Lambda, layer])`, else `(None, layer)`."""
    if (
        isinstance(layer, eqx.nn.Sequential)
        and len(layer.layers) == 2
        and isinstance(layer.layers[0], eqx.nn.Lambda)
    ):
        return layer.layers[0], layer.layers[1]
    return None, layer


def _at(option, hidden: int):
    """Entry `hidden - 1` of a per-hidden-layer list, or the single callable."""
    if isinstance(option, (list, tuple)):
        return option[hidden - 1]
    return option


def _apply(fn, z):
    return z if fn is None else batched(fn)(z)


def _sg(value, on: bool):
    return jax.lax.stop_gradient(value) if on else value


def _check_pdm_inputs(top_down_model, bottom_up_model, activities, y, x, opts):
    if x is None:
        raise ValueError(
            "`x` (the input clamping z_0) must be given for predictive dendrites, "
            "got None."
        )
    check_option("param_type", opts["param_type"], PARAM_TYPES)
    skip_model = opts["skip_model"]
    _check_bpc_inputs(top_down_model, bottom_up_model, activities, y, x, skip_model)
    lateral = opts["lateral_model"]
    n_hidden = len(top_down_model) - 1
    if lateral is not None and len(lateral) != n_hidden:
        raise ValueError(
            f"`lateral_model` must have one entry per hidden layer ({n_hidden}), "
            f"got {len(lateral)}."
        )
    for name in ("projection_matrix_prev", "projection_matrix_next"):
        value = opts[name]
        if isinstance(value, (list, tuple)) and len(value) != n_hidden:
            raise ValueError(
                f"`{name}` must be one callable or a list with one entry per hidden "
                f"layer ({n_hidden}), got {len(value)} entries."
            )


def _scalings(top_down_model, bottom_up_model, x, y, opts) -> tuple[list, list]:
    """Scalings of both networks, as in [`jpc.bpc_energy_fn`][]."""
    skip_model, param_type = opts["skip_model"], opts["param_type"]
    a_td = get_param_scalings(
        top_down_model, x, skip_model=skip_model, param_type=param_type
    )
    bu_skips = bottom_up_skips(skip_model, len(bottom_up_model))
    a_bu = get_param_scalings(
        list(bottom_up_model)[::-1],
        y,
        skip_model=None if bu_skips is None else bu_skips[::-1],
        param_type=param_type,
    )[::-1]
    return a_td, a_bu


def _layer_errors(k, top_down_model, bottom_up_model, z, scalings, opts, lateral_on):
    """`(e_k, δ_k, δ'_{k-1}, e'_{k+1})` of hidden layer `k`; `z = [x, z_1.., y]`."""
    a_td, a_bu = scalings
    skip_model = opts["skip_model"]
    skip_bu = bottom_up_skips(skip_model, len(bottom_up_model))
    skip = skip_at(skip_model, k - 1) if k >= 2 else None
    pred = predict(top_down_model[k - 1], skip, a_td[k - 1], z[k - 1], f"z_{k - 1}")
    forward = z[k] - pred
    act, linear = _split_activation(bottom_up_model[k])
    if act is None:
        act = _split_activation(top_down_model[k])[0]
    inner = predict(linear, skip_at(skip_bu, k), a_bu[k], z[k + 1], f"z_{k + 1}")
    if opts["lateral_model"] is not None:
        inner = inner + lateral_on * _apply(opts["lateral_model"][k - 1], z[k])
    backward = z[k] - _apply(act, inner)
    # the cross-term errors use the layers as given (activation not moved)
    prev = z[k - 1] - predict(
        bottom_up_model[k - 1], skip_at(skip_bu, k - 1), a_bu[k - 1], z[k], f"z_{k}"
    )
    nxt = z[k + 1] - predict(
        top_down_model[k], skip_at(skip_model, k), a_td[k], z[k], f"z_{k}"
    )
    return forward, backward, prev, nxt


def _check_projection(name, k, projected, error) -> None:
    if projected.shape != error.shape:
        raise ValueError(
            f"`{name}` must map the cross-term error of hidden layer {k} to the "
            f"shape of that layer's own error {error.shape}, got "
            f"{projected.shape} (`None` is the identity)."
        )


def _layer_energies(top_down_model, bottom_up_model, hidden, y, x, opts, local):
    """`[F_1, ..., F_H]`; with `local`, `F_l` sees its neighbours as constants."""
    n_hidden = len(top_down_model) - 1
    a_f, a_b = opts["forward_energy_weight"], opts["backward_energy_weight"]
    lateral_on = jnp.asarray(opts["lateral_gamma"]) == 0
    scalings = _scalings(top_down_model, bottom_up_model, x, y, opts)
    batch = y.shape[0]
    energies = []
    for k in range(1, n_hidden + 1):
        z = [x, *hidden, y]
        if local:
            z = [v if i == k else jax.lax.stop_gradient(v) for i, v in enumerate(z)]
        e, d, prev, nxt = _layer_errors(
            k, top_down_model, bottom_up_model, z, scalings, opts, lateral_on
        )
        if opts["include_previous_backward_error"]:
            extra = _sg(prev, opts["stop_gradient_on_extra_errors"])
            extra = _apply(_at(opts["projection_matrix_prev"], k), extra)
            _check_projection("projection_matrix_prev", k, extra, e)
            e_term = 0.5 * jnp.sum((a_f * e + a_b * extra) ** 2)
        else:
            e_term = a_f * 0.5 * jnp.sum(e**2)
        if opts["include_next_forward_error"]:
            extra = _sg(nxt, opts["stop_gradient_on_extra_errors"])
            extra = _apply(_at(opts["projection_matrix_next"], k), extra)
            _check_projection("projection_matrix_next", k, extra, d)
            d_term = 0.5 * jnp.sum((a_b * d + a_f * extra) ** 2)
        else:
            d_term = a_b * 0.5 * jnp.sum(d**2)
        energies.append((e_term + d_term) / batch)
    return energies


def _spectral(top_down_model, spectral_penalty):
    """`Σ ‖WᵀW − I‖²` (smaller Gram matrix) over the hidden-to-hidden weights."""
    total = 0.0
    for layer in list(top_down_model)[1:-1]:
        w = _matrix(layer)
        if w is None:
            continue
        w = jnp.reshape(w, (w.shape[0], -1))
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        total += jnp.sum((gram - jnp.eye(gram.shape[0], dtype=w.dtype)) ** 2)
    return spectral_penalty * total


def _lateral_terms(lateral_model, hidden, lateral_gamma) -> list:
    """`(1/(2BN)) Σ_i zᵀ L z − γ Tr(L)/(2N)` per hidden layer (0 if no weight)."""
    terms = []
    for layer, z in zip(lateral_model, hidden):
        w = None if layer is None else _matrix(_split_activation(layer)[1])
        if w is None:
            terms.append(0.0)
            continue
        flat = jnp.reshape(z, (z.shape[0], -1))
        width = flat.shape[1]
        quad = jnp.sum((flat @ w.T) * flat) / (2 * z.shape[0] * width)
        terms.append(quad - lateral_gamma * jnp.trace(w) / (2 * width))
    return terms


def _hidden(top_down_model, activities) -> list:
    return list(activities[: len(top_down_model) - 1])


def _energy(top_down_model, bottom_up_model, activities, y, x, opts):
    hidden = _hidden(top_down_model, activities)
    total = sum(
        _layer_energies(top_down_model, bottom_up_model, hidden, y, x, opts, False)
    )
    if not (isinstance(opts["spectral_penalty"], (int, float))) or (
        opts["spectral_penalty"] != 0
    ):
        total = total + _spectral(top_down_model, opts["spectral_penalty"])
    if opts["lateral_model"] is not None:
        total = total + sum(
            _lateral_terms(opts["lateral_model"], hidden, opts["lateral_gamma"])
        )
    return total


def _options(**kwargs) -> dict:
    return kwargs


@traced_floats(*PDM_FLOATS)
def pdm_energy_fn(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    y: Float[Array, "batch ..."],
    x: Float[Array, "batch ..."],
    *,
    skip_model: Model | None = None,
    lateral_model: Model | None = None,
    param_type: ParamType = "sp",
    spectral_penalty: Scalar = 0.0,
    lateral_gamma: Scalar = 0.0,
    include_previous_backward_error: bool = False,
    include_next_forward_error: bool = False,
    projection_matrix_prev: Callable | Sequence[Callable] | None = None,
    projection_matrix_next: Callable | Sequence[Callable] | None = None,
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    stop_gradient_on_extra_errors: bool = True,
) -> Float[Array, ""]:
    r"""Total energy of predictive dendrites: $\sum_l F_l$ plus regularisers.

    See the module description and the [bidirectional PC](
    ../variants/bidirectional.md#predictive-dendrites) page for the local
    energies $F_l$.

    **Arguments:**

    - `top_down_model`: `H + 1` layers, `x → z_1 → … → z_H → y`.
    - `bottom_up_model`: `H + 1` layers listed from the bottom (entry `j` predicts
        `z_j` from `z_{j+1}`; entry 0, predicting `x`, enters only the
        cross-term error of layer 1).
    - `activities`: `[z_1, ..., z_H]`, optionally followed by an output slot that
        is never read.
    - `y`, `x`: the output and input clamps (`x` is required).
    - `skip_model`: optional skips, used in both directions as in
        [`jpc.bpc_energy_fn`][].
    - `lateral_model`: optional list of `H` per-example lateral layers $A_l$ (a
        `Linear`, or `Sequential([Lambda, Linear])`), added inside $\delta_l$ when
        `lateral_gamma` is 0 and regularised as below.
    - `param_type`: `"sp"`, `"mupc"` or `"ntp"` scalings of both networks.
    - `spectral_penalty`: coefficient of $\sum\lVert W^\top W - I\rVert^2$ over
        the top-down weights between hidden layers (entries `1..H-1`), with the
        smaller Gram matrix.
    - `lateral_gamma`: $\gamma$ of the lateral regulariser
        $\frac{1}{2BN_l}\sum_i z_{l,i}^\top L_l z_{l,i} - \gamma\,
        \mathrm{Tr}(L_l)/(2N_l)$.
    - `include_previous_backward_error`: use
        $\frac12\lVert\alpha_f e_l + \alpha_b P(\delta'_{l-1})\rVert^2$ as the
        forward term, $\delta'_{l-1} = z_{l-1} - g_{l-1}(z_l)$ (layers as given).
    - `include_next_forward_error`: use
        $\frac12\lVert\alpha_b \delta_l + \alpha_f Q(e'_{l+1})\rVert^2$ as the
        backward term, $e'_{l+1} = z_{l+1} - f_{l+1}(z_l)$ ($z_{H+1} = y$).
    - `projection_matrix_prev`, `projection_matrix_next`: $P$, $Q$: one
        per-example callable or a list with one per hidden layer; identity when
        `None`.
    - `backward_energy_weight`, `forward_energy_weight`: $\alpha_b$, $\alpha_f$.
    - `stop_gradient_on_extra_errors`: wrap $\delta'$ and $e'$ in
        `jax.lax.stop_gradient` (default `True`).

    **Returns:**

    The scalar energy (batch mean).

    **Raises:**

    `ValueError` if `x` is `None`, `param_type` is unknown, or the models,
    activities, lateral layers or projections do not line up.
    """
    opts = _options(
        skip_model=skip_model,
        lateral_model=lateral_model,
        param_type=param_type,
        spectral_penalty=spectral_penalty,
        lateral_gamma=lateral_gamma,
        include_previous_backward_error=include_previous_backward_error,
        include_next_forward_error=include_next_forward_error,
        projection_matrix_prev=projection_matrix_prev,
        projection_matrix_next=projection_matrix_next,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        stop_gradient_on_extra_errors=stop_gradient_on_extra_errors,
    )
    _check_pdm_inputs(top_down_model, bottom_up_model, activities, y, x, opts)
    return _energy(top_down_model, bottom_up_model, activities, y, x, opts)


def _local_grads(top_down_model, bottom_up_model, activities, y, x, opts):
    """`∂F_l/∂z_l` (+ the lateral term's gradient when `γ ≠ 0`), slot zero."""
    hidden = _hidden(top_down_model, activities)

    def local(h):
        total = sum(
            _layer_energies(top_down_model, bottom_up_model, h, y, x, opts, True)
        )
        if opts["lateral_model"] is not None:
            on = (jnp.asarray(opts["lateral_gamma"]) != 0).astype(h[0].dtype)
            lateral = _lateral_terms(opts["lateral_model"], h, opts["lateral_gamma"])
            total = total + on * sum(lateral)
        return total

    grads = jax.grad(local)(hidden)
    if len(activities) > len(hidden):
        grads = [*grads, jnp.zeros_like(activities[-1])]
    return grads


@traced_floats(*PDM_FLOATS)
def compute_pdm_activity_grad(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    y: Float[Array, "batch ..."],
    x: Float[Array, "batch ..."],
    *,
    skip_model: Model | None = None,
    lateral_model: Model | None = None,
    param_type: ParamType = "sp",
    spectral_penalty: Scalar = 0.0,
    lateral_gamma: Scalar = 0.0,
    include_previous_backward_error: bool = False,
    include_next_forward_error: bool = False,
    projection_matrix_prev: Callable | Sequence[Callable] | None = None,
    projection_matrix_next: Callable | Sequence[Callable] | None = None,
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    stop_gradient_on_extra_errors: bool = True,
    bpc_terms_factor: Scalar = 0.0,
) -> tuple[Float[Array, ""], list[Array]]:
    r"""Energy and the layer-local activity gradients of predictive dendrites.

    The gradient for $z_l$ is $\partial F_l/\partial z_l$ of its own local energy
    only (plus, when `lateral_gamma` is non-zero, the gradient of its lateral
    regulariser); a trailing output slot gets zeros. With `bpc_terms_factor`
    $c \ne 0$ the result is $(1 - c)\cdot$local $+ c\cdot$ the bidirectional PC
    activity gradient ([`jpc.compute_bpc_activity_grad`][]).

    **Arguments:** as for [`jpc.pdm_energy_fn`][], plus `bpc_terms_factor` $c$.

    **Returns:**

    `(energy, grads)`: the total energy of [`jpc.pdm_energy_fn`][] and a list
    like `activities`.
    """
    opts = _options(
        skip_model=skip_model,
        lateral_model=lateral_model,
        param_type=param_type,
        spectral_penalty=spectral_penalty,
        lateral_gamma=lateral_gamma,
        include_previous_backward_error=include_previous_backward_error,
        include_next_forward_error=include_next_forward_error,
        projection_matrix_prev=projection_matrix_prev,
        projection_matrix_next=projection_matrix_next,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        stop_gradient_on_extra_errors=stop_gradient_on_extra_errors,
    )
    _check_pdm_inputs(top_down_model, bottom_up_model, activities, y, x, opts)
    energy = _energy(top_down_model, bottom_up_model, activities, y, x, opts)
    grads = _local_grads(top_down_model, bottom_up_model, activities, y, x, opts)
    if not (isinstance(bpc_terms_factor, (int, float)) and bpc_terms_factor == 0):
        _, bpc = compute_bpc_activity_grad(
            top_down_model,
            bottom_up_model,
            activities,
            y,
            x=x,
            skip_model=skip_model,
            param_type=param_type,
            backward_energy_weight=backward_energy_weight,
            forward_energy_weight=forward_energy_weight,
        )
        c = bpc_terms_factor
        grads = [(1 - c) * g + c * b for g, b in zip(grads, bpc)]
    return energy, list(grads)


def _param_grads(top_down_model, bottom_up_model, activities, y, x, opts, extra):
    """Gradients of the total energy w.r.t. the models and `extra` option trees."""
    names = list(extra)

    def energy(trees):
        td, bu, *others = trees
        return _energy(td, bu, activities, y, x, dict(opts, **dict(zip(names, others))))

    trees = (top_down_model, bottom_up_model, *(opts[n] for n in names))
    return eqx.filter_grad(energy)(trees)


@traced_floats(*PDM_FLOATS)
def compute_pdm_param_grads(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    y: Float[Array, "batch ..."],
    x: Float[Array, "batch ..."],
    *,
    skip_model: Model | None = None,
    lateral_model: Model | None = None,
    param_type: ParamType = "sp",
    spectral_penalty: Scalar = 0.0,
    lateral_gamma: Scalar = 0.0,
    include_previous_backward_error: bool = False,
    include_next_forward_error: bool = False,
    projection_matrix_prev: Callable | Sequence[Callable] | None = None,
    projection_matrix_next: Callable | Sequence[Callable] | None = None,
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    stop_gradient_on_extra_errors: bool = True,
) -> tuple[PyTree, ...]:
    """Gradients of the total PDM energy with respect to the networks' parameters.

    **Arguments:** as for [`jpc.pdm_energy_fn`][].

    **Returns:**

    `(top_down_grads, bottom_up_grads)`, plus `lateral_grads` as a third entry
    when `lateral_model` is given (`None` wherever a leaf is not an array). The
    skip model is not trained.
    """
    opts = _options(
        skip_model=skip_model,
        lateral_model=lateral_model,
        param_type=param_type,
        spectral_penalty=spectral_penalty,
        lateral_gamma=lateral_gamma,
        include_previous_backward_error=include_previous_backward_error,
        include_next_forward_error=include_next_forward_error,
        projection_matrix_prev=projection_matrix_prev,
        projection_matrix_next=projection_matrix_next,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        stop_gradient_on_extra_errors=stop_gradient_on_extra_errors,
    )
    _check_pdm_inputs(top_down_model, bottom_up_model, activities, y, x, opts)
    extra = ["lateral_model"] if lateral_model is not None else []
    grads = _param_grads(
        top_down_model, bottom_up_model, list(activities), y, x, opts, extra
    )
    return tuple(grads)


@traced_floats(*PDM_FLOATS)
def update_pdm_activities(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    input: Float[Array, "batch ..."],
    *,
    skip_model: Model | None = None,
    lateral_model: Model | None = None,
    param_type: ParamType = "sp",
    spectral_penalty: Scalar = 0.0,
    lateral_gamma: Scalar = 0.0,
    include_previous_backward_error: bool = False,
    include_next_forward_error: bool = False,
    projection_matrix_prev: Callable | Sequence[Callable] | None = None,
    projection_matrix_next: Callable | Sequence[Callable] | None = None,
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    stop_gradient_on_extra_errors: bool = True,
    bpc_terms_factor: Scalar = 0.0,
) -> PDMActivityUpdate:
    """One optax step of PDM inference on the activities (local gradients).

    **Arguments:** as for [`jpc.compute_pdm_activity_grad`][], with `output`,
    `input` the clamps `y`, `x`, and `optim`, `opt_state` the activity optimiser
    and its state, `optim.init(activities)`.

    **Returns:**

    A dict with `energy` (before the step), `activities` (after it), `grads` and
    `opt_state`.
    """
    check_batch(output, input, [], y_name="output", x_name="input")
    check_optim("optim", optim)
    energy, grads = compute_pdm_activity_grad(
        top_down_model,
        bottom_up_model,
        activities,
        output,
        input,
        skip_model=skip_model,
        lateral_model=lateral_model,
        param_type=param_type,
        spectral_penalty=spectral_penalty,
        lateral_gamma=lateral_gamma,
        include_previous_backward_error=include_previous_backward_error,
        include_next_forward_error=include_next_forward_error,
        projection_matrix_prev=projection_matrix_prev,
        projection_matrix_next=projection_matrix_next,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        stop_gradient_on_extra_errors=stop_gradient_on_extra_errors,
        bpc_terms_factor=bpc_terms_factor,
    )
    activities, opt_state = optax_update(list(activities), grads, optim, opt_state)
    return PDMActivityUpdate(
        energy=energy, activities=activities, grads=grads, opt_state=opt_state
    )


@traced_floats(*PDM_FLOATS)
def update_pdm_params(
    top_down_model: Model,
    bottom_up_model: Model,
    activities: Activities,
    top_down_optim: optax.GradientTransformation,
    bottom_up_optim: optax.GradientTransformation,
    top_down_opt_state: optax.OptState,
    bottom_up_opt_state: optax.OptState,
    output: Float[Array, "batch ..."],
    input: Float[Array, "batch ..."],
    *,
    skip_model: Model | None = None,
    lateral_model: Model | None = None,
    lateral_optim: optax.GradientTransformation | None = None,
    lateral_opt_state: optax.OptState | None = None,
    param_type: ParamType = "sp",
    spectral_penalty: Scalar = 0.0,
    lateral_gamma: Scalar = 0.0,
    include_previous_backward_error: bool = False,
    include_next_forward_error: bool = False,
    projection_matrix_prev: Callable | Sequence[Callable] | None = None,
    projection_matrix_next: Callable | Sequence[Callable] | None = None,
    backward_energy_weight: Scalar = 1.0,
    forward_energy_weight: Scalar = 1.0,
    stop_gradient_on_extra_errors: bool = True,
    projection_matrix_prev_optim: optax.GradientTransformation | None = None,
    projection_matrix_next_optim: optax.GradientTransformation | None = None,
    projection_matrix_prev_opt_state: optax.OptState | None = None,
    projection_matrix_next_opt_states: optax.OptState | None = None,
    update_projection_matrix_prev: bool = True,
    update_projection_matrix_next: bool = True,
) -> dict[str, Any]:
    """One optax step on the PDM networks at the given (inferred) activities.

    All parameters descend the total energy of [`jpc.pdm_energy_fn`][].

    **Arguments:** as for [`jpc.pdm_energy_fn`][], with `output`, `input` the
    clamps `y`, `x`, and:

    - `top_down_optim`, `bottom_up_optim` and their states
        `top_down_opt_state`, `bottom_up_opt_state` (each
        `optim.init(eqx.filter(that_model, eqx.is_array))`).
    - `lateral_optim`, `lateral_opt_state`: optimiser of `lateral_model`
        (needed when `lateral_model` is given).
    - `projection_matrix_prev_optim`, `projection_matrix_prev_opt_state`,
        `projection_matrix_next_optim`, `projection_matrix_next_opt_states`:
        optimisers and states of the projections; a projection is trained when
        its optimiser is given and `update_projection_matrix_prev` /
        `update_projection_matrix_next` is `True`.

    **Returns:**

    A dict with `models`, `grads` and `opt_states`: pairs `(top_down,
    bottom_up)`, or triples ending with the lateral model when `lateral_model`
    is given; and for each trained projection, `projection_matrix_prev` /
    `projection_matrix_next` (updated), with its gradient and optimiser state
    under the same name followed by `_grads` / `_opt_state`.

    **Raises:**

    `TypeError` for a missing or wrong optimiser; `ValueError` as
    [`jpc.pdm_energy_fn`][].
    """
    check_batch(output, input, [], y_name="output", x_name="input")
    check_optim("top_down_optim", top_down_optim)
    check_optim("bottom_up_optim", bottom_up_optim)
    if lateral_model is not None:
        check_optim("lateral_optim", lateral_optim)
    opts = _options(
        skip_model=skip_model,
        lateral_model=lateral_model,
        param_type=param_type,
        spectral_penalty=spectral_penalty,
        lateral_gamma=lateral_gamma,
        include_previous_backward_error=include_previous_backward_error,
        include_next_forward_error=include_next_forward_error,
        projection_matrix_prev=projection_matrix_prev,
        projection_matrix_next=projection_matrix_next,
        backward_energy_weight=backward_energy_weight,
        forward_energy_weight=forward_energy_weight,
        stop_gradient_on_extra_errors=stop_gradient_on_extra_errors,
    )
    _check_pdm_inputs(top_down_model, bottom_up_model, activities, output, input, opts)
    trained = [
        ("lateral_model", lateral_optim, lateral_opt_state, lateral_model is not None),
        (
            "projection_matrix_prev",
            projection_matrix_prev_optim,
            projection_matrix_prev_opt_state,
            update_projection_matrix_prev
            and projection_matrix_prev_optim is not None
            and projection_matrix_prev is not None,
        ),
        (
            "projection_matrix_next",
            projection_matrix_next_optim,
            projection_matrix_next_opt_states,
            update_projection_matrix_next
            and projection_matrix_next_optim is not None
            and projection_matrix_next is not None,
        ),
    ]
    trained = [t for t in trained if t[3]]
    grads = _param_grads(
        top_down_model,
        bottom_up_model,
        list(activities),
        output,
        input,
        opts,
        [t[0] for t in trained],
    )
    trees = (top_down_model, bottom_up_model, *(opts[t[0]] for t in trained))
    optims = (top_down_optim, bottom_up_optim, *(t[1] for t in trained))
    states = (top_down_opt_state, bottom_up_opt_state, *(t[2] for t in trained))
    updated = [
        optax_update(tree, g, optim, state)
        for tree, g, optim, state in zip(trees, grads, optims, states)
    ]
    n_models = 3 if lateral_model is not None else 2
    result: dict[str, Any] = dict(
        models=tuple(u[0] for u in updated[:n_models]),
        grads=tuple(grads[:n_models]),
        opt_states=tuple(u[1] for u in updated[:n_models]),
    )
    for (name, *_), (tree, state), g in zip(
        trained[n_models - 2 :], updated[n_models:], grads[n_models:]
    ):
        result[name] = tree
        result[f"{name}_grads"] = g
        result[f"{name}_opt_state"] = state
    return result
