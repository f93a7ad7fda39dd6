r"""Is every layer learning? Per-layer PC updates against backprop's.

The numbers of [`jpc.compute_layer_learning`][] and of the `layer_learning` metric
of [`jpc.make_pc_step`][]: for every layer that holds parameters, the norm of the PC
weight gradient at the inferred state relative to the backprop gradient of the same
loss on the same batch, the cosine between the two, and whether the PC gradient is
exactly zero, below round-off or live. Also the scale-safe norms and cosines shared
with the other diagnostics, and the one-time warning for inert lower layers.
"""

import functools
import warnings
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Integer

from ._energies import hidden_precisions, regulariser
from ._layers import get_param_scalings, layer_inputs, predict, skip_at
from ._rules import output_loss
from ._types import Array, Float


ZERO, ROUND_OFF, LIVE = 0, 1, 2
STATUS_NAMES = ("zero", "round-off", "live")
NEGLIGIBLE = 1e-6  # a layer's ratio below this times the output layer's is inert
_warned: set = set()  # (caller, kind) pairs already warned about in this process


class LayerLearning(TypedDict):
    """Per-layer learning diagnostics, one entry per layer holding parameters.

    See [`jpc.compute_layer_learning`][] for the meaning of each field.
    """

    layer: Integer[Array, " layers"]
    pc_norm: Float[Array, " layers"]
    bp_norm: Float[Array, " layers"]
    ratio: Float[Array, " layers"]
    cosine: Float[Array, " layers"]
    round_off: Float[Array, " layers"]
    status: Integer[Array, " layers"]


# ------------------------------------------------------------------ scale-safe norms


def unit_scaled(v: Array) -> tuple[Array, Array]:
    """`(v / s, s)` with `s = max|v|` (`1` where `v` is all zeros).

    Squares of `v / s` neither overflow nor underflow, so norms and cosines computed
    from it are the same for `v` and for `1e±20 · v` in float32.
    """
    scale = jnp.max(jnp.abs(v)) if v.size else jnp.zeros((), v.dtype)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return v / scale, scale


def safe_norm(v: Array) -> Array:
    """Euclidean norm of `v` without overflow or underflow of its squares."""
    unit, scale = unit_scaled(v)
    return scale * jnp.sqrt(jnp.vdot(unit, unit))


def safe_cosine(a: Array, b: Array) -> Array:
    """Cosine between `a` and `b` (`nan` if either is zero), computed scale-safely."""
    (ua, _), (ub, _) = unit_scaled(a), unit_scaled(b)
    return jnp.vdot(ua, ub) / jnp.sqrt(jnp.vdot(ua, ua) * jnp.vdot(ub, ub))


def layer_vector(layer: Any) -> Array | None:
    """Every array leaf of one layer, flattened and concatenated (`None` if none)."""
    leaves = jtu.tree_leaves(eqx.filter(layer, eqx.is_array))
    return jnp.concatenate([jnp.ravel(a) for a in leaves]) if leaves else None


# ------------------------------------------------------------------ the metric


def _round_off_probe(model, skip_model, scalings, inputs, weights, batch) -> Any:
    r"""$\nabla_\theta \frac1B\sum_l w_l\langle|\mu_l|, \mu_l(\theta)\rangle$: the
    parameter gradient that prediction errors of size $|\mu_l|$ would give."""

    def probe(m):
        total = 0.0
        for i, (layer, z) in enumerate(zip(m, inputs)):
            mu = predict(layer, skip_at(skip_model, i), scalings[i], z)
            total = total + weights[i] * jnp.vdot(
                jax.lax.stop_gradient(jnp.abs(mu)), mu
            )
        return total / batch

    return eqx.filter_grad(probe)(model)


def check_supervised(x: Any, caller: str, name: str) -> None:
    if x is None:
        raise ValueError(
            f"`{caller}`'s layer-learning diagnostics compare PC with backprop, which "
            f"needs an input: pass `{name}` (supervised mode), got `{name}=None`."
        )


def layer_learning_metric(
    params, pc_grads, activities, y, x, energy_kwargs: dict, caller: str
) -> LayerLearning:
    """`LayerLearning` of the PC gradient `pc_grads` (model-shaped) at the
    inferred `activities`; warns once (host callback) if lower layers are inert."""
    check_supervised(x, caller, "input")
    model, skip_model = params
    kw = energy_kwargs
    scalings = get_param_scalings(
        model,
        x,
        skip_model=skip_model,
        param_type=kw["param_type"],
        gamma=kw.get("gamma"),
    )
    bp_grads = eqx.filter_grad(output_loss)(
        model, skip_model, scalings, x, y, kw["loss_id"]
    )
    lam = kw.get("output_energy_scaling")
    kappas = hidden_precisions(kw.get("hidden_energy_scaling"), len(model) - 1)
    weights = [1.0 if k is None else k for k in kappas] + [1.0 if lam is None else lam]
    inputs, _ = layer_inputs(activities, x)
    probe = _round_off_probe(model, skip_model, scalings, inputs, weights, y.shape[0])
    decays = (kw.get("weight_decay", 0.0), kw.get("spectral_penalty", 0.0))
    result = _per_layer(_without_regulariser(pc_grads, model, decays), bp_grads, probe)
    warn = functools.partial(_warn_if_inert, caller=caller)
    status, ratio = result["status"], result["ratio"]
    jax.lax.cond(  # the host is called only when a layer is inert
        _any_inert(status, ratio),
        lambda s, r: jax.debug.callback(warn, s, r),
        lambda s, r: None,
        status,
        ratio,
    )
    return result


