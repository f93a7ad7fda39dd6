r"""Bregman predictive coding: energies matched to the activation function.

Hidden states are kept as pre-activations ("dual" states) $u_l$, with activities
$z_l = \phi(u_l)$ for a monotone activation $\phi$ (`tanh` or the logistic
sigmoid). The layers are affine maps that predict pre-activations,
$a_l = s_l f_l(z_{l-1})$ with $z_0 = x$, and the prediction error of layer $l$ is
measured by the matching loss of Helmbold, Kivinen & Warmuth (1999), the Bregman
divergence of the convex potential $\Phi$ with $\Phi' = \phi$ ($\log\cosh$ for
tanh, softplus for the sigmoid) and its convex conjugate $\Phi^*$:

$$D_\phi(z, a) = \Phi(a) - z\,a + \Phi^*(z) \ \ge 0, \qquad
\partial D_\phi/\partial a = \phi(a) - z .$$

Since $\partial\mathcal{F}/\partial u_l = \phi'(u_l)\,e_l/B$, a mirror-descent step
on the activities $z_l$ (mirror map $\Phi^*$, dual coordinates $u_l$) moves $u_l$
along the residual $e_l$, and neither inference nor learning ever computes $\phi'$.
"""

import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._checks import (
    PARAM_TYPES,
    check_activities,
    check_batch,
    check_model,
    check_opt_state,
    check_option,
    traced_floats,
)
from .._energies import record_order
from .._layers import check_output, get_param_scalings, predict
from .._present import keyword_hints
from .._types import Array, Float, Model, Params, ParamType, PyTree, Scalar
from .._utils import LOSS_FNS
from ._common import optax_update


ACT_FNS = ("tanh", "sigmoid")
BREGMAN_LOSSES = ("mse", "ce", "bregman")
BregmanActFn = Literal["tanh", "sigmoid"]
BregmanLoss = Literal["mse", "ce", "bregman"]
_RANGES = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}
_ENERGY_NAMES = ("y", "x")
_UPDATE_NAMES = ("output", "input")


class BregmanActivityUpdate(TypedDict):
    """Result of [`jpc.update_bregman_pc_activities`][]."""

    energy: Float[Array, ""]
    activities: list[Array]
    grads: list[Array]
    opt_state: optax.OptState


class BregmanParamUpdate(TypedDict):
    """Result of [`jpc.update_bregman_pc_params`][]."""

    model: Any
    skip_model: Any
    grads: tuple[PyTree, PyTree]
    opt_state: optax.OptState


# ---------------------------------------------------------------- potentials


@jax.custom_jvp
def _log_cosh(a: Array) -> Array:
    r"""$\log\cosh a$, accurate for small $|a|$ and finite for large $|a|$."""
    abs_a = jnp.abs(a)
    small = abs_a < 1
    half = jnp.where(small, a, 0.0) / 2
    near_zero = jnp.log1p(2 * jnp.sinh(half) ** 2)
    far = abs_a + jax.nn.softplus(-2 * abs_a) - math.log(2)
    return jnp.where(small, near_zero, far)


@_log_cosh.defjvp
def _log_cosh_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    return _log_cosh(a), jnp.tanh(a) * da


@jax.custom_jvp
def _softplus(a: Array) -> Array:
    return jax.nn.softplus(a)


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    return _softplus(a), jax.nn.sigmoid(a) * da


def _potential(act_fn: str, a: Array) -> Array:
    r"""$\Phi(a)$; its derivative is computed as $\phi(a)$ itself, so that the
    error $\phi(a) - \phi(u)$ is exactly 0 at $a = u$."""
    return _log_cosh(a) if act_fn == "tanh" else _softplus(a)


def _clip_to_range(act_fn: str, z: Array) -> Array:
    r"""`z` clipped into the open interval of $\phi$'s range (one ulp inside)."""
    low, high = _RANGES[act_fn]
    eps = jnp.finfo(z.dtype).eps
    return jnp.clip(z, low + eps, high - eps)


