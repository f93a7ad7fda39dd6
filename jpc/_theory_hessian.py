r"""Activity Hessian and equilibrium activities of deep linear PC networks.

The per-example energy of a deep linear network is a quadratic in its stacked hidden
activities $z = (z_1, \dots, z_{L-1})$: $\frac{1}{2}z^\top H z - b^\top z +
\text{const}$, with the block-tridiagonal $H$ built here.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp

from ._checks import check_sequence, traced_floats
from ._layers import get_param_scalings
from ._theory import (
    check_data,
    effective_maps,
    hidden_precision_list,
    linear_weights,
    params_maps,
    precision,
    skip_flags,
)
from ._types import Array, Float, Model, ParamType, Scalar
from ._utils import make_skip_model


class _Weight(eqx.Module):
    """A bare linear layer `z ↦ W z`, so a list of matrices can be read as a model."""

    weight: Array

    def __call__(self, z, *, key=None):
        return self.weight @ z


# ------------------------------------------------------------------ activity Hessian


def _decay(activity_decay: Any) -> Any:
    """`True` means a coefficient of 1, `False` or `None` none; numbers pass."""
    if activity_decay is True:
        return 1.0
    if activity_decay is False or activity_decay is None:
        return 0.0
    return activity_decay


def hessian_from_maps(
    maps: list,
    lam: Any,
    decay: Any,
    diag: bool = True,
    off_diag: bool = True,
    kappas: list | None = None,
) -> Array:
    r"""Block-tridiagonal Hessian of the per-example energy over $z_1..z_{L-1}$.

    `kappas` are the hidden precisions $\kappa_1..\kappa_{L-1}$ (default 1).
    """
    hidden = [m.shape[0] for m in maps[:-1]]
    kappas = [1.0] * len(hidden) if kappas is None else kappas
    weights = [*kappas[1:], lam]  # the precision of the term above each layer
    starts = [sum(hidden[:i]) for i in range(len(hidden) + 1)]
    dtype = maps[0].dtype
    hessian = jnp.zeros((starts[-1], starts[-1]), dtype=dtype)
    for i, width in enumerate(hidden):
        block = slice(starts[i], starts[i + 1])
        above = maps[i + 1]
        if diag:
            eye = jnp.eye(width, dtype=dtype)
            diagonal = (kappas[i] + decay) * eye + weights[i] * (above.T @ above)
            hessian = hessian.at[block, block].set(diagonal)
        if off_diag and i + 1 < len(hidden):
            nxt = slice(starts[i + 1], starts[i + 2])
            hessian = hessian.at[block, nxt].set(-weights[i] * above.T)
            hessian = hessian.at[nxt, block].set(-weights[i] * above)
    return hessian


def _matrices_maps(Ws, use_skips, param_type, gamma) -> list:
    check_sequence("Ws", Ws)
    model = [_Weight(jnp.asarray(w)) for w in Ws]
    weights = linear_weights(model)
    skip_model = make_skip_model(len(model)) if use_skips else None
    scalings = get_param_scalings(
        model, None, skip_model=skip_model, param_type=param_type, gamma=gamma
    )
    return effective_maps(weights, scalings, skip_flags(skip_model, len(model)))


def _check_depth(maps: list, name: str) -> None:
    if len(maps) < 2:
        raise ValueError(
            f"`{name}` must have at least 2 layers (one hidden activity), got "
            f"{len(maps)}."
        )


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def compute_linear_activity_hessian(
    Ws: list[Float[Array, "out in"]],
    *,
    use_skips: bool = False,
    param_type: ParamType = "sp",
    activity_decay: bool | Scalar = False,
    diag: bool = True,
    off_diag: bool = True,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
) -> Float[Array, "n n"]:
    r"""Hessian of the per-example energy of a deep linear network over its activities.

    The variables are the hidden activities of one example stacked as
    $z = (z_1, \dots, z_{L-1})$, of size $n = \sum_l N_l$. The energy is the
    per-example one, $\mathcal{F}_i = \sum_{l<L} \frac{\kappa_l}{2}\lVert z_l - M_l
    z_{l-1}\rVert^2 + \frac{\lambda}{2}\lVert y - M_L z_{L-1}\rVert^2$ (plus
    $\frac{c}{2}\sum_l\lVert z_l\rVert^2$ with activity decay $c$), so the Hessian
    of the batch-mean [`jpc.pc_energy_fn`][] with respect to one example's
    activities is this matrix divided by $B$. It is block-tridiagonal, with
    $\kappa_L = \lambda$:

    $$H_{ll} = (\kappa_l + c) I + \kappa_{l+1} M_{l+1}^\top M_{l+1},\qquad
    H_{l,l+1} = H_{l+1,l}^\top = -\kappa_{l+1} M_{l+1}^\top,$$

    with $M_l = a_l W_l + s_l I$ as in [`jpc.compute_linear_equilib_rescaling`][].

    **Arguments:**

    - `Ws`: the weight matrices `[W_1, ..., W_L]`, each `(out, in)`; the scalings of
        `param_type` are read from their shapes ($D$ = fan-in of $W_1$).
    - `use_skips`: identity skips on the hidden layers (as
        [`jpc.make_skip_model`][]), which also changes their `"mupc"`/`"ntp"`
        scaling.
    - `param_type`, `gamma`, `output_energy_scaling`, `hidden_energy_scaling`: as
        for [`jpc.pc_energy_fn`][].
    - `activity_decay`: the coefficient $c$ of the activity-decay term (as the
        `activity_decay` of [`jpc.pc_energy_fn`][]); `True` means 1, `False` none.
        It adds $c I$ to every diagonal block.
    - `diag`, `off_diag`: keep the diagonal / off-diagonal blocks (the others are
        zero); both `True` gives the full Hessian.

    **Returns:**

    The `(n, n)` matrix.

    **Raises:**

    `ValueError` for fewer than two layers or weights that do not chain.
    """
    maps = _matrices_maps(Ws, use_skips, param_type, gamma)
    _check_depth(maps, "Ws")
    lam = precision(output_energy_scaling)
    kappas = hidden_precision_list(hidden_energy_scaling, maps)
    return hessian_from_maps(maps, lam, _decay(activity_decay), diag, off_diag, kappas)


def _hidden_rhs(maps: list, x: Array, y: Array, lam: Any, kappa_1: Any) -> Array:
    """$b$ with $\\nabla\\mathcal{F}_i(0) = -b_i$, stacked per example: `(batch, n)`."""
    parts = [jnp.zeros((x.shape[0], m.shape[0]), x.dtype) for m in maps[:-1]]
    parts[0] = parts[0] + kappa_1 * (x @ maps[0].T)
    parts[-1] = parts[-1] + lam * (y @ maps[-1])
    return jnp.concatenate(parts, axis=1)


@traced_floats("gamma", "output_energy_scaling", "hidden_energy_scaling")
def compute_linear_activity_solution(
    model: Model,
    x: Float[Array, "batch d_in"],
    y: Float[Array, "batch d_out"],
    *,
    use_skips: bool = False,
    param_type: ParamType = "sp",
    activity_decay: bool | Scalar = False,
    gamma: Scalar | None = None,
    output_energy_scaling: Scalar | None = None,
    hidden_energy_scaling: Scalar | Sequence[float] | None = None,
    epsilon: Scalar = 0.0,
    hessian: Float[Array, "n n"] | None = None,
) -> list[Float[Array, "batch ..."]]:
    r"""Equilibrium activities of a deep linear network, by one linear solve.

    The per-example energy is $\frac{1}{2}z^\top H z - b^\top z + \text{const}$ with
    $H$ from [`jpc.compute_linear_activity_hessian`][] and
    $b = (\kappa_1 M_1 x, 0, \dots, 0, \lambda M_L^\top y)$, so the minimiser is
    $z^* = (H + \epsilon I)^{-1} b$ for every example.

    **Arguments:**

    - `model`: list of bias-free linear layers, read as in
        [`jpc.compute_linear_equilib_rescaling`][].
    - `x`, `y`: input `(batch, d_in)` and target `(batch, d_out)`.
    - `use_skips`: identity skips on the hidden layers (as
        [`jpc.make_skip_model`][]).
    - `param_type`, `activity_decay`, `gamma`, `output_energy_scaling`,
        `hidden_energy_scaling`: as for [`jpc.compute_linear_activity_hessian`][].
    - `epsilon`: added to the diagonal of $H$ before solving (0: the exact
        minimiser).
    - `hessian`: a precomputed $H$ to use instead.

    **Returns:**

    The activities list `[z_1*, ..., z_{L-1}*, prediction]` (the layout of
    [`jpc.init_activities_with_ffwd`][]); the last entry is the network's
    prediction $M_L z_{L-1}^*$ from the equilibrium.

    **Raises:**

    `ValueError` for fewer than two layers, layers that are not bias-free linear
    maps, or data or `hessian` shapes that do not fit.
    """
    skip_model = make_skip_model(len(model)) if use_skips else None
    maps = params_maps((model, skip_model), x, param_type, gamma)
    _check_depth(maps, "model")
    check_data(maps, x, y)
    lam = precision(output_energy_scaling)
    kappas = hidden_precision_list(hidden_energy_scaling, model)
    if hessian is None:
        hessian = hessian_from_maps(maps, lam, _decay(activity_decay), kappas=kappas)
    n = sum(m.shape[0] for m in maps[:-1])
    if jnp.shape(hessian) != (n, n):
        raise ValueError(
            f"`hessian` must have shape ({n}, {n}) for this model, got "
            f"{jnp.shape(hessian)}."
        )
    hessian = hessian + epsilon * jnp.eye(n, dtype=hessian.dtype)
    rhs = _hidden_rhs(maps, x, y, lam, kappas[0])
    flat = jnp.linalg.solve(hessian, rhs.T).T
    splits = [sum(m.shape[0] for m in maps[: i + 1]) for i in range(len(maps) - 2)]
    hidden = jnp.split(flat, splits, axis=1)
    return [*hidden, hidden[-1] @ maps[-1].T]
