r"""Closed-form theory for deep linear PC networks.

For a network of linear layers $f_l(z) = W_l z$ (no biases) with the scalings $a_l$ of
[`jpc.get_param_scalings`][], optional identity skips and output precision $\lambda$,
each layer's effective map is $M_l = a_l W_l + s_l I$ ($s_l = 1$ where the layer has a
skip, else $0$). The per-example energy of [`jpc.pc_energy_fn`][] is then a quadratic
in the hidden activities, whose minimum is available in closed form.
"""

from collections.abc import Sequence
from typing import Any, TypedDict

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from ._checks import check_batch, check_model, check_opt_state, traced_floats
from ._energies import check_hidden_scaling, hidden_precisions
from ._layers import get_param_scalings, weight_matrices
from ._types import Array, Float, Model, Params, ParamType, PyTree, Scalar
from ._updates import optax_update
from ._utils import _ACT_FNS


class LinearParamUpdate(TypedDict):
    """Result of [`jpc.update_linear_equilib_energy_params`][]."""

    model: Any
    skip_model: Any
    grads: tuple[PyTree, PyTree]
    opt_state: optax.OptState


# ------------------------------------------------------------------ reading a model


def _has_bias(layer: Any) -> bool:
    for path, _ in jtu.tree_flatten_with_path(eqx.filter(layer, eqx.is_array))[0]:
        key = path[-1] if path else None
        if isinstance(key, jtu.GetAttrKey) and key.name == "bias":
            return True
    return False


def _nonlinear_activation(layer: Any) -> str | None:
    """Name of a known nonlinear `jpc.get_act_fn` activation used by `layer`."""
    nonlinear = {id(fn): name for name, fn in _ACT_FNS.items() if name != "linear"}
    lambdas = jtu.tree_leaves(layer, is_leaf=lambda n: isinstance(n, eqx.nn.Lambda))
    for node in lambdas:
        if isinstance(node, eqx.nn.Lambda) and id(node.fn) in nonlinear:
            return nonlinear[id(node.fn)]
    return None


def linear_weights(model: Model) -> list[Array]:
    """The one `weight` matrix of every layer of a linear `model`, as `(out, in)`."""
    check_model(model)
    weights = []
    for i, layer in enumerate(model):
        found = weight_matrices(layer)
        if len(found) != 1 or found[0].ndim != 2:
            shapes = [tuple(w.shape) for w in found]
            raise ValueError(
                f"`model[{i}]` must hold exactly one 2-D `weight` array for the "
                f"linear theory, found weights of shapes {shapes}."
            )
        act = _nonlinear_activation(layer)
        if act is not None:
            raise ValueError(
                f"`model[{i}]` applies the nonlinear activation {act!r}; the linear "
                "theory needs linear layers (e.g. `jpc.make_mlp(..., "
                "act_fn='linear', use_bias=False)`)."
            )
        if _has_bias(layer):
            raise ValueError(
                f"`model[{i}]` has a `bias`; the linear theory needs layers without "
                "biases (e.g. `jpc.make_mlp(..., act_fn='linear', use_bias=False)`)."
            )
        weights.append(found[0])
    for i in range(1, len(weights)):
        if weights[i].shape[1] != weights[i - 1].shape[0]:
            raise ValueError(
                f"The weight of `model[{i}]` has shape {weights[i].shape} but "
                f"`model[{i - 1}]` outputs {weights[i - 1].shape[0]} features."
            )
    return weights


def effective_maps(
    weights: list[Array], scalings: list, skip_flags: list[bool]
) -> list[Array]:
    """$M_l = a_l W_l + s_l I$ for every layer."""
    maps = []
    for i, (w, a, skip) in enumerate(zip(weights, scalings, skip_flags)):
        m = a * w
        if skip:
            if w.shape[0] != w.shape[1]:
                raise ValueError(
                    f"An identity skip on layer {i} needs a square weight, got "
                    f"shape {w.shape}."
                )
            m = m + jnp.eye(w.shape[0], dtype=w.dtype)
        maps.append(m)
    return maps


def skip_flags(skip_model: Any, n_layers: int) -> list[bool]:
    if skip_model is None:
        return [False] * n_layers
    return [s is not None for s in skip_model]