def _conjugate(act_fn: str, z: Array) -> Array:
    r"""$\Phi^*(z)$ for `z` inside $\phi$'s range."""
    if act_fn == "tanh":
        return 0.5 * ((1 + z) * jnp.log1p(z) + (1 - z) * jnp.log1p(-z))
    return z * jnp.log(z) + (1 - z) * jnp.log1p(-z)


def _float_dtype(*arrays: Any) -> Any:
    return jnp.result_type(*arrays, 1.0)


def bregman_phi(act_fn: BregmanActFn, a: Float[Array, "..."]) -> Float[Array, "..."]:
    r"""The activation $\phi(a)$ of Bregman PC, elementwise.

    **Arguments:**

    - `act_fn`: `"tanh"` or `"sigmoid"` (the logistic function).
    - `a`: pre-activations, any shape.

    **Returns:**

    $\phi(a)$, shaped like `a`.

    **Raises:**

    `ValueError` if `act_fn` is not `"tanh"` or `"sigmoid"`.
    """
    check_option("act_fn", act_fn, ACT_FNS)
    a = jnp.asarray(a, _float_dtype(a))
    return jnp.tanh(a) if act_fn == "tanh" else jax.nn.sigmoid(a)


def bregman_from_preact(
    act_fn: BregmanActFn, z: Float[Array, "..."], a: Float[Array, "..."]
) -> Float[Array, "..."]:
    r"""Matching loss $D_\phi(z, a) = \Phi(a) - z\,a + \Phi^*(z)$, elementwise.

    The Bregman divergence between an activity $z$ and the activity $\phi(a)$ of a
    pre-activation $a$ (Helmbold, Kivinen & Warmuth, 1999): $\Phi(a) = \log\cosh a$
    for tanh, $\mathrm{softplus}(a)$ for the sigmoid, and $\Phi^*$ the convex
    conjugate of $\Phi$. It is $\ge 0$, zero exactly when $z = \phi(a)$, and
    $\partial D_\phi/\partial a = \phi(a) - z$. For the sigmoid it is the
    Kullback–Leibler divergence between Bernoulli($z$) and Bernoulli($\phi(a)$).

    Computed stably: $\log\cosh$ never overflows (no NaN at $|a| = 30$ in float32),
    and `z` is clipped into the open interval of $\phi$'s range
    ($(-1, 1)$ or $(0, 1)$, one float epsilon inside), so targets at the edges
    such as one-hot labels give finite values.

    **Arguments:**

    - `act_fn`: `"tanh"` or `"sigmoid"`.
    - `z`: activities in $\phi$'s range, broadcastable with `a`.
    - `a`: pre-activations.

    **Returns:**

    The elementwise divergence, of the broadcast shape of `z` and `a`.

    **Raises:**

    `ValueError` if `act_fn` is not `"tanh"` or `"sigmoid"`.
    """
    check_option("act_fn", act_fn, ACT_FNS)
    dtype = _float_dtype(z, a)
    z, a = jnp.asarray(z, dtype), jnp.asarray(a, dtype)
    z = _clip_to_range(act_fn, z)
    return _potential(act_fn, a) - z * a + _conjugate(act_fn, z)


def _dual_divergence(act_fn: str, u: Array, a: Array) -> Array:
    r"""$D_\phi(\phi(u), a) = \Phi(a) - \Phi(u) - \phi(u)(a - u)$, elementwise.

    The same divergence written in the dual state $u$ (Fenchel's equality
    $\Phi^*(\phi(u)) = u\,\phi(u) - \Phi(u)$): no conjugate and no clipping,
    so it stays exact where $\phi(u)$ saturates, and it is exactly 0 at $u = a$.
    """
    z = bregman_phi(act_fn, u)
    return _potential(act_fn, a) - _potential(act_fn, u) - z * (a - u)


# ---------------------------------------------------------------- checks


def _check_skips(skip_model: Any) -> None:
    if skip_model is not None and any(s is not None for s in skip_model):
        raise ValueError(
            "Bregman PC does not support skip connections: `skip_model` must be "
            "`None` (or have only `None` entries), got entries "
            f"{[type(s).__name__ for s in skip_model]}."
        )