def _without_regulariser(pc_grads, model, decays):
    """The PC gradient less that of the weight regularisers, which backprop's lacks."""
    if all(isinstance(d, (int, float)) and d == 0 for d in decays):
        return pc_grads
    reg_grads = eqx.filter_grad(lambda m: regulariser(m, [], *decays))(model)
    return jtu.tree_map(lambda g, r: g - r, pc_grads, reg_grads)


def _any_inert(status: Array, ratio: Array) -> Array:
    """On device: whether `inert_layers` would flag any entry."""
    if status.shape[0] < 2:
        return jnp.asarray(False)
    negligible = ratio[:-1] < NEGLIGIBLE * ratio[-1]
    return (status[-1] == LIVE) & jnp.any((status[:-1] != LIVE) | negligible)


def _per_layer(pc_grads, bp_grads, probe) -> LayerLearning:
    rows = []
    for i, (pc, bp, pr) in enumerate(zip(pc_grads, bp_grads, probe)):
        pc, bp, pr = layer_vector(pc), layer_vector(bp), layer_vector(pr)
        if pc is None:
            continue
        eps = jnp.finfo(pc.dtype).eps
        pc_norm, bp_norm = safe_norm(pc), safe_norm(bp)
        floor = eps * safe_norm(pr)
        status = jnp.where(
            pc_norm == 0, ZERO, jnp.where(pc_norm <= floor, ROUND_OFF, LIVE)
        )
        rows.append(
            (i, pc_norm, bp_norm, pc_norm / bp_norm, safe_cosine(pc, bp), floor, status)
        )
    columns = [jnp.stack([jnp.asarray(v) for v in col]) for col in zip(*rows)]
    return LayerLearning(**dict(zip(LayerLearning.__annotations__, columns)))


# ------------------------------------------------------------------ warning


def inert_layers(status: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Mask of the entries below the output layer that do not learn: a PC gradient
    that is zero or below round-off, or whose ratio to backprop is below
    `NEGLIGIBLE` times the output layer's. Empty when the output layer is not live."""
    status, ratio = np.asarray(status), np.asarray(ratio)
    if status.ndim != 1 or status.size < 2 or status[-1] != LIVE:
        return np.zeros(max(status.size - 1, 0), bool)
    with np.errstate(invalid="ignore"):
        negligible = ratio[:-1] < NEGLIGIBLE * ratio[-1]
    return (status[:-1] != LIVE) | negligible


def _warn_if_inert(status, ratio, caller) -> None:
    status, ratio = np.asarray(status), np.asarray(ratio)
    rows = zip(status.reshape(-1, status.shape[-1]), ratio.reshape(-1, ratio.shape[-1]))
    for s, r in rows:  # one row per element of an enclosing `vmap`
        inert = inert_layers(s, r)
        if inert.any():
            kind = "zero" if (s[:-1][inert] != LIVE).any() else "negligible"
            if (caller, kind) not in _warned:
                _warned.add((caller, kind))
                warnings.warn(
                    _message(caller, np.flatnonzero(inert), kind), stacklevel=1
                )


def _message(caller: str, entries: np.ndarray, kind: str) -> str:
    what = (
        "are exactly zero or below round-off"
        if kind == "zero"
        else f"are below {NEGLIGIBLE:g} times the output layer's (relative to backprop)"
    )
    return (
        f"{caller}: after inference the PC weight gradients of {len(entries)} lower "
        f"layer(s) (entries {entries.tolist()} of the layer-learning metric) {what}: "
        "the output error has not reached them, so they do not learn (an optimiser "
        "such as Adam turns such gradients into full-size steps of noise). Likely "
        "fixes: a per-example activity step, `activity_optim=jpc.per_example("
        "optax.sgd(0.5))` (the energy is a batch mean, so a plain `optax.sgd(lr)` "
        "moves each example by only lr / batch size times its error); more "
        "inference steps (`n_inference_steps`, or a longer `max_t1`); layer "
        "precisions (`hidden_energy_scaling`); or error-based PC "
        "(`jpc.update_epc_errors`), which moves every layer from the first step "
        "(in residual networks of 64 and 128 layers it reached every layer with "
        "T = L steps, where standard inference needed 64 L steps at 64 layers and "
        "left the lowest quarter of 128 behind; see the diagnostics page of the "
        "documentation). This warning is shown once per process."
    )


# ------------------------------------------------------------------ table


def format_layer_learning(result: LayerLearning) -> str:
    """The per-layer diagnostics of [`jpc.compute_layer_learning`][] as a text table.

    **Arguments:**

    - `result`: a [`jpc.compute_layer_learning`][] result (or the `layer_learning`
        entry of a [`jpc.make_pc_step`][] result).

    **Returns:**

    A string with one row per layer: the model index, the PC and backprop gradient
    norms, their ratio, the cosine, the round-off floor and the status.

    **Raises:**

    `ValueError` if the arrays of `result` are not 1-D (e.g. stacked over steps).
    """
    header = f"{'layer':>5} {'PC norm':>10} {'BP norm':>10} {'ratio':>10} "
    header += f"{'cosine':>8} {'round-off':>10}  status"
    lines = [header]
    columns = [np.asarray(result[k]) for k in LayerLearning.__annotations__]
    if columns[0].ndim != 1:
        raise ValueError(
            "`result` must hold one value per layer (1-D arrays); got `layer` of "
            f"shape {columns[0].shape}: index one step of stacked results first."
        )
    for i, pc, bp, ratio, cos, floor, status in zip(*columns):
        lines.append(
            f"{int(i):>5} {pc:>10.3e} {bp:>10.3e} {ratio:>10.3e} {cos:>8.4f} "
            f"{floor:>10.3e}  {STATUS_NAMES[int(status)]}"
        )
    return "\n".join(lines)