def params_maps(params: Params, x: Array, param_type: str, gamma: Any) -> list:
    """Effective maps of `(model, skip_model)` with the scalings for input `x`."""
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise TypeError(
            "`params` must be the pair `(model, skip_model)`, got "
            f"{type(params).__name__}."
        )
    model, skip_model = params
    check_model(model, skip_model)
    weights = linear_weights(model)
    scalings = get_param_scalings(
        model, x, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    return effective_maps(weights, scalings, skip_flags(skip_model, len(model)))


def check_data(maps: list, x: Array, y: Array | None) -> None:
    if y is not None:
        check_batch(y, x, [])
    if jnp.ndim(x) != 2 or x.shape[1] != maps[0].shape[1]:
        raise ValueError(
            f"`x` must have shape (batch, {maps[0].shape[1]}) for the first weight, "
            f"got {jnp.shape(x)}."
        )
    if y is not None and (jnp.ndim(y) != 2 or y.shape[1] != maps[-1].shape[0]):
        raise ValueError(
            f"`y` must have shape (batch, {maps[-1].shape[0]}) for the last weight, "
            f"got {jnp.shape(y)}."
        )


def precision(output_energy_scaling: Any) -> Any:
    return 1.0 if output_energy_scaling is None else output_energy_scaling


def hidden_precision_list(hidden_energy_scaling: Any, model: Any) -> list:
    r"""$[\kappa_1, \dots, \kappa_{L-1}]$ (1 where not given), checked."""
    check_hidden_scaling(hidden_energy_scaling, model)
    kappas = hidden_precisions(hidden_energy_scaling, len(model) - 1)
    return [1.0 if k is None else k for k in kappas]


# ------------------------------------------------------------------ equilibrium energy


def rescaling_and_product(
    maps: list, lam: Any, kappas: list | None = None
) -> tuple[Array, Array]:
    r"""$S = I/\lambda + \sum_{l=1}^{L-1} P_l P_l^\top/\kappa_l$ with
    $P_l = M_L\cdots M_{l+1}$, and the end-to-end map $M_L \cdots M_1$."""
    kappas = [1.0] * (len(maps) - 1) if kappas is None else kappas
    out_dim = maps[-1].shape[0]
    product = jnp.eye(out_dim, dtype=maps[-1].dtype)
    rescaling = product / lam
    for m, kappa in zip(reversed(maps[1:]), reversed(kappas)):
        product = product @ m
        rescaling = rescaling + (product @ product.T) / kappa
    return rescaling, product @ maps[0]


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def compute_linear_equilib_rescaling(
    params: Params,
    x: Float[Array, "batch d_in"],
    *,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> Float[Array, "d_out d_out"]:
    r"""The matrix $S$ that rescales the loss at the inference equilibrium.

    $$S = \frac{I}{\lambda} + \sum_{l=2}^{L} \frac{1}{\kappa_{l-1}}
    (M_L\cdots M_l)(M_L\cdots M_l)^\top, \qquad M_l = a_l W_l + s_l I,$$

    so that the equilibrium energy is $\mathcal{F}^* = \frac{1}{2B}\sum_i r_i^\top
    S^{-1} r_i$ (see [`jpc.linear_equilib_energy`][]). Without skips,
    $M_L\cdots M_l = (a_L\cdots a_l) W_L\cdots W_l$; an identity skip on a hidden
    layer replaces $a_l W_l$ by $I + a_l W_l$.

    **Arguments:**

    - `params`: `(model, skip_model)`; every layer of `model` must be a linear map
        $z \mapsto W z$ holding exactly one `weight` array `(out, in)` and no bias
        (any layout: `jpc.make_mlp(..., act_fn="linear")`, a list of
        `eqx.nn.Linear(..., use_bias=False)`, custom modules). Every non-`None`
        entry of `skip_model` is taken to be the identity.
    - `x`: input `(batch, d_in)`; only its width is read (for `"mupc"`/`"ntp"`).
    - `param_type`, `gamma`, `output_energy_scaling`, `hidden_energy_scaling`: as
        for [`jpc.pc_energy_fn`][] ($\lambda$ is `output_energy_scaling`, default
        1; $\kappa_l$ the hidden precisions, default 1).

    **Returns:**

    $S$, a `(d_out, d_out)` symmetric positive-definite matrix.

    **Raises:**

    `ValueError` if a layer is not a bias-free linear map with one 2-D weight, the
    shapes do not chain, or a skipped layer is not square.
    """
    maps = params_maps(params, x, param_type, gamma)
    check_data(maps, x, None)
    kappas = hidden_precision_list(hidden_energy_scaling, params[0])
    return rescaling_and_product(maps, precision(output_energy_scaling), kappas)[0]


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def linear_equilib_energy(
    params: Params,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    return_rescaling: bool = False,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> Float[Array, ""] | tuple[Float[Array, ""], Float[Array, "d_out d_out"]]:
    r"""Energy of a deep linear network at the inference equilibrium, in closed form.

    $$\mathcal{F}^* = \min_{z_1,\dots,z_{L-1}} \mathcal{F}
    = \frac{1}{2B}\sum_{i=1}^B r_i^\top S^{-1} r_i,\qquad
    r_i = y_i - M_L\cdots M_1 x_i$$

    (Innocenti et al., NeurIPS 2024), with $S$ from
    [`jpc.compute_linear_equilib_rescaling`][]. This is exactly the minimum over the
    hidden activities of [`jpc.pc_energy_fn`][] with `loss="mse"` and the same
    `param_type`, `gamma`, `output_energy_scaling` and `hidden_energy_scaling`
    (batch-mean normalisation).

    **Arguments:**

    - `params`, `x`, `param_type`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: as for [`jpc.compute_linear_equilib_rescaling`][].
    - `y`: targets `(batch, d_out)`.
    - `return_rescaling`: also return $S$.

    **Returns:**

    The scalar $\mathcal{F}^*$, or `(energy, S)` with `return_rescaling=True`.

    **Raises:**

    `ValueError` as for [`jpc.compute_linear_equilib_rescaling`][], or if `x` and
    `y` do not fit the first and last weights or differ in batch size.
    """
    maps = params_maps(params, x, param_type, gamma)
    check_data(maps, x, y)
    kappas = hidden_precision_list(hidden_energy_scaling, params[0])
    rescaling, product = rescaling_and_product(
        maps, precision(output_energy_scaling), kappas
    )
    residuals = y - x @ product.T
    whitened = jnp.linalg.solve(rescaling, residuals.T).T
    energy = 0.5 * jnp.sum(residuals * whitened) / y.shape[0]
    return (energy, rescaling) if return_rescaling else energy


# ------------------------------------------------------------------ training


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def compute_linear_equilib_energy_grads(
    params: Params,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> tuple[PyTree, PyTree]:
    r"""Gradient of [`jpc.linear_equilib_energy`][] with respect to the parameters.

    By the envelope theorem this equals the PC parameter gradient
    ([`jpc.compute_pc_param_grads`][]) at the exact inference equilibrium.

    **Arguments:**

    As for [`jpc.linear_equilib_energy`][].

    **Returns:**

    `(model_grads, skip_model_grads)`, shaped like `params` (`None` where a leaf is
    not an array).
    """
    options = (gamma, output_energy_scaling, hidden_energy_scaling)
    return _energy_and_grads(params, x, y, param_type, *options)[1]


def _energy_and_grads(
    params, x, y, param_type, gamma, output_energy_scaling, hidden_energy_scaling
):
    def energy(p):
        return linear_equilib_energy(
            p,
            x,
            y,
            param_type=param_type,
            gamma=gamma,
            output_energy_scaling=output_energy_scaling,
            hidden_energy_scaling=hidden_energy_scaling,
        )

    return eqx.filter_value_and_grad(energy)(tuple(params))


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def update_linear_equilib_energy_params(
    params: Params,
    optim: optax.GradientTransformation,
    opt_state: optax.OptState,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    param_type: ParamType = "sp",
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> LinearParamUpdate:
    """One optax step on the parameters down the closed-form equilibrium energy.

    Equivalent to a PC parameter update after inference run exactly to equilibrium.

    **Arguments:**

    - `params`, `x`, `y`, `param_type`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: as for [`jpc.linear_equilib_energy`][].
    - `optim`, `opt_state`: an optax optimiser and its state, made with
        `optim.init((eqx.filter(model, eqx.is_array), skip_model))`.

    **Returns:**

    A dict with the updated `model` and `skip_model`, the `grads`
    `(model_grads, skip_model_grads)` and the new `opt_state`.
    """
    check_opt_state(optim, opt_state, tuple(params))
    options = (gamma, output_energy_scaling, hidden_energy_scaling)
    energy, grads = _energy_and_grads(params, x, y, param_type, *options)

    def energy_fn(p):
        return linear_equilib_energy(
            p,
            x,
            y,
            param_type=param_type,
            gamma=gamma,
            output_energy_scaling=output_energy_scaling,
            hidden_energy_scaling=hidden_energy_scaling,
        )

    (model, skip_model), opt_state = optax_update(
        tuple(params), grads, optim, opt_state, energy, energy_fn
    )
    return LinearParamUpdate(
        model=model, skip_model=skip_model, grads=grads, opt_state=opt_state
    )