def _check_x(x: Any, name: str) -> None:
    if x is None:
        raise ValueError(
            f"Bregman PC needs the input clamp `{name}` (the unsupervised mode is "
            f"not supported), got `{name}=None`."
        )


def _check_inputs(params, activities, y, x, act_fn, loss, param_type, names):
    """Trace-time checks of every Bregman PC energy function."""
    y_name, x_name = names
    check_option("act_fn", act_fn, ACT_FNS)
    check_option("loss", loss, BREGMAN_LOSSES)
    check_option("param_type", param_type, PARAM_TYPES)
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise TypeError(
            "`params` must be the pair `(model, skip_model)`, got "
            f"{type(params).__name__}."
        )
    model, skip_model = params
    check_model(model, skip_model)
    _check_skips(skip_model)
    _check_x(x, x_name)
    check_activities(model, activities, supervised=True)
    if y is None:
        check_batch(x, None, activities, y_name=x_name)
    else:
        check_batch(y, x, activities, y_name, x_name)


# ---------------------------------------------------------------- energy


def _scalings(model: Model, x: Array, param_type: str, gamma: Any) -> list:
    return get_param_scalings(model, x, param_type=param_type, gamma=gamma)


def _predictions(model, scalings, inputs: list, names: list) -> list[Array]:
    """Pre-activation predictions `[a_1, ..., a_L]` from the layer inputs.

    Each state's shape is checked against its prediction before the next layer
    reads it, so a misfit is reported under the state's own name.
    """
    preds = []
    for i, (layer, scale, z, name) in enumerate(zip(model, scalings, inputs, names)):
        preds.append(predict(layer, None, scale, z, name))
        if i + 1 < len(model) and jnp.shape(inputs[i + 1]) != preds[-1].shape:
            raise ValueError(
                f"`activities[{i}]` has shape {jnp.shape(inputs[i + 1])} but "
                f"`model[{i}]` predicts shape {preds[-1].shape}."
            )
    return preds


def _layer_terms(params, us, y, x, options, zs=None, names=_ENERGY_NAMES):
    r"""`([E_1, ..., E_L], [a_1, ..., a_L])`, each `E_l` a batch mean.

    `options` is `(act_fn, loss, param_type, gamma)`. `zs` are the activities the
    predictions read (default $\phi(u_l)$); the residuals are found by
    differentiating with respect to them. `names` are the caller's names of `y`, `x`.
    """
    act_fn, loss, param_type, gamma = options
    model = params[0]
    if zs is None:
        zs = [bregman_phi(act_fn, u) for u in us[:-1]]
    y_name, x_name = names
    inputs_names = [x_name, *[f"activities[{i}]" for i in range(len(us) - 1)]]
    scalings = _scalings(model, x, param_type, gamma)
    preds = _predictions(model, scalings, [x, *zs], inputs_names)
    batch = jnp.shape(x)[0]
    free = us if y is None else us[:-1]  # the output term reads u_L only if free
    terms = [
        jnp.sum(_dual_divergence(act_fn, u, a)) / batch for u, a in zip(free, preds)
    ]
    if y is None:
        return terms, preds
    check_output(y, preds[-1], y_name)
    if loss == "bregman":
        output = jnp.sum(bregman_from_preact(act_fn, y, preds[-1])) / batch
    else:
        output = LOSS_FNS[loss](preds[-1], y)
    return [*terms, output], preds


@keyword_hints
def bregman_pc_energy_fn(
    params: Params,
    activities: Sequence[Float[Array, "batch ..."]],
    y: Float[Array, "batch ..."] | None,
    *,
    x: Float[Array, "batch ..."],
    act_fn: BregmanActFn = "tanh",
    loss: BregmanLoss = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    record_layers: bool = False,
) -> Float[Array, ""] | Float[Array, " layers"]:
    r"""Batch-mean Bregman PC energy.

    $$\mathcal{F} = \frac{1}{B}\sum_i\Big[\ell(y_i, a_{L,i}) + \sum_{l<L}\sum_k
    D_\phi\big(\phi(u_{l,ik}), a_{l,ik}\big)\Big], \qquad a_l = s_l f_l(z_{l-1}),
    \ z_l = \phi(u_l),\ z_0 = x,$$

    with the matching loss $D_\phi$ of [`jpc.bregman_from_preact`][]
    (Helmbold, Kivinen & Warmuth, 1999) and the scalings $s_l$ of
    [`jpc.get_param_scalings`][]. The layers are affine maps producing
    pre-activations (e.g. `eqx.nn.Linear`, or [`jpc.make_mlp`][] with
    `act_fn="linear"`); $\phi$ is applied to the states between them. The hidden
    terms are computed in the dual states, $D_\phi(\phi(u), a) = \Phi(a) - \Phi(u)
    - \phi(u)(a - u)$, which is exact even where $\phi$ saturates.

    **Arguments:**

    - `params`: `(model, skip_model)`; `skip_model` must be `None` (or all `None`
        entries): skips are not defined in dual coordinates.
    - `activities`: the dual states `[u_1, ..., u_{L-1}, u_L]`, each
        `(batch, ...)`; the last is the output pre-activation, read only when
        `y` is `None`.
    - `y`: target, `(batch, d_out)`; with `None` the output state is free and its
        term is the hidden one, $D_\phi(\phi(u_L), a_L)$, so the energy at
        [`jpc.init_bregman_pc_activities`][] is exactly 0.
    - `x`: input clamping $z_0$, `(batch, d_in)` (required).
    - `act_fn`: $\phi$, `"tanh"` (default) or `"sigmoid"`.
    - `loss`: output term $\ell$: `"mse"` ($\frac12\lVert y - a_L\rVert^2$),
        `"ce"` (softmax cross-entropy of the logits $a_L$) or `"bregman"`
        ($\sum_k D_\phi(y_k, a_{L,k})$, targets in $\phi$'s range).
    - `param_type`, `gamma`: parameterisation (see [`jpc.get_param_scalings`][]).
    - `record_layers`: return the per-layer terms instead of their sum.

    **Returns:**

    A scalar; with `record_layers=True`, the per-layer terms (each divided by
    `B`) ordered `[E_L, E_2, ..., E_{L-1}, E_1]` as for [`jpc.pc_energy_fn`][].

    **Raises:**

    `ValueError` for an unknown `act_fn`, `loss` or `param_type`, a `skip_model`
    with a skip, `x=None`, a wrong number of activities, or batch and feature
    sizes that do not fit the model; `TypeError` if `params` is not a pair.
    """
    _check_inputs(params, activities, y, x, act_fn, loss, param_type, _ENERGY_NAMES)
    options = (act_fn, loss, param_type, gamma)
    terms, _ = _layer_terms(params, list(activities), y, x, options)
    if record_layers:
        return jnp.stack(record_order(terms))
    return sum(terms)


def init_bregman_pc_activities(
    model: Model,
    x: Float[Array, "batch ..."],
    act_fn: BregmanActFn = "tanh",
    *,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> list[Float[Array, "batch ..."]]:
    r"""Feedforward dual states $u_l = a_l = s_l f_l(\phi(u_{l-1}))$, $\phi(u_0) = x$.

    Every hidden term of [`jpc.bregman_pc_energy_fn`][] is exactly 0 there.

    **Arguments:**

    - `model`: list of affine layers predicting pre-activations.
    - `x`: input, `(batch, d_in)`.
    - `act_fn`: $\phi$, `"tanh"` (default) or `"sigmoid"`.
    - `param_type`, `gamma`: parameterisation (see [`jpc.get_param_scalings`][]).

    **Returns:**

    A list of `L` arrays `[u_1, ..., u_L]`; the last is the output pre-activation.

    **Raises:**

    `ValueError` for an unknown `act_fn` or `param_type`, or an `x` that does not
    fit the first layer.
    """
    check_option("act_fn", act_fn, ACT_FNS)
    check_model(model)
    scalings = _scalings(model, x, param_type, gamma)
    states, z, name = [], x, "x"
    for i, (layer, scale) in enumerate(zip(model, scalings)):
        states.append(predict(layer, None, scale, z, name))
        z, name = bregman_phi(act_fn, states[-1]), f"the output of model[{i}]"
    return states


# ---------------------------------------------------------------- gradients


def _energy_and_residuals(params, activities, y, x, options, names=_ENERGY_NAMES):
    r"""Energy and residuals $e_l = B\,\partial\mathcal{F}/\partial z_l$ (no $\phi'$).

    The own term of layer $l$ gives $u_l - a_l$ in closed form
    ($\partial D_\phi(z, a)/\partial z = \phi^{-1}(z) - a$); the term of the
    layer above is differentiated through the activity $z_l$ it reads.
    """
    us = list(activities)
    batch = jnp.shape(x)[0]

    def energy(zs):
        terms, preds = _layer_terms(params, us, y, x, options, zs, names)
        return sum(terms), preds

    zs = [bregman_phi(options[0], u) for u in us[:-1]]
    (value, preds), grads = jax.value_and_grad(energy, has_aux=True)(zs)
    hidden = [u - a + batch * g for u, a, g in zip(us, preds, grads)]
    last = us[-1] - preds[-1] if y is None else jnp.zeros_like(us[-1])
    return value, [*hidden, last]


@keyword_hints
def compute_bregman_pc_activity_grad(
    params: Params,
    activities: Sequence[Float[Array, "batch ..."]],
    y: Float[Array, "batch ..."] | None,
    *,
    x: Float[Array, "batch ..."],
    act_fn: BregmanActFn = "tanh",
    loss: BregmanLoss = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> tuple[Float[Array, ""], list[Array]]:
    r"""Energy and the residuals $e_l = B\,(\partial\mathcal{F}/\partial u_l)
    / \phi'(u_l)$, computed without $\phi'$.

    For a hidden layer, $e_l = (u_l - a_l) + s_{l+1} J_{l+1}^\top \delta_{l+1}$,
    with $\delta = \phi(a) - \phi(u)$ above (or the output loss's gradient with
    respect to $a_L$) and $J_{l+1}$ the Jacobian of layer $l+1$. A mirror-descent
    step on the activities $z_l$ with mirror map $\Phi^*$ moves the dual state
    along $-e_l/B$ (see [`jpc.update_bregman_pc_activities`][]).

    Arguments as for [`jpc.bregman_pc_energy_fn`][].

    **Returns:**

    `(energy, residuals)`: one residual per activity, per example (not divided by
    `B`); the last is 0 when `y` is given (the output is clamped) and
    $u_L - a_L$ when `y` is `None`.

    **Raises:**

    As [`jpc.bregman_pc_energy_fn`][].
    """
    _check_inputs(params, activities, y, x, act_fn, loss, param_type, _ENERGY_NAMES)
    options = (act_fn, loss, param_type, gamma)
    return _energy_and_residuals(params, activities, y, x, options)


def _param_value_and_grad(params, activities, y, x, options, names=_ENERGY_NAMES):
    def energy(p):
        return sum(_layer_terms(p, activities, y, x, options, names=names)[0])

    return eqx.filter_value_and_grad(energy)(tuple(params))


@keyword_hints
def compute_bregman_pc_param_grads(
    params: Params,
    activities: Sequence[Float[Array, "batch ..."]],
    y: Float[Array, "batch ..."] | None,
    *,
    x: Float[Array, "batch ..."],
    act_fn: BregmanActFn = "tanh",
    loss: BregmanLoss = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> tuple[PyTree, PyTree]:
    r"""Gradient of the Bregman PC energy with respect to `(model, skip_model)`.

    Each layer's error signal is $\phi(a_l) - \phi(u_l)$ (or the output loss's
    gradient), times the activity it reads: no $\phi'$ appears.

    Arguments as for [`jpc.bregman_pc_energy_fn`][].

    **Returns:**

    `(model_grads, skip_model_grads)`, `None` wherever a leaf is not an array.

    **Raises:**

    As [`jpc.bregman_pc_energy_fn`][].
    """
    _check_inputs(params, activities, y, x, act_fn, loss, param_type, _ENERGY_NAMES)
    options = (act_fn, loss, param_type, gamma)
    return _param_value_and_grad(params, list(activities), y, x, options)[1]


# ---------------------------------------------------------------- updates


@traced_floats("gamma")
def update_bregman_pc_activities(
    params: Params,
    activities: Sequence[Float[Array, "batch ..."]],
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."] | None,
    *,
    input: Float[Array, "batch ..."],
    act_fn: BregmanActFn = "tanh",
    loss: BregmanLoss = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> BregmanActivityUpdate:
    r"""One optax step of Bregman PC inference on the dual states (jit-compiled).

    The step direction is the residual over the batch size, $e_l/B$ (see
    [`jpc.compute_bregman_pc_activity_grad`][]): with `optax.sgd(lr)` this is
    $u_l \leftarrow u_l - \mathrm{lr}\, e_l/B$, mirror descent on the activities
    $z_l = \phi(u_l)$ with mirror map $\Phi^*$ (Nemirovski & Yudin, 1983; Beck &
    Teboulle, 2003).

    **Arguments:**

    - `params`, `activities`: as for [`jpc.bregman_pc_energy_fn`][].
    - `optim`, `opt_state`: an optax optimiser and its state,
        `optim.init(activities)`.
    - `output`, `input`: the clamps `y` (or `None`: free output) and `x`.
    - `act_fn`, `loss`, `param_type`, `gamma`: as for
        [`jpc.bregman_pc_energy_fn`][].

    **Returns:**

    A dict with `energy` (before the step), `activities` (after it), `grads` (the
    step directions $e_l/B$) and `opt_state`.

    **Raises:**

    As [`jpc.bregman_pc_energy_fn`][], naming `output`/`input`.
    """
    _check_inputs(
        params, activities, output, input, act_fn, loss, param_type, _UPDATE_NAMES
    )
    options = (act_fn, loss, param_type, gamma)
    energy, residuals = _energy_and_residuals(
        params, activities, output, input, options, _UPDATE_NAMES
    )
    batch = jnp.shape(input)[0]
    grads = [e / batch for e in residuals]
    activities, opt_state = optax_update(list(activities), grads, optim, opt_state)
    return BregmanActivityUpdate(
        energy=energy, activities=activities, grads=grads, opt_state=opt_state
    )


@traced_floats("gamma")
def update_bregman_pc_params(
    params: Params,
    activities: Sequence[Float[Array, "batch ..."]],
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    output: Float[Array, "batch ..."] | None,
    *,
    input: Float[Array, "batch ..."],
    act_fn: BregmanActFn = "tanh",
    loss: BregmanLoss = "mse",
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
) -> BregmanParamUpdate:
    r"""One optax step on `(model, skip_model)` at the given dual states
    (jit-compiled).

    **Arguments:**

    - `params`, `activities`: as for [`jpc.bregman_pc_energy_fn`][].
    - `optim`, `opt_state`: an optax optimiser and its state, made with
        `optim.init((eqx.filter(model, eqx.is_array), skip_model))`.
    - `output`, `input`: the clamps `y` (or `None`) and `x`.
    - `act_fn`, `loss`, `param_type`, `gamma`: as for
        [`jpc.bregman_pc_energy_fn`][].

    **Returns:**

    A dict with the updated `model` and `skip_model`, the `grads`
    `(model_grads, skip_model_grads)` and the new `opt_state`.

    **Raises:**

    As [`jpc.bregman_pc_energy_fn`][], naming `output`/`input`, and
    `ValueError` if `opt_state` was not made from `(model, skip_model)`.
    """
    _check_inputs(
        params, activities, output, input, act_fn, loss, param_type, _UPDATE_NAMES
    )
    check_opt_state(optim, opt_state, tuple(params))
    options = (act_fn, loss, param_type, gamma)
    _, grads = _param_value_and_grad(
        params, list(activities), output, input, options, _UPDATE_NAMES
    )
    (model, skip_model), opt_state = optax_update(
        tuple(params), grads, optim, opt_state
    )
    return BregmanParamUpdate(
        model=model, skip_model=skip_model, grads=grads, opt_state=opt_state
    )
